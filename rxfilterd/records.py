"""Records that cross module boundaries: decisions and NIC state, and their one schema.

No I/O. Every sink renders these records from here: the log line (and the journal's
fields, each key upper-cased), the MQTT payloads, `explain` and `rxfilterd fleet`. The
column orders of every table are here too, beside the records they list.

Two words, one meaning each: a decision's name is its `event` (applied, skipped, ...);
`action` is a NIC's verdict, `sync` or `skip`. (The journal also files a decision's
name under ACTION, as it always has: `journalctl ACTION=applied`; see journal.py.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias, get_args

if TYPE_CHECKING:  # annotations only: `rxfilterd fleet` renders its table without them
    from rxfilterd.guest_filter import GuestFilter
    from rxfilterd.host_state import HostState
    from rxfilterd.nic import Action
    from rxfilterd.plan import Change, Refusal

# A value as JSON has it: what every rendering of a record is made of.
JsonValue: TypeAlias = (
    str | int | float | bool | Sequence["JsonValue"] | Mapping[str, "JsonValue"] | None
)
JsonObject: TypeAlias = dict[str, JsonValue]

# What the daemon decided about a NIC; docs/mqtt.md says what each one carries.
DecisionEvent = Literal[
    "syncing",
    "skipped",
    "applied",
    "would-apply",
    "refused",
    "rejected",
    "drift",
    "failed",
    "abandoned",
]
DECISION_EVENTS: frozenset[str] = frozenset(get_args(DecisionEvent))
Level = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, kw_only=True)
class Decision:
    """One decision about one NIC. Fields left None are not part of it.

    The fields are declared in the order every rendering lists them (see `fields`).
    """

    event: DecisionEvent
    # The connection the NIC's domain lives on: "host", or "pod/<name>" for a pod's libvirt.
    libvirt: str
    domain: str
    alias: str
    ifname: str | None
    level: Level = "info"
    time: float = dataclasses.field(default_factory=time.time)
    # applied, would-apply, failed (at apply): the change, as field, old, new (and
    # added, removed for a list).
    change: Change | None = None
    # refused: the field and what the guest asked for (and the reason).
    refusal: Refusal | None = None
    # drift: the changes the resync found needed, as fields, found, expected.
    drift: tuple[Change, ...] | None = None
    # failed, abandoned: where the sync was.
    stage: str | None = None
    # syncing, skipped, failed: why (failed: a short stable word, the errno's name).
    reason: str | None = None
    # failed, rejected: the error.
    error: str | None = None
    # syncing, skipped: the trust resolved and where from, and the policy in force.
    trust: str | None = None
    trust_source: str | None = None
    trust_note: str | None = None
    policy: str | None = None
    fields_synced: tuple[str, ...] | None = None
    libvirt_writes: tuple[str, ...] | None = None
    # abandoned: what the sync had written, sent without an answer, and had left.
    applied: tuple[str, ...] | None = None
    in_flight: str | None = None
    # abandoned, failed (at apply): the changes not tried yet.
    pending: tuple[str, ...] | None = None
    # What started the sync (event, start, resync, retry, ...).
    cause: str | None = None
    # failed: the how-manieth attempt in a row, and the wait before the next.
    attempt: int | None = None
    retry_in: float | None = None

    def fields(self) -> JsonObject:
        """The decision's fields by name, in order: the log line's keys after the event.

        Not the event, time or level (each sink has its own place for those).
        """
        out: JsonObject = {
            "libvirt": self.libvirt,
            "domain": self.domain,
            "alias": self.alias,
            "ifname": self.ifname,
        }
        if self.change is not None:
            out.update(change_fields(self.change))
        if self.refusal is not None:
            refusal = self.refusal
            out.update(field=refusal.field, value=refusal.value, reason=refusal.reason)
        if self.drift is not None:
            drift = [change_fields(c) for c in self.drift]
            out["fields"] = [str(f["field"]) for f in drift]
            out["found"] = {str(f["field"]): f["old"] for f in drift}
            out["expected"] = {str(f["field"]): f["new"] for f in drift}
        for name in _PLAIN:
            value = getattr(self, name)
            # Whether anything was in flight is part of every abandoned line.
            if value is not None or (name == "in_flight" and self.event == "abandoned"):
                out[_KEYS.get(name, name)] = list(value) if isinstance(value, tuple) else value
        return out

    def payload(self) -> JsonObject:
        """The whole record: event and time, then its fields (MQTT's event message)."""
        return {"event": self.event, "time": self.time, **self.fields()}


# Decision attributes rendered as they are, in declaration order, and the one whose
# key differs from the attribute's name (`fields` would shadow the method).
_GROUPED = (
    *("event", "libvirt", "domain", "alias", "ifname"),
    *("level", "time", "change", "refusal", "drift"),
)
_PLAIN = tuple(f.name for f in dataclasses.fields(Decision) if f.name not in _GROUPED)
_KEYS = {"fields_synced": "fields"}


def change_fields(change: Change) -> JsonObject:
    """A change as a decision lists it: field, old, new (and added, removed for a list)."""
    # Imported here, not above: `rxfilterd fleet` loads this module for its columns,
    # and plan with what it imports is a tenth of that command's start-up (measured).
    from rxfilterd.plan import AddressListChange

    if isinstance(change, AddressListChange):
        return {
            "field": change.field,
            "old": sorted(change.old),
            "new": sorted(change.new),
            "added": sorted(change.add),
            "removed": sorted(change.remove),
        }
    return {"field": change.field, "old": change.old, "new": change.new}


@dataclass(frozen=True)
class NicRow:
    """One NIC as `explain` lists it: trust, verdict and why (no guest query needed)."""

    libvirt: str
    domain: str
    alias: str
    ifname: str
    current_mac: str
    model: str
    type: str
    trust: str
    trust_source: str
    # The verdict: sync or skip (nic.classify), and why.
    action: Action
    reason: str

    def fields(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in EXPLAIN_COLUMNS}


# The `explain` columns (and `explain --json` keys), in order.
EXPLAIN_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(NicRow))


# A NIC wherever it lives: (libvirt, domain, alias). A domain's name is unique only
# within its connection (every KubeVirt pod may hold a domain of the same name).
NicKey: TypeAlias = tuple[str, str, str]


@dataclass(frozen=True)
class NicState:
    """One NIC's latest state, as the fleet view retains it: its row and its last sync."""

    row: NicRow
    # The rest by name only: five optional fields in a row are too easy to shift.
    _: dataclasses.KW_ONLY
    # What the guest asked for and what the macvtap holds after the last sync (None
    # until the first, and for a NIC that is not synced).
    guest: GuestFilter | None = None
    host: HostState | None = None
    last_sync: float | None = None
    # What started the last sync: start, event, resync, retry, reset, reconnect, ...
    cause: str | None = None
    # pending, ok, dry-run, failed: <error>, rejected: <error>, stopped: <why>, not synced
    result: str = "not synced"

    @property
    def key(self) -> NicKey:
        return (self.row.libvirt, self.row.domain, self.row.alias)

    def payload(self) -> JsonObject:
        """The retained MQTT payload's fields (docs/mqtt.md)."""
        return {
            **self.row.fields(),
            "guest": None if self.guest is None else self.guest.summary(),
            "host": None if self.host is None else self.host.summary(),
            "last_sync": self.last_sync,
            "cause": self.cause,
            "result": self.result,
        }


# `rxfilterd fleet`: its columns, in order, and the NIC state key each shows (host and
# status come from the topic and the host's status; mac is the host's MAC).
FLEET_COLUMNS: tuple[str, ...] = (
    "host",
    "status",
    "libvirt",
    "domain",
    "alias",
    "ifname",
    "trust",
    "trust_source",
    "action",
    "mac",
    "result",
    "last_sync",
)


def format_table(columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> str:
    """A plain text table: upper-case headers, columns as wide as their widest cell."""
    table = list(rows)
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in table:
        lines.append("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)
