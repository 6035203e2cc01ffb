"""journald native protocol against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from rxfilterd.journal import (
    JournalRenderer,
    JournalSender,
    field_name,
    priority_for,
    render_line,
    serialize,
    under_journal,
)
from rxfilterd.plan import MacChange
from rxfilterd.records import Decision
from rxfilterd.sinks import Sinks

Entry = list[tuple[str, bytes]]


def parse(data: bytes) -> Entry:
    """Independent decoder of the native protocol, as journald reads it."""
    fields: Entry = []
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields.append((name.decode(), value))
            pos = nl + 1
        else:
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            fields.append((line.decode(), data[start : start + size]))
            assert data[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
    return fields


class Journal:
    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path

    def recv(self) -> tuple[bytes, list[int]]:
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
        return msg, fds

    def entry(self) -> Entry:
        msg, fds = self.recv()
        assert fds == []
        return parse(msg)

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2)
        return False


@pytest.fixture
def journal() -> Iterator[Journal]:
    # Short /tmp dir: sun_path is limited to 108 bytes and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="rxf-") as tmp:
        path = os.path.join(tmp, "journal")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield Journal(sock, path)
        finally:
            sock.close()


def test_send_exact_datagram(journal: Journal) -> None:
    sender = JournalSender(journal.path)
    assert sender.send_fields([("MESSAGE", "hello"), ("PRIORITY", "4"), ("DOMAIN", "web1")])
    msg, fds = journal.recv()
    assert fds == []
    assert msg == b"MESSAGE=hello\nPRIORITY=4\nDOMAIN=web1\n"


def test_newline_values_use_binary_form(journal: Journal) -> None:
    sender = JournalSender(journal.path)
    fields = [
        ("MESSAGE", "line one\nline two"),
        ("PRIORITY", "6"),
        ("SYSLOG_IDENTIFIER", "rxfilterd"),
        ("DETAIL", "a\nb\n"),
    ]
    assert sender.send_fields(fields)
    msg, _ = journal.recv()
    assert msg.startswith(b"MESSAGE\n" + struct.pack("<Q", 17) + b"line one\nline two\n")
    assert parse(msg) == [
        ("MESSAGE", b"line one\nline two"),
        ("PRIORITY", b"6"),
        ("SYSLOG_IDENTIFIER", b"rxfilterd"),
        ("DETAIL", b"a\nb\n"),
    ]


def test_serialize_mixed() -> None:
    data = serialize([("A", "x=y"), ("B", b"1\n2"), ("C", "")])
    assert data == b"A=x=y\nB\n" + struct.pack("<Q", 3) + b"1\n2\nC=\n"


def test_large_entry_goes_through_sealed_memfd(journal: Journal) -> None:
    # Larger than the default socket send buffer, so the datagram fails with EMSGSIZE.
    wmem = int(Path("/proc/sys/net/core/wmem_default").read_text())
    size = max(300 * 1024 + 1, 2 * wmem)
    big = ("0123456789abcdef" * (size // 16 + 1))[:size]
    sender = JournalSender(journal.path)
    assert sender.send_fields([("MESSAGE", big), ("PRIORITY", "6"), ("IFNAME", "macvtap0")])
    msg, fds = journal.recv()
    assert msg == b""
    assert len(fds) == 1
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        length = os.fstat(fd).st_size
        data = os.pread(fd, length, 0)
    finally:
        os.close(fd)
    assert parse(data) == [("MESSAGE", big.encode()), ("PRIORITY", b"6"), ("IFNAME", b"macvtap0")]


def test_send_failure_returns_false() -> None:
    with tempfile.TemporaryDirectory(prefix="rxf-") as tmp:
        sender = JournalSender(os.path.join(tmp, "absent"))
        assert sender.send_fields([("MESSAGE", "x")]) is False


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("domain", "DOMAIN"),
        ("trust-source", "TRUST_SOURCE"),
        ("_hidden", "HIDDEN"),
        ("__", None),
        ("9lives", "F9LIVES"),
        ("mac.addr", "MAC_ADDR"),
        ("ünï", "N_"),
        ("x" * 80, "X" * 64),
    ],
)
def test_field_name(key: str, expected: str | None) -> None:
    assert field_name(key) == expected


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        ("critical", 2),
        ("error", 3),
        ("exception", 3),
        ("warning", 4),
        ("warn", 4),
        ("notice", 5),
        ("info", 6),
        ("debug", 7),
        ("INFO", 6),
        ("bogus", 6),
        (None, 6),
    ],
)
def test_priority_for(level: str | None, prio: int) -> None:
    assert priority_for(level) == prio


def test_render_line() -> None:
    line = render_line(
        {"event": "nic_synced", "level": "info", "domain": "web1", "n": 2, "note": "a b"}
    )
    assert line == 'nic_synced domain=web1 n=2 note="a b"'


def _configure(renderer: JournalRenderer, out: Path) -> structlog.typing.FilteringBoundLogger:
    structlog.configure(
        processors=[structlog.processors.add_log_level, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        logger_factory=structlog.WriteLoggerFactory(out.open("w")),
        cache_logger_on_first_use=False,
    )
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger


@pytest.fixture
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("reset_structlog")
def test_structlog_renderer_sends_fields_and_prints_nothing(
    journal: Journal, tmp_path: Path
) -> None:
    out = tmp_path / "stderr.txt"
    log = _configure(JournalRenderer(JournalSender(journal.path)), out)
    log.warning(
        "rx_filter_set",
        domain="web1",
        alias="ua-net0",
        ifname="macvtap3",
        action="set",
        field="mac_table",
        old=["52:54:00:00:00:01"],
        new=["52:54:00:00:00:01", "01:00:5e:00:00:fb"],
        trust_source="metadata",
        retries=0,
        **{"vlan-id": None},
    )
    entry = dict(journal.entry())
    assert entry == {
        "MESSAGE": (
            b"rx_filter_set domain=web1 alias=ua-net0 ifname=macvtap3 action=set"
            b' field=mac_table old=["52:54:00:00:00:01"]'
            b' new=["52:54:00:00:00:01","01:00:5e:00:00:fb"]'
            b" trust_source=metadata retries=0 vlan-id=null"
        ),
        "PRIORITY": b"4",
        "SYSLOG_IDENTIFIER": b"rxfilterd",
        "EVENT": b"rx_filter_set",
        "DOMAIN": b"web1",
        "ALIAS": b"ua-net0",
        "IFNAME": b"macvtap3",
        "ACTION": b"set",
        "FIELD": b"mac_table",
        "OLD": b'["52:54:00:00:00:01"]',
        "NEW": b'["52:54:00:00:00:01","01:00:5e:00:00:fb"]',
        "TRUST_SOURCE": b"metadata",
        "RETRIES": b"0",
        "VLAN_ID": b"null",
    }
    json.loads(entry["NEW"])
    assert out.read_text() == ""
    assert journal.empty()


@pytest.mark.usefixtures("reset_structlog")
def test_a_decision_is_filed_under_its_name_as_event_and_action(
    journal: Journal, tmp_path: Path
) -> None:
    # README: `journalctl -u rxfilterd DOMAIN=web1 ACTION=applied`.
    _configure(JournalRenderer(JournalSender(journal.path)), tmp_path / "o")
    change = MacChange("52:54:00:00:00:01", "52:54:00:00:00:02")
    Sinks().decide(
        Decision(
            libvirt="host",
            event="applied",
            domain="web1",
            alias="net0",
            ifname="macvtap3",
            change=change,
            cause="event",
        )
    )
    entry = dict(journal.entry())
    assert entry == {
        "MESSAGE": (
            b"applied libvirt=host domain=web1 alias=net0 ifname=macvtap3 field=mac"
            b" old=52:54:00:00:00:01 new=52:54:00:00:00:02 cause=event"
        ),
        "PRIORITY": b"6",
        "SYSLOG_IDENTIFIER": b"rxfilterd",
        "EVENT": b"applied",
        "ACTION": b"applied",
        "LIBVIRT": b"host",
        "DOMAIN": b"web1",
        "ALIAS": b"net0",
        "IFNAME": b"macvtap3",
        "FIELD": b"mac",
        "OLD": b"52:54:00:00:00:01",
        "NEW": b"52:54:00:00:00:02",
        "CAUSE": b"event",
    }
    # A line that is no decision has no ACTION.
    structlog.get_logger().info("domain event", domain="web1")
    assert "ACTION" not in dict(journal.entry())


@pytest.mark.usefixtures("reset_structlog")
def test_structlog_priorities_and_reserved_names(journal: Journal, tmp_path: Path) -> None:
    log = _configure(JournalRenderer(JournalSender(journal.path)), tmp_path / "o")
    log.debug("d")
    assert dict(journal.entry())["PRIORITY"] == b"7"
    log.error("e", message="user text", priority=1)
    entry = dict(journal.entry())
    assert entry["PRIORITY"] == b"3"
    assert entry["EXTRA_MESSAGE"] == b"user text"
    assert entry["EXTRA_PRIORITY"] == b"1"


@pytest.mark.usefixtures("reset_structlog")
def test_structlog_exception_in_binary_field(journal: Journal, tmp_path: Path) -> None:
    log = _configure(JournalRenderer(JournalSender(journal.path)), tmp_path / "o")
    try:
        raise RuntimeError("netlink went away")
    except RuntimeError:
        log.exception("reconcile_failed", domain="web1")
    msg, _ = journal.recv()
    assert b"EXCEPTION\n" in msg
    entry = dict(parse(msg))
    assert entry["MESSAGE"] == b"reconcile_failed domain=web1"
    assert entry["PRIORITY"] == b"3"
    assert b"Traceback" in entry["EXCEPTION"]
    assert entry["EXCEPTION"].rstrip().endswith(b"RuntimeError: netlink went away")


@pytest.mark.usefixtures("reset_structlog")
def test_structlog_falls_back_to_logger_when_journal_is_gone(tmp_path: Path) -> None:
    out = tmp_path / "stderr.txt"
    sender = JournalSender(str(tmp_path / "no-journal"))
    log = _configure(JournalRenderer(sender), out)
    log.info("nic_synced", domain="web1")
    assert out.read_text() == "nic_synced domain=web1\n"


def test_under_journal(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
        assert not under_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream)
        assert not under_journal({"JOURNAL_STREAM": "garbage"}, stream)
        assert not under_journal({}, stream)
    assert not under_journal({"JOURNAL_STREAM": "1:2"}, sys.stderr)
