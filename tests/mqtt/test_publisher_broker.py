"""The publisher and `rxfilterd fleet` against a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from rxfilterd.config import MqttSettings
from rxfilterd.guest_filter import GuestFilter
from rxfilterd.host_state import HostState
from rxfilterd.plan import MacChange, Refusal
from rxfilterd.publisher import Publisher
from rxfilterd.records import Decision, DecisionEvent, NicRow, NicState
from tests.support.daemon import write_config
from tests.support.guest import skip_or_fail
from tests.support.mqtt import Listener, Mosquitto, Msg, retained

pytestmark = pytest.mark.mqtt

HOST = "hv-test"
MAC0 = "52:54:00:10:00:01"
MAC1 = "52:54:00:aa:bb:cc"


def settings(port: int, prefix: str, **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "client_id": HOST,
        **overrides,
    }
    return MqttSettings(**values)


def record(
    event: DecisionEvent, domain: str = "web1", alias: str = "net0", **fields: Any
) -> Decision:
    return Decision(
        libvirt="host", event=event, domain=domain, alias=alias, ifname="macvtap3", **fields
    )


def mac_applied(old: str, new: str, **fields: Any) -> Decision:
    return record("applied", change=MacChange(old, new), **fields)


def nic_state(mac: str, domain: str = "web1", alias: str = "net0") -> NicState:
    """Shaped like the daemon's state records."""
    row = NicRow("host", domain, alias, "macvtap3", "", "virtio", "ethernet", "yes", "interface",
                 "sync", "trusted")  # fmt: skip
    guest = GuestFilter(alias, mac, False, "normal", "normal", "normal", True, False, False,
                        frozenset({"33:33:00:00:00:01"}), frozenset(), frozenset())  # fmt: skip
    host = HostState("macvtap3", 7, "bridge", mac, False, False, frozenset(), frozenset(),
                     frozenset())  # fmt: skip
    return NicState(row, guest=guest, host=host, last_sync=time.time(), result="ok")


@contextlib.asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        yield task
    finally:
        stop.set()
        # A deadline for stopping at all (a reconnect backoff or keepalive must not
        # hold shutdown), far above the usual few ms: not a measure of speed.
        try:
            await asyncio.wait_for(task, timeout=5)
        except TimeoutError:
            raise AssertionError("the publisher did not stop within 5 s of being told") from None


async def eventually(check: Callable[[], Any], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await _maybe_async(check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.05)


async def _maybe_async(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


async def wait_msg(listener: Listener, match: Callable[[Msg], bool], what: str) -> Msg:
    return await asyncio.to_thread(listener.wait_for, match, 5, what)


def events_of(listener: Listener, prefix: str) -> list[dict[str, Any]]:
    topic = f"{prefix}/{HOST}/events"
    return [m.json() for m in listener.messages() if m.topic == topic]


def test_events_and_retained_state_reach_the_broker(shared_broker: int, topic_prefix: str) -> None:
    base = f"{topic_prefix}/{HOST}"

    async def main() -> None:
        publisher = Publisher(settings(shared_broker, topic_prefix))
        with Listener(shared_broker, [f"{topic_prefix}/#"]) as listener:
            async with running(publisher):
                publisher.decision(mac_applied(MAC0, MAC1, cause="event"))
                publisher.decision(record("skipped", alias="net1", reason="untrusted", trust="no"))
                publisher.decision(record("failed", stage="apply", error="EADDRINUSE"))
                publisher.decision(
                    record("refused", refusal=Refusal("mac", MAC1, "not in mac_allow"))
                )
                publisher.nic_state(("host", "web1", "net0"), nic_state(MAC1))
                # Names that are not safe topic levels are escaped, never split.
                publisher.nic_state(("host", "we/b+#2", "net0"), nic_state(MAC0, domain="we/b+#2"))
                await wait_msg(
                    listener, lambda m: m.topic == f"{base}/events" and b"refused" in m.payload, "4"
                )
                kept = await retained(shared_broker, f"{base}/#")
                publisher.nic_state(("host", "web1", "net0"), None)
                await eventually(
                    lambda: _lacks(shared_broker, f"{base}/nic/host/web1/net0"), 5, "state cleared"
                )
            after = await retained(shared_broker, f"{base}/status")
        events = events_of(listener, topic_prefix)
        assert [e["event"] for e in events] == ["applied", "skipped", "failed", "refused"]
        applied = events[0]
        assert applied["domain"] == "web1" and applied["alias"] == "net0"
        assert applied["ifname"] == "macvtap3"
        assert (applied["field"], applied["old"], applied["new"]) == ("mac", MAC0, MAC1)
        assert applied["dropped"] == 0 and applied["schema"] == 3 and "action" not in applied
        assert [e["seq"] for e in events] == [1, 2, 3, 4]
        assert events[1]["reason"] == "untrusted" and events[2]["error"] == "EADDRINUSE"
        assert not any(m.retain for m in listener.messages() if m.topic == f"{base}/events")

        assert kept[f"{base}/status"].json()["status"] == "online"
        state = kept[f"{base}/nic/host/web1/net0"].json()
        assert state["host"]["mac"] == MAC1 and state["result"] == "ok"
        assert state["trust"] == "yes" and state["trust_source"] == "interface"
        assert state["action"] == "sync" and state["schema"] == 2 and state["libvirt"] == "host"
        assert state["guest"]["multicast_table"] == ["33:33:00:00:00:01"]
        assert kept[f"{base}/nic/host/we%2Fb%2B%232/net0"].json()["domain"] == "we/b+#2"
        offline = after[f"{base}/status"].json()
        assert offline["status"] == "offline" and offline["reason"] == "shutdown"

    asyncio.run(main())


def test_a_frozen_publisher_leaves_the_last_state_retained(
    shared_broker: int, topic_prefix: str
) -> None:
    base = f"{topic_prefix}/{HOST}"

    async def main() -> None:
        publisher = Publisher(settings(shared_broker, topic_prefix))
        async with running(publisher):
            publisher.nic_state(("host", "web1", "net0"), nic_state(MAC0))
            publisher.nic_state(("host", "web1", "net0"), nic_state(MAC1))
            await eventually(
                lambda: _holds(shared_broker, f"{base}/nic/host/web1/net0", MAC1),
                5,
                "state published",
            )
            publisher.freeze()  # shutdown: the daemon then drops every NIC
            publisher.nic_state(("host", "web1", "net0"), None)
        kept = await retained(shared_broker, f"{base}/#")
        assert kept[f"{base}/status"].json()["status"] == "offline"
        assert kept[f"{base}/nic/host/web1/net0"].json()["host"]["mac"] == MAC1

    asyncio.run(main())


async def _holds(port: int, topic: str, mac: str) -> bool:
    kept = await retained(port, topic, quiet=0.3)
    return topic in kept and kept[topic].json()["host"]["mac"] == mac


async def _lacks(port: int, topic: str) -> bool:
    return topic not in await retained(port, topic, quiet=0.3)


def test_queue_overflow_drops_oldest_and_counts(shared_broker: int, topic_prefix: str) -> None:
    base = f"{topic_prefix}/{HOST}"

    async def main() -> None:
        publisher = Publisher(settings(shared_broker, topic_prefix, queue_size=5))
        # Not running yet: the sinks queue (dropping the oldest event) and never wait.
        for i in range(12):
            publisher.decision(mac_applied(MAC0, f"02:00:00:00:00:{i:02x}"))
        for i in range(50):  # state is coalesced per NIC, never dropped
            for nic in ("net0", "net1", "net2"):
                publisher.nic_state(
                    ("host", "web1", nic), nic_state(f"02:00:00:00:01:{i:02x}", alias=nic)
                )
        assert publisher.events.dropped == 7 and len(publisher.events) == 5
        with Listener(shared_broker, [f"{base}/events"]) as listener:
            async with running(publisher):
                await wait_msg(listener, lambda m: b'"seq":12' in m.payload, "the last event")
                kept = await retained(shared_broker, f"{base}/#")
        events = events_of(listener, topic_prefix)
        assert [e["seq"] for e in events] == [8, 9, 10, 11, 12]  # the oldest seven went
        assert all(e["dropped"] == 7 for e in events)
        assert kept[f"{base}/status"].json()["dropped"] == 7
        for nic in ("net0", "net1", "net2"):
            assert kept[f"{base}/nic/host/web1/{nic}"].json()["host"]["mac"] == "02:00:00:00:01:31"

    asyncio.run(main())


@pytest.fixture
def mosquitto_bin() -> None:
    import shutil

    for tool in ("mosquitto", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed: run scripts/setup-host")


@pytest.mark.usefixtures("mosquitto_bin")
def test_broker_restart_republishes_retained_state(tmp_path: Path) -> None:
    prefix = "rxftest-restart"  # a private broker: no one else sees it

    async def main(broker: Mosquitto) -> None:
        base = f"{prefix}/{HOST}"
        publisher = Publisher(settings(broker.port, prefix, reconnect_max=0.5))
        with structlog.testing.capture_logs() as logs:
            async with running(publisher) as task:
                publisher.nic_state(("host", "web1", "net0"), nic_state(MAC0))
                publisher.nic_state(("host", "web1", "net1"), nic_state(MAC0, alias="net1"))
                publisher.decision(mac_applied(MAC1, MAC0))
                await eventually(lambda: publisher.published >= 4, 5, "first publishes")
                broker.stop()
                await eventually(lambda: not publisher.connected, 5, "publisher notices")
                # While the broker is away: changes keep coming and must not block.
                publisher.nic_state(("host", "web1", "net0"), nic_state(MAC1))
                publisher.nic_state(("host", "web1", "net1"), None)
                publisher.nic_state(("host", "db1", "net0"), nic_state(MAC0, domain="db1"))
                for _ in range(3):
                    publisher.decision(mac_applied(MAC0, MAC1))
                await asyncio.sleep(2)  # several reconnect attempts
                assert not task.done()
                broker.start()  # same port, and it remembers nothing
                await eventually(lambda: publisher.connected, 5, "reconnected")
                await eventually(lambda: len(publisher.events) == 0, 5, "queue drained")
                kept = await retained(broker.port, f"{base}/#")
                assert not task.done()
        assert kept[f"{base}/status"].json()["status"] == "online"
        assert kept[f"{base}/nic/host/web1/net0"].json()["host"]["mac"] == MAC1
        assert kept[f"{base}/nic/host/db1/net0"].json()["domain"] == "db1"
        assert f"{base}/nic/host/web1/net1" not in kept
        assert publisher.events.dropped == 0
        events = [entry["event"] for entry in logs]
        # One line when it goes, one when it is back: no line per retry.
        assert events.count("mqtt broker connection lost") == 1, logs
        assert events.count("mqtt broker back") == 1, logs
        assert "mqtt broker unreachable" not in events

    with Mosquitto(tmp_path) as broker:
        asyncio.run(main(broker))


def mqtt_config(tmp_path: Path, port: int, prefix: str, **extra: Any) -> Path:
    mqtt: dict[str, Any] = {"host": "127.0.0.1", "port": port, "topic_prefix": prefix, **extra}
    return write_config(tmp_path / "rxfilterd.toml", {"mqtt": mqtt})


def fleet(config: Path, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rxfilterd", "fleet", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.usefixtures("mosquitto_bin")
def test_bad_credentials_give_a_clear_error(tmp_path: Path) -> None:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("wrong\n")
    with Mosquitto(tmp_path, users={"rx": "right"}) as broker:
        config = mqtt_config(
            tmp_path, broker.port, "rxftest-auth", username="rx", password_file=str(password_file)
        )
        bad = fleet(config)
        assert bad.returncode == 1, bad
        assert "refused the connection" in bad.stderr
        assert "check mqtt.username and mqtt.password_file" in bad.stderr
        assert "Traceback" not in bad.stderr

        async def publish_with_bad_password() -> list[MutableMapping[str, Any]]:
            publisher = Publisher(
                settings(broker.port, "rxftest-auth", username="rx", reconnect_max=0.3)
            )
            object.__setattr__(publisher.settings, "password", "wrong")
            with structlog.testing.capture_logs() as logs:
                async with running(publisher) as task:
                    await asyncio.sleep(1.5)  # several refused attempts
                    assert not task.done() and not publisher.connected
            return logs

        logs = asyncio.run(publish_with_bad_password())
        refused = [
            entry for entry in logs if entry["event"] == "mqtt broker refused the connection"
        ]
        assert len(refused) == 1, logs
        assert "password" in refused[0]["error"].lower()
        assert f"127.0.0.1:{broker.port}" in refused[0]["error"]

        password_file.write_text("right\n")
        good = fleet(config)
        assert good.returncode == 0, good
        assert "no rxfilterd hosts" in good.stdout


def test_fleet_prints_the_table_and_follows_events(
    shared_broker: int, topic_prefix: str, tmp_path: Path
) -> None:
    config = mqtt_config(tmp_path, shared_broker, topic_prefix)

    async def main() -> None:
        publisher = Publisher(settings(shared_broker, topic_prefix))
        async with running(publisher):
            publisher.nic_state(("host", "web1", "net0"), nic_state(MAC1))
            publisher.nic_state(
                ("host", "db1", "net2"), nic_state(MAC0, domain="db1", alias="net2")
            )
            await eventually(lambda: publisher.published >= 3, 5, "state published")
            table = await asyncio.to_thread(fleet, config)
            assert table.returncode == 0, table
            lines = table.stdout.splitlines()
            assert lines[0].split() == [
                "HOST",
                "STATUS",
                "LIBVIRT",
                "DOMAIN",
                "ALIAS",
                "IFNAME",
                "TRUST",
                "TRUST_SOURCE",
                "ACTION",
                "MAC",
                "RESULT",
                "LAST_SYNC",
            ]
            rows = [line.split() for line in lines[1:]]
            assert rows[0][:11] == [
                HOST,
                "online",
                "host",
                "db1",
                "net2",
                "macvtap3",
                "yes",
                "interface",
                "sync",
                MAC0,
                "ok",
            ]
            assert rows[1][2:5] == ["host", "web1", "net0"] and rows[1][9] == MAC1

            proc, out = follow(config)
            try:
                await _line(out, lambda line: "web1" in line, "the table")
                publisher.decision(mac_applied(MAC0, MAC1))
                line = await _line(out, lambda line: "applied" in line, "the applied event")
                assert "web1/net0" in line and f"mac {MAC0} -> {MAC1}" in line
                assert HOST in line
            finally:
                proc.send_signal(signal.SIGINT)
                code = await asyncio.to_thread(proc.wait, 5)
            assert code == 0, proc.stderr.read() if proc.stderr else ""

    asyncio.run(main())


def follow(config: Path) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """`rxfilterd fleet --follow`, its stdout lines fed to a queue by a thread."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rxfilterd", "fleet", "--config", str(config), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout or ():
            out.put(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, out


async def _line(out: queue.Queue[str], match: Callable[[str], bool], what: str) -> str:
    deadline = time.monotonic() + 10
    seen = []
    while time.monotonic() < deadline:
        try:
            line = await asyncio.to_thread(out.get, True, 0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if match(line):
            return line
    raise AssertionError(f"no {what} from fleet --follow; got:\n{''.join(seen)}")


def test_state_payload_is_json_object(shared_broker: int, topic_prefix: str) -> None:
    """A consumer can json.loads every retained NIC payload (no bytes, no NaN, sorted keys)."""
    base = f"{topic_prefix}/{HOST}"

    async def main() -> None:
        publisher = Publisher(settings(shared_broker, topic_prefix))
        state = nic_state(MAC0)
        async with running(publisher):
            publisher.nic_state(("host", "web1", "net0"), state)
            await eventually(lambda: publisher.published >= 2, 5, "state published")
            kept = await retained(shared_broker, f"{base}/nic/#")
        payload = kept[f"{base}/nic/host/web1/net0"].payload
        assert isinstance(json.loads(payload), dict)

    asyncio.run(main())
