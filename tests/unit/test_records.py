"""Decisions and NIC state: the one schema every sink renders them from."""

from __future__ import annotations

import dataclasses

import pytest

from rxfilterd.guest_filter import GuestFilter
from rxfilterd.host_state import HostState
from rxfilterd.plan import AddressListChange, FlagChange, MacChange, Refusal
from rxfilterd.records import EXPLAIN_COLUMNS, Decision, NicRow, NicState, format_table

MAC0 = "52:54:00:10:00:01"
MAC1 = "52:54:00:aa:bb:cc"
GROUP = "33:33:00:00:00:fb"
ROW = NicRow(
    "host", "web1", "net0", "macvtap3", "", "virtio", "ethernet", "yes", "port", "sync", "trusted"
)
BASE = Decision(
    libvirt="host", event="applied", domain="web1", alias="net0", ifname="macvtap3", time=1.5
)


def test_records_are_frozen() -> None:
    for record, name in ((BASE, "event"), (NicState(ROW), "result"), (ROW, "action")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, "x")


def test_a_change_lists_field_old_new_and_for_a_list_what_it_added_and_removed() -> None:
    mac = dataclasses.replace(BASE, change=MacChange(MAC0, MAC1), cause="event")
    assert list(mac.fields().items()) == [
        ("libvirt", "host"),
        ("domain", "web1"),
        ("alias", "net0"),
        ("ifname", "macvtap3"),
        ("field", "mac"),
        ("old", MAC0),
        ("new", MAC1),
        ("cause", "event"),
    ]
    group = frozenset({GROUP})
    listed = AddressListChange("multicast", group, frozenset(), frozenset(), group)
    fields = dataclasses.replace(BASE, change=listed).fields()
    assert (fields["old"], fields["new"], fields["added"], fields["removed"]) == (
        [],
        [GROUP],
        [GROUP],
        [],
    )
    assert mac.payload() == {"event": "applied", "time": 1.5, **mac.fields()}
    assert "action" not in mac.payload()  # `action` is a NIC's verdict, not a decision's name


def test_a_failed_apply_says_where_why_and_when_it_is_retried() -> None:
    failed = dataclasses.replace(
        BASE,
        event="failed",
        level="error",
        change=FlagChange("promiscuous", False, True),
        stage="apply",
        reason="EPERM",
        error="macvtap3: set promiscuous failed",
        pending=("multicast",),
        cause="event",
        attempt=1,
        retry_in=1.0,
    )
    assert list(failed.fields())[4:] == [
        "field",
        "old",
        "new",
        "stage",
        "reason",
        "error",
        "pending",
        "cause",
        "attempt",
        "retry_in",
    ]
    assert failed.fields()["pending"] == ["multicast"]


def test_every_kind_carries_its_own_fields() -> None:
    refused = dataclasses.replace(
        BASE, event="refused", refusal=Refusal("mac", MAC1, "not in mac_allow")
    )
    assert refused.fields() == {
        "libvirt": "host",
        "domain": "web1",
        "alias": "net0",
        "ifname": "macvtap3",
        "field": "mac",
        "value": MAC1,
        "reason": "not in mac_allow",
    }
    drift = dataclasses.replace(
        BASE, event="drift", drift=(FlagChange("promiscuous", True, False),)
    )
    assert {k: drift.fields()[k] for k in ("fields", "found", "expected")} == {
        "fields": ["promiscuous"],
        "found": {"promiscuous": True},
        "expected": {"promiscuous": False},
    }
    skipped = dataclasses.replace(
        BASE,
        event="skipped",
        reason="untrusted",
        trust="no",
        trust_source="port",
        trust_note="network default now resolves yes",
    )
    assert list(skipped.fields())[4:] == ["reason", "trust", "trust_source", "trust_note"]
    syncing = dataclasses.replace(
        BASE, event="syncing", policy="sync", fields_synced=("mac",), libvirt_writes=("mac",)
    )
    assert syncing.fields()["fields"] == ["mac"] and syncing.fields()["policy"] == "sync"
    # Whether anything was in flight is part of every abandoned line, even when nothing was.
    abandoned = dataclasses.replace(
        BASE, event="abandoned", stage="query", applied=(), pending=(), cause="event"
    )
    assert abandoned.fields()["in_flight"] is None
    assert (abandoned.fields()["applied"], abandoned.fields()["pending"]) == ([], [])
    assert "in_flight" not in BASE.fields()


def test_nic_state_payload_is_the_explain_row_and_the_last_sync() -> None:
    assert NicState(ROW).payload() == {
        **dict(zip(EXPLAIN_COLUMNS, dataclasses.astuple(ROW), strict=True)),
        "guest": None,
        "host": None,
        "last_sync": None,
        "cause": None,
        "result": "not synced",
    }
    guest = GuestFilter(
        "net0", MAC1, False, "normal", "normal", "normal", True, False, False,
        frozenset({GROUP}), frozenset(), frozenset({0}),
    )  # fmt: skip
    host = HostState("macvtap3", 7, "bridge", MAC1, False, False, frozenset({GROUP}),
                     frozenset(), frozenset(), "eth0", "none")  # fmt: skip
    state = NicState(ROW, guest=guest, host=host, last_sync=2.5, cause="retry", result="ok")
    synced = state.payload()
    assert synced["guest"] == guest.summary() and synced["host"] == host.summary()
    assert (synced["last_sync"], synced["cause"], synced["result"]) == (2.5, "retry", "ok")
    assert synced["action"] == "sync"


def test_explain_columns_and_table() -> None:
    assert EXPLAIN_COLUMNS == (
        "libvirt",
        "domain",
        "alias",
        "ifname",
        "current_mac",
        "model",
        "type",
        "trust",
        "trust_source",
        "action",
        "reason",
    )
    assert list(ROW.fields()) == list(EXPLAIN_COLUMNS)
    table = format_table(("domain", "alias"), [{"domain": "web1", "alias": "net0"}])
    assert table.splitlines() == ["DOMAIN  ALIAS", "web1    net0"]
