"""Parsing query-rx-filter answers, hostile ones included."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rxfilterd.guest_filter import GuestFilter, GuestFilterError, parse_entry, parse_reply
from tests.support.qmp import rx_filter_entry, rx_filter_reply


def entry(**overrides: Any) -> dict[str, Any]:
    base = {
        "main-mac": "52:54:00:12:34:56",
        "vlan-table": [0],
        "multicast-table": ["33:33:00:00:00:01", "01:00:5E:00:00:01"],
    }
    return rx_filter_entry(**{**base, **overrides})


def reply(*entries: dict[str, Any]) -> str:
    return rx_filter_reply(*entries)


def test_parses_a_real_answer() -> None:
    got = parse_reply(reply(entry(), entry(name="net1")), "net0")
    assert got == GuestFilter(
        name="net0",
        main_mac="52:54:00:12:34:56",
        promiscuous=False,
        multicast="normal",
        unicast="normal",
        vlan="normal",
        broadcast_allowed=False,
        multicast_overflow=False,
        unicast_overflow=False,
        multicast_table=frozenset({"33:33:00:00:00:01", "01:00:5e:00:00:01"}),
        unicast_table=frozenset(),
        vlan_table=frozenset({0}),
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"main-mac": "52:54:00:12:34"}, "main-mac"),
        ({"main-mac": "01:00:5e:00:00:01"}, "not a unicast"),
        ({"main-mac": "00:00:00:00:00:00"}, "not a unicast"),
        ({"main-mac": 42}, "main-mac: expected str"),
        ({"promiscuous": "yes"}, "promiscuous: expected bool"),
        ({"multicast": "some"}, "multicast: 'some' is not one of"),
        ({"vlan-table": [4096]}, "vlan-table[0]"),
        ({"vlan-table": [True]}, "vlan-table[0]"),
        ({"vlan-table": "0"}, "vlan-table: expected list"),
        ({"multicast-table": ["52:54:00:00:00:01"]}, "not a multicast"),
        ({"unicast-table": ["33:33:00:00:00:01"]}, "not a unicast"),
        ({"multicast-table": ["zz:zz:zz:zz:zz:zz"]}, "multicast-table[0]"),
        ({"multicast-table": [f"01:00:5e:00:00:{i:02x}" for i in range(65)]}, "over 64"),
        ({"vlan-table": [*range(4096), 0]}, "over 4096"),
        (
            {
                "multicast-table": [f"01:00:5e:00:00:{i:02x}" for i in range(40)],
                "unicast-table": [f"52:54:00:00:00:{i:02x}" for i in range(30)],
            },
            "70 entries, over 64",
        ),
        ({"name": ""}, "name"),
    ],
)
def test_rejects_bad_fields(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(GuestFilterError) as err:
        parse_entry(entry(**overrides))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "key",
    [k for k in entry() if k != "name"],
)
def test_every_field_is_required(key: str) -> None:
    raw = entry()
    del raw[key]
    with pytest.raises(GuestFilterError, match=f"{key}: missing"):
        parse_entry(raw)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"return": {}}', "no 'return' list"),
        ('{"error": {"class": "GenericError", "desc": "Invalid net client name"}}', "Invalid"),
        (reply(), "0 entries"),
        (reply(entry(), entry()), "2 entries"),
        (reply(entry(name="net1")), "0 entries"),
        ("x" * 300_000, "over"),
    ],
)
def test_rejects_bad_replies(text: str, message: str) -> None:
    with pytest.raises(GuestFilterError, match=message):
        parse_reply(text, "net0")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(entry())), json_values))
def test_hostile_fields_give_a_clear_error_or_a_valid_filter(mutation: dict[str, Any]) -> None:
    raw = entry(**mutation)
    try:
        got = parse_entry(raw)
    except GuestFilterError as exc:
        assert str(exc)
        return
    # Whatever got through is within bounds.
    assert len(got.multicast_table) + len(got.unicast_table) <= 64
    assert all(0 <= vid <= 4095 for vid in got.vlan_table)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=6000), max_size=300))
def test_vlan_tables_are_bounded(vids: list[int]) -> None:
    try:
        got = parse_entry(entry(**{"vlan-table": vids}))
    except GuestFilterError:
        assert any(not 0 <= v <= 4095 for v in vids)
    else:
        assert got.vlan_table == frozenset(vids)


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(GuestFilterError):
        parse_reply(data, "net0")
