"""The plan: from guest filter, host state and policy, the changes to make.

Pure and deterministic. Applying a plan and planning again from the resulting host
state yields an empty plan.

Where libvirt syncs the NIC itself (trusted, actual type direct), every host field
libvirt writes gets the value libvirt would write, so the end state does not depend on
which of the two wrote last:
- MAC: the guest's main MAC.
- promiscuous: guest promiscuous OR any VLAN entry at all.
- allmulti: on for multicast "all" or an overflowed list, off for "normal" and "none".
- multicast list: mirrored from the guest, even when it overflowed and arrives empty.
Elsewhere an overflowed list is left alone, a table of only VID 0 never makes the
host promiscuous, and VLAN ids follow the `[sync] vlan` policy (see vlan_handling).

Notes name what the host cannot do as the guest asked; the texts are stable per NIC
(no ids or MACs in them), so the daemon's once-per-NIC logging stays once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rxfilterd.guest_filter import GuestFilter
from rxfilterd.host_state import HostState
from rxfilterd.policy import Field, SyncPolicy

HostField = Literal["mac", "promiscuous", "allmulti", "multicast", "unicast"]


@dataclass(frozen=True)
class MacChange:
    old: str
    new: str
    field: HostField = "mac"


@dataclass(frozen=True)
class FlagChange:
    field: Literal["promiscuous", "allmulti"]
    old: bool
    new: bool


@dataclass(frozen=True)
class AddressListChange:
    """Fdb entries to add and remove; `old`/`new` are the lists before and after."""

    field: Literal["multicast", "unicast"]
    add: frozenset[str]
    remove: frozenset[str]
    old: frozenset[str]
    new: frozenset[str]


Change = MacChange | FlagChange | AddressListChange


@dataclass(frozen=True)
class Refusal:
    """A change the guest wants that the policy does not allow."""

    field: Field
    value: str
    reason: str


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    refusals: tuple[Refusal, ...]
    # Things the host cannot do for this NIC (said once per NIC by the caller).
    notes: tuple[str, ...]


@dataclass
class _Draft:
    """A plan being made, one part of the filter at a time."""

    guest: GuestFilter
    host: HostState
    policy: SyncPolicy
    libvirt_syncs: bool
    changes: list[Change] = dataclasses.field(default_factory=list)
    refusals: list[Refusal] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def change_or_refuse(self, part: Field, changes: list[Change], reason: str) -> None:
        """CHANGES go in if PART is in the policy's fields; else one refusal says them."""
        if part in self.policy.fields:
            self.changes.extend(changes)
        elif changes:
            self.refusals.append(Refusal(part, _describe(changes), reason))


def make_plan(
    guest: GuestFilter, host: HostState, policy: SyncPolicy, *, libvirt_syncs: bool
) -> Plan:
    draft = _Draft(guest, host, policy, libvirt_syncs)
    _plan_mac(draft)
    _plan_promiscuous(draft)
    _plan_multicast(draft)
    _plan_unicast(draft)
    return Plan(tuple(draft.changes), tuple(draft.refusals), tuple(draft.notes))


def _plan_mac(draft: _Draft) -> None:
    guest, host, policy = draft.guest, draft.host, draft.policy
    if guest.main_mac == host.mac:
        return
    if "mac" not in policy.fields:
        draft.refusals.append(Refusal("mac", guest.main_mac, "mac is not in sync fields"))
    elif not policy.mac_allowed(guest.main_mac):
        draft.refusals.append(Refusal("mac", guest.main_mac, "not in mac_allow"))
    else:
        draft.changes.append(MacChange(host.mac, guest.main_mac))


def _plan_promiscuous(draft: _Draft) -> None:
    """The sum of what each allowed part of the guest filter asks for."""
    guest, host, policy, libvirt_syncs = draft.guest, draft.host, draft.policy, draft.libvirt_syncs
    allowed = policy.fields
    vlan_promisc, vlan_text = vlan_handling(host, policy, libvirt_syncs=libvirt_syncs)
    # Noted where the outcome is not what `[sync] vlan` alone would suggest.
    if libvirt_syncs:
        vlan_wants = vlan_noted = bool(guest.vlan_table)
    else:
        # VID 0 (priority tags) is in every 8021q guest's table and needs nothing.
        vids = guest.vlan_table - {0}
        vlan_wants = vlan_promisc and bool(vids)
        vlan_noted = bool(vids) and policy.vlan != "promiscuous"
    if vlan_noted:
        draft.notes.append(vlan_text)
    reasons: dict[Field, bool] = {
        "promiscuous": guest.promiscuous,
        "vlan": vlan_wants,
        # Only a passthru macvtap can receive other unicast MACs at all.
        "unicast": host.mode == "passthru" and _unicast_wide(guest) and not libvirt_syncs,
    }
    want_all = any(reasons.values())
    want_promisc = any(on for part, on in reasons.items() if part in allowed)
    if "promiscuous" not in allowed:
        # Without "promiscuous" the guest may widen the filter for an allowed part but
        # never narrow what the host set.
        want_promisc = want_promisc or host.promiscuous
    if want_promisc != host.promiscuous:
        draft.changes.append(FlagChange("promiscuous", host.promiscuous, want_promisc))
    if want_all != want_promisc:
        part: Field = next(
            (p for p, on in reasons.items() if on and p not in allowed), "promiscuous"
        )
        value = "on" if want_all else "off"
        draft.refusals.append(
            Refusal(part, f"promiscuous {value}", f"{part} is not in sync fields")
        )


def _plan_multicast(draft: _Draft) -> None:
    """allmulti and the list."""
    guest, host = draft.guest, draft.host
    want_allmulti = guest.multicast == "all" or guest.multicast_overflow
    mc_changes: list[Change] = []
    if want_allmulti != host.allmulti:
        mc_changes.append(FlagChange("allmulti", host.allmulti, want_allmulti))
    # An overflowed list arrives empty: mirroring it would strip every group. libvirt
    # mirrors it anyway (allmulti covers the loss), so where it syncs, we do too.
    mirror = draft.libvirt_syncs or not guest.multicast_overflow
    if mirror:
        add = guest.multicast_table - host.multicast - host.multicast_host
        remove = host.multicast - guest.multicast_table
        if add or remove:
            new = (host.multicast | add) - remove
            mc_changes.append(AddressListChange("multicast", add, remove, host.multicast, new))
    draft.change_or_refuse("multicast", mc_changes, "multicast not in fields")


def _plan_unicast(draft: _Draft) -> None:
    """Only passthru macvtaps take extra unicast fdb entries.

    libvirt never syncs the table, so this holds for every trusted NIC.
    """
    guest, host = draft.guest, draft.host
    passthru = host.mode == "passthru"
    if (guest.unicast_table or _unicast_wide(guest)) and not passthru:
        draft.notes.append(unicast_handling(host, libvirt_syncs=draft.libvirt_syncs))
    if passthru and not guest.unicast_overflow and guest.unicast_table != host.unicast:
        uc = _list_change("unicast", host.unicast, guest.unicast_table)
        draft.change_or_refuse("unicast", [uc], "unicast not in fields")


def _unicast_wide(guest: GuestFilter) -> bool:
    return guest.unicast == "all" or guest.unicast_overflow


def vlan_handling(host: HostState, policy: SyncPolicy, *, libvirt_syncs: bool) -> tuple[bool, str]:
    """Whether guest VLAN ids other than 0 make HOST promiscuous, and the note saying so.

    Pure, from the host alone, so `explain` (which never queries a guest) and the
    daemon's notes say the same thing.
    """
    if libvirt_syncs:
        return True, (
            "vlan: promiscuous for any VLAN entry, VID 0 included: libvirt syncs this NIC"
            " itself and rxfilterd writes what libvirt writes"
        )
    if policy.vlan == "ignore":
        return False, "vlan: VLAN ids not applied ([sync] vlan = ignore)"
    if policy.vlan == "promiscuous":
        return True, "vlan: VLAN ids other than 0 make it promiscuous ([sync] vlan = promiscuous)"
    lower = host.lower or "?"
    if host.lower_vlan_filter == "none":
        return False, (
            f"vlan: VLAN ids pass without promiscuous: lower device {lower} has no VLAN"
            " filter, so tagged frames reach the macvtap by MAC (QEMU drops ids the guest"
            " did not ask for)"
        )
    why = {
        "hardware": f"lower device {lower} filters VLAN ids in hardware (rx-vlan-filter on)",
        "bridge": f"lower device {lower} is a bridge with vlan_filtering",
        "unknown": f"cannot tell whether lower device {lower} filters VLAN ids",
    }[host.lower_vlan_filter]
    return True, (
        f"vlan: promiscuous instead of VLAN ids: {why}, and no kernel interface adds"
        " an id to it for a macvtap without taking the guest's tagged frames"
    )


def unicast_handling(host: HostState, *, libvirt_syncs: bool) -> str:
    """How the guest's unicast table and unicast mode land on HOST (a note)."""
    if host.mode == "passthru":
        if libvirt_syncs:
            return (
                "unicast: table -> fdb entries; unicast 'all'/overflow not applied"
                " (libvirt owns promiscuous for this NIC)"
            )
        return "unicast: table -> fdb entries; unicast 'all'/overflow -> promiscuous"
    return (
        f"unicast: table not applied: {host.mode or 'non-passthru'} macvtaps cannot filter"
        " unicast (only passthru takes extra unicast addresses)"
    )


def handling(host: HostState, policy: SyncPolicy, *, libvirt_syncs: bool) -> tuple[str, ...]:
    """What `explain` says about HOST's VLAN and unicast handling."""
    return (
        vlan_handling(host, policy, libvirt_syncs=libvirt_syncs)[1],
        unicast_handling(host, libvirt_syncs=libvirt_syncs),
    )


def host_after(host: HostState, changes: Sequence[Change]) -> HostState:
    """The host state once CHANGES have landed (what a re-read would show)."""
    for change in changes:
        if isinstance(change, MacChange):
            host = dataclasses.replace(host, mac=change.new)
        elif isinstance(change, FlagChange) and change.field == "promiscuous":
            host = dataclasses.replace(host, promiscuous=change.new)
        elif isinstance(change, FlagChange):
            host = dataclasses.replace(host, allmulti=change.new)
        elif change.field == "multicast":
            host = dataclasses.replace(
                host, multicast=(host.multicast | change.add) - change.remove
            )
        else:
            host = dataclasses.replace(host, unicast=(host.unicast | change.add) - change.remove)
    return host


def _list_change(
    field: Literal["multicast", "unicast"], old: frozenset[str], new: frozenset[str]
) -> AddressListChange:
    return AddressListChange(field, add=new - old, remove=old - new, old=old, new=new)


def _describe(changes: list[Change]) -> str:
    return "; ".join(describe_change(change) for change in changes)


def describe_change(change: Change) -> str:
    if isinstance(change, AddressListChange):
        parts = [f"+{mac}" for mac in sorted(change.add)]
        parts += [f"-{mac}" for mac in sorted(change.remove)]
        return f"{change.field} " + " ".join(parts)
    return f"{change.field} {change.old} -> {change.new}"
