"""device_multicast: one device's lines out of /proc/net/dev_mcast."""

from __future__ import annotations

from rxfilterd.macvtap_read import device_multicast


def line(ifindex: int, name: str, users: int, global_users: int, mac_hex: str) -> str:
    # The kernel's format (net/core/dev_addr_lists.c, dev_mc_seq_show).
    return f"{ifindex:<4d} {name:<15s} {users:<5d} {global_users:<5d} {mac_hex}\n"


def reference(text: str, ifindex: int) -> tuple[frozenset[str], frozenset[str]]:
    """The plain way: split every line."""
    static: set[str] = set()
    joined: set[str] = set()
    for row in text.splitlines():
        fields = row.split()
        if len(fields) == 5 and fields[0] == str(ifindex):
            mac = ":".join(fields[4][i : i + 2] for i in range(0, 12, 2))
            (static if fields[3] != "0" else joined).add(mac)
    return frozenset(static), frozenset(joined)


def table() -> str:
    rows = [line(1, "lo", 1, 0, "010000000001")]
    for ifindex in (5, 15, 50, 150, 1500, 9999, 10000, 10001, 123456):
        rows.append(line(ifindex, f"m{ifindex}", 1, 0, "333300000001"))
        rows.append(line(ifindex, f"m{ifindex}", 1, 1, f"3333ff{ifindex % 0xFFFFFF:06x}"))
        rows.append(line(ifindex, f"m{ifindex}", 2, 0, "01005e000001"))
    return "".join(rows)


def test_each_device_gets_exactly_its_own_lines() -> None:
    text = table()
    for ifindex in (1, 5, 15, 50, 150, 1500, 9999, 10000, 10001, 123456):
        assert device_multicast(text, ifindex) == reference(text, ifindex), ifindex


def test_static_and_joined_are_told_apart() -> None:
    static, joined = device_multicast(table(), 15)
    assert static == {"33:33:ff:00:00:0f"}
    assert joined == {"33:33:00:00:00:01", "01:00:5e:00:00:01"}


def test_a_prefix_of_another_index_is_not_a_match() -> None:
    # 1 must not pick up 15's or 150's lines, nor 1000's ("1000" then a space).
    text = table() + line(1000, "m1000", 1, 1, "3333ff0003e8")
    assert device_multicast(text, 1) == (frozenset(), frozenset({"01:00:00:00:00:01"}))
    assert device_multicast(text, 100) == (frozenset(), frozenset())


def test_first_and_last_lines_without_a_final_newline() -> None:
    text = line(7, "a", 1, 1, "3333ff000007") + line(8, "b", 1, 1, "3333ff000008").rstrip("\n")
    assert device_multicast(text, 7)[0] == {"33:33:ff:00:00:07"}
    assert device_multicast(text, 8)[0] == {"33:33:ff:00:00:08"}
    assert device_multicast("", 7) == (frozenset(), frozenset())
