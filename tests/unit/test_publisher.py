"""The pure parts of the MQTT publisher: topics, the event queue, payloads, fleet output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from rxfilterd import config, fleet
from rxfilterd.cli import main
from rxfilterd.config import ConfigError, MqttSettings
from rxfilterd.mqtt_topics import (
    FleetMessage,
    ParsedTopic,
    TopicError,
    Topics,
    parse_topic,
    topic_segment,
    unescape_segment,
)
from rxfilterd.plan import MacChange
from rxfilterd.publisher import (
    EventQueue,
    Publisher,
    event_payload,
    nic_payload,
    status_payload,
)
from rxfilterd.records import Decision, NicRow, NicState


@pytest.mark.parametrize(
    ("name", "segment"),
    [
        ("web1", "web1"),
        ("net0", "net0"),
        ("a/b", "a%2Fb"),
        ("+", "%2B"),
        ("#", "%23"),
        ("50%", "50%25"),
        ("nul\0", "nul%00"),
        ("ünïcode dom", "ünïcode dom"),
    ],
)
def test_topic_segment_escapes_what_mqtt_gives_meaning(name: str, segment: str) -> None:
    assert topic_segment(name) == segment
    assert unescape_segment(segment) == name


def test_empty_name_is_rejected() -> None:
    with pytest.raises(TopicError):
        topic_segment("")


@given(st.text(min_size=1))
def test_segments_are_single_levels_and_round_trip(name: str) -> None:
    segment = topic_segment(name)
    assert not set(segment) & set("/+#\0")
    assert unescape_segment(segment) == name


def test_topics_and_parsing() -> None:
    topics = Topics("site/rxfilterd", "hv1")
    assert topics.status == "site/rxfilterd/hv1/status"
    assert topics.events == "site/rxfilterd/hv1/events"
    assert topics.nic("host", "a/b", "net0") == "site/rxfilterd/hv1/nic/host/a%2Fb/net0"
    # A pod's connection name holds a slash: escaped like any other.
    assert topics.nic("pod/l-1", "ns_vm", "ua-x") == "site/rxfilterd/hv1/nic/pod%2Fl-1/ns_vm/ua-x"
    prefix = "site/rxfilterd"
    assert parse_topic(prefix, topics.status) == ParsedTopic("hv1", "status")
    assert parse_topic(prefix, topics.events) == ParsedTopic("hv1", "events")
    assert parse_topic(prefix, topics.nic("pod/l-1", "a/b", "net0")) == ParsedTopic(
        "hv1", "nic", "pod/l-1", "a/b", "net0"
    )
    for foreign in (
        "other/hv1/status",
        "site/rxfilterd/hv1/nic/x",
        "site/rxfilterd/hv1/nic/d/net0",
        "site/rxfilterd/hv1/what",
    ):
        assert parse_topic(prefix, foreign) is None


def test_queue_drops_the_oldest_and_counts() -> None:
    q: EventQueue[dict[str, int]] = EventQueue(3)
    for i in range(5):
        q.put({"n": i})
    assert q.dropped == 2 and len(q) == 3
    assert [q.get(), q.get(), q.get(), q.get()] == [{"n": 2}, {"n": 3}, {"n": 4}, None]


def test_a_failed_publish_goes_back_in_front_unless_newer_filled_the_queue() -> None:
    q: EventQueue[dict[str, int]] = EventQueue(2)
    q.put({"n": 1})
    q.put({"n": 2})
    item = q.get()
    assert item == {"n": 1}
    q.unget(item)
    assert q.get() == {"n": 1} and q.dropped == 0
    q.put({"n": 3})  # the queue is full again while {"n": 1} was in flight
    q.unget({"n": 1})
    assert q.dropped == 1 and [q.get(), q.get()] == [{"n": 2}, {"n": 3}]


ROW = NicRow(
    "host", "d", "net0", "macvtap3", "", "virtio", "ethernet", "yes", "port", "sync", "trusted"
)


def test_sinks_never_wait_and_events_past_the_queue_are_dropped() -> None:
    # What reaches the broker (the last state per NIC, the frozen state at shutdown) is
    # tested against mosquitto in tests/mqtt/test_publisher_broker.py.
    publisher = Publisher(MqttSettings(client_id="hv1", queue_size=10))
    # No broker and no running publisher: a sink that waited for room would hang here.
    for i in range(1000):
        publisher.decision(
            Decision(libvirt="host", event="applied", domain="d", alias="net0", ifname=None)
        )
        publisher.nic_state(("host", "d", "net0"), NicState(ROW, result=f"ok {i}"))
    assert len(publisher.events) == 10 and publisher.events.dropped == 990


def test_a_nic_whose_name_is_no_topic_level_is_logged_once_and_skipped() -> None:
    publisher = Publisher(MqttSettings(client_id="hv1"))
    with structlog.testing.capture_logs() as logs:
        publisher.nic_state(("host", "", "net0"), NicState(ROW, result="ok"))
        publisher.nic_state(("host", "", "net0"), NicState(ROW, result="ok again"))
    assert [(e["event"], e["domain"], e["alias"]) for e in logs] == [
        ("mqtt: NIC not published", "", "net0")
    ]


def test_payloads_on_the_wire() -> None:
    # docs/mqtt.md: sorted keys, compact; events at schema 3 and NIC state at 2 (both
    # name their libvirt; events have no `action`: that is the NIC state's verdict),
    # status at 1.
    applied = Decision(
        libvirt="host",
        event="applied",
        domain="web1",
        alias="net0",
        ifname="macvtap3",
        time=1767225600.51,
        change=MacChange("52:54:00:10:00:01", "52:54:00:aa:bb:cc"),
        cause="event",
    )
    assert event_payload(applied, 17, 0) == (
        b'{"alias":"net0","cause":"event","domain":"web1","dropped":0,"event":"applied",'
        b'"field":"mac","ifname":"macvtap3","libvirt":"host","new":"52:54:00:aa:bb:cc",'
        b'"old":"52:54:00:10:00:01","schema":3,"seq":17,"time":1767225600.51}'
    )
    state = NicState(ROW, last_sync=1767225600.52, cause="event", result="ok")
    assert nic_payload(state) == (
        b'{"action":"sync","alias":"net0","cause":"event","current_mac":"","domain":"d",'
        b'"guest":null,"host":null,"ifname":"macvtap3","last_sync":1767225600.52,"libvirt":"host",'
        b'"model":"virtio","reason":"trusted","result":"ok","schema":2,"trust":"yes",'
        b'"trust_source":"port","type":"ethernet"}'
    )
    assert nic_payload(None) == b""
    offline = json.loads(status_payload("offline", dropped=3, version="0.1.0"))
    assert offline == {
        "status": "offline",
        "reason": "shutdown",
        "dropped": 3,
        "version": "0.1.0",
        "schema": 1,
        "time": offline["time"],
    }


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rxfilterd.toml"
    path.write_text(text)
    return path


def test_password_file_is_read_at_load(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    loaded = config.load(write(tmp_path, f'[mqtt]\nusername = "rx"\npassword_file = "{secret}"\n'))
    assert loaded.mqtt.password == "s3cret"
    assert "s3cret" not in repr(loaded)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[mqtt]\nusername = "rx"\npassword_file = "/nonexistent/pw"\n', "mqtt.password_file"),
        ('[mqtt]\npassword_file = "/etc/hostname"\n', "needs mqtt.username"),
        ('[mqtt]\nclient_id = "a/b"\n', "mqtt.client_id"),
        ('[mqtt]\nclient_id = ""\n', "mqtt.client_id"),
        ('[mqtt]\ntopic_prefix = "a//b"\n', "mqtt.topic_prefix"),
        ('[mqtt]\ntopic_prefix = "rx/"\n', "mqtt.topic_prefix"),
        ('[mqtt]\ntopic_prefix = "$SYS"\n', "mqtt.topic_prefix"),
        ('[mqtt]\ntls_ca = "/nonexistent/ca.pem"\n', "mqtt.tls_ca"),
        ('[mqtt]\ntls_ca = "/etc/hostname"\n', "mqtt.tls_"),
        ('[mqtt]\npassword = "inline"\n', "mqtt.password: unknown key"),
    ],
)
def test_bad_mqtt_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
        config.load(write(tmp_path, text))


def test_unreadable_password_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[mqtt]\nusername = "rx"\npassword_file = "/nonexistent/pw"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    assert "mqtt.password_file" in capsys.readouterr().err
    assert main(["fleet", "--config", str(path)]) == 2


def msg(topic: ParsedTopic, payload: bytes) -> FleetMessage:
    return FleetMessage(topic, payload, True)


def test_fleet_rows() -> None:
    state = (
        b'{"ifname":"macvtap3","trust":"yes","trust_source":"network","action":"sync",'
        b'"host":{"mac":"52:54:00:aa:bb:cc"},"result":"ok","last_sync":0}'
    )
    table = fleet.rows(
        [
            msg(ParsedTopic("hv2", "status"), b'{"status":"offline"}'),
            msg(ParsedTopic("hv1", "nic", "host", "web/1", "net0"), state),
            # The same domain in a pod's libvirt on the same host: a row of its own.
            msg(ParsedTopic("hv1", "nic", "pod/l-1", "web/1", "net0"), state),
            msg(ParsedTopic("hv1", "status"), b"online"),  # plain text is understood too
            msg(ParsedTopic("hv3", "nic", "host", "x", "net0"), b"not json"),
        ]
    )
    assert [(r["host"], r["status"], r["libvirt"], r["domain"]) for r in table] == [
        ("hv1", "online", "host", "web/1"),
        ("hv1", "online", "pod/l-1", "web/1"),
        ("hv2", "offline", "", ""),
        ("hv3", "?", "host", "x"),
    ]
    assert table[0]["mac"] == "52:54:00:aa:bb:cc" and table[0]["trust_source"] == "network"
    assert table[0]["last_sync"]  # a local time
    out = fleet.table(table)
    assert out.splitlines()[0].split()[:4] == ["HOST", "STATUS", "LIBVIRT", "DOMAIN"]
    assert fleet.table([]).startswith("no rxfilterd hosts")


def test_fleet_event_lines() -> None:
    live = fleet.LiveFormatter()
    events = ParsedTopic("hv1", "events")
    applied = (
        b'{"event":"applied","time":0,"domain":"web1","alias":"net0","ifname":"macvtap3",'
        b'"field":"mac","old":"52:54:00:00:00:01","new":"52:54:00:00:00:02","dropped":0}'
    )
    line = live.line(msg(events, applied))
    assert line is not None
    assert "hv1  applied  web1/net0  macvtap3  mac 52:54:00:00:00:01 -> 52:54:00:00:00:02" in line
    multicast = (
        b'{"event":"applied","domain":"d","alias":"net0","field":"multicast",'
        b'"added":["33:33:00:00:00:fb"],"removed":[],"dropped":3}'
    )
    line = live.line(msg(events, multicast))
    assert line is not None and "multicast +33:33:00:00:00:fb" in line
    assert "[3 events dropped" in line
    skipped = b'{"event":"skipped","domain":"d","alias":"net1","reason":"untrusted","dropped":3}'
    line = live.line(msg(events, skipped))
    assert line is not None and "untrusted" in line and "dropped" not in line
    failed = b'{"event":"failed","domain":"d","alias":"net0","stage":"apply","error":"EBUSY"}'
    line = live.line(msg(events, failed))
    assert line is not None and "apply: EBUSY" in line
    assert live.line(msg(ParsedTopic("hv1", "nic", "d", "net0"), b"{}")) is None
    status = live.line(msg(ParsedTopic("hv1", "status"), b'{"status":"offline"}'))
    assert status is not None and "hv1  status  offline" in status
