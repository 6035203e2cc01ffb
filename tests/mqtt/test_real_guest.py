"""Acceptance: the real daemon, a real guest and a real mosquitto.

A trusted guest changes its MAC: an "applied" event and the retained state with the new
host MAC reach the broker. The broker goes away and comes back: syncing goes on, the
daemon stays up, and the retained state is republished in full.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import RunningDaemon, wait_until, write_config
from tests.support.guest import EthernetNic, Resources, link_show, prefixed, skip_or_fail
from tests.support.mqtt import Listener, Mosquitto, Msg, broker_problem, retained

pytestmark = [pytest.mark.mqtt, pytest.mark.libvirt]

MAC0 = "52:54:00:10:00:01"
NEW_MAC = "52:54:00:aa:bb:cc"
THIRD_MAC = "52:54:00:aa:bb:dd"
HOST = "hv-test"


def host_mac(ifname: str) -> str:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return str(info["address"])


def mqtt_daemon(workdir: Path, port: int, prefix: str, **mqtt: Any) -> RunningDaemon:
    daemon = RunningDaemon(workdir)
    daemon.config = write_config(
        workdir / "rxfilterd.toml",
        {
            "log": {"level": "debug", "format": "json"},
            "mqtt": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "topic_prefix": prefix,
                "client_id": HOST,
                **mqtt,
            },
        },
    )
    return daemon


def state_of(port: int, prefix: str, domain: str) -> dict[str, Any] | None:
    kept = asyncio.run(retained(port, f"{prefix}/{HOST}/nic/host/{domain}/net0", quiet=0.3))
    message = kept.get(f"{prefix}/{HOST}/nic/host/{domain}/net0")
    if message is None:
        return None
    state: dict[str, Any] = message.json()
    return state


def is_applied_mac(domain: str, mac: str) -> Any:
    def match(m: Msg) -> bool:
        if not m.topic.endswith("/events"):
            return False
        e = m.json()
        return bool(
            e["event"] == "applied"
            and e["domain"] == domain
            and e["field"] == "mac"
            and e["new"] == mac
        )

    return match


def test_guest_mac_change_reaches_the_broker(
    stack: Resources,
    tmp_path: Path,
    topic_prefix: str,
    shared_broker: int,
) -> None:
    port, prefix = shared_broker, topic_prefix
    mvt = stack.veth_macvtap("mq", mac=MAC0)
    with (
        Listener(port, [f"{prefix}/#"]) as listener,
        mqtt_daemon(tmp_path, port, prefix) as daemon,
    ):
        guest = stack.guest(prefixed("mq"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        nic_topic = f"{prefix}/{HOST}/nic/host/{guest.name}/net0"
        listener.wait_for(
            lambda m: m.topic == nic_topic and b'"result":"ok"' in m.payload, 30, "first state"
        )
        guest.set_mac(NEW_MAC)
        event = listener.wait_for(is_applied_mac(guest.name, NEW_MAC), 10, "applied event").json()
        assert event["alias"] == "net0" and event["ifname"] == mvt.name
        assert event["old"] == MAC0 and event["dropped"] == 0
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 5, "new MAC on the host")

        def state_has_new_mac() -> bool:
            state = state_of(port, prefix, guest.name)
            return state is not None and (state.get("host") or {}).get("mac") == NEW_MAC

        wait_until(state_has_new_mac, 10, "retained state with the new host MAC")
        state = state_of(port, prefix, guest.name)
        assert state is not None
        assert state["trust"] == "yes" and state["trust_source"] == "interface"
        assert state["guest"]["main_mac"] == NEW_MAC and state["result"] == "ok"
        assert state["ifname"] == mvt.name and isinstance(state["last_sync"], float)

        table = subprocess.run(
            [sys.executable, "-m", "rxfilterd", "fleet", "--config", str(daemon.config)],
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert table.returncode == 0, table
        row = next(line for line in table.stdout.splitlines() if guest.name in line)
        assert row.split()[:2] == [HOST, "online"] and NEW_MAC in row.split()
    assert daemon.exit_seconds is not None and daemon.exit_seconds < 5
    kept = asyncio.run(retained(port, f"{prefix}/{HOST}/#"))
    status = kept[f"{prefix}/{HOST}/status"].json()
    assert status["status"] == "offline" and status["reason"] == "shutdown"
    # The NIC still exists after rxfilterd stops: its last state stays, marked by "offline".
    assert f"{prefix}/{HOST}/nic/host/{guest.name}/net0" in kept


def test_broker_restart_mid_run(stack: Resources, tmp_path: Path) -> None:
    if broker_problem() is not None:  # the same tooling as the shared broker
        skip_or_fail(str(broker_problem()))
    prefix = "rxftest-restart"  # a private broker: no one else sees it
    mvt = stack.veth_macvtap("mr", mac=MAC0)
    (tmp_path / "broker").mkdir()
    with Mosquitto(tmp_path / "broker") as broker:
        port = broker.port
        with mqtt_daemon(tmp_path, port, prefix, reconnect_max=0.5) as daemon:
            guest = stack.guest(prefixed("mr"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
            wait_until(lambda: state_of(port, prefix, guest.name) is not None, 30, "first state")

            broker.stop()
            daemon.wait_for(lambda r: r.get("event") == "mqtt broker connection lost", 5)
            # Syncing does not care that the broker is away.
            guest.set_mac(NEW_MAC)
            wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 5, "new MAC while broker is down")
            daemon.wait_for(
                lambda r: r.get("event") == "applied" and r.get("new") == NEW_MAC, 5, "applied"
            )
            broker.start()  # same port; it remembers nothing (persistence off)
            with Listener(port, [f"{prefix}/{HOST}/events"]) as listener:
                daemon.wait_for(lambda r: r.get("event") == "mqtt broker back", 10, "back")

                def republished() -> bool:
                    state = state_of(port, prefix, guest.name)
                    return state is not None and (state.get("host") or {}).get("mac") == NEW_MAC

                wait_until(republished, 10, "retained state republished after the restart")
                kept = asyncio.run(retained(port, f"{prefix}/{HOST}/status"))
                assert kept[f"{prefix}/{HOST}/status"].json()["status"] == "online"
                assert daemon.proc is not None and daemon.proc.poll() is None

                guest.set_mac(THIRD_MAC)  # and events flow again
                wait_until(lambda: host_mac(mvt.name) == THIRD_MAC, 5, "third MAC")
                listener.wait_for(is_applied_mac(guest.name, THIRD_MAC), 10, "live event")
        records = daemon.records()
    names = [r.get("event") for r in records]
    assert names.count("mqtt broker connection lost") == 1
    assert names.count("mqtt broker back") == 1
    assert not [r for r in records if r.get("event") == "failed"]
