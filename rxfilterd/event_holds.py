"""Which NICs' filter events need no hand-over to the event loop, for one connection.

A guest changing its filter non-stop makes QEMU emit hundreds of NIC_RX_FILTER_CHANGED
a second (libvirt's own handler queries a trusted NIC on each, which re-arms QEMU's
one-shot event at once). Each hand-over from libvirt's event thread wakes the event
loop, and all but the first of a NIC's events before its next query add nothing.
Thread-safe; no I/O.
"""

from __future__ import annotations

import threading
import time

# A held NIC still has an event handed over this often while its events keep coming:
# the worker's follow-up waits until a NIC's kicks pause for 20 ms (Timings.
# follow_up_settle), so it must go on seeing kicks while the guest is still changing,
# or a guest command firing events for 100+ ms would cost a query every 20 ms.
REFRESH = 0.01


class EventHolds:
    """NICs with a filter event on its way to the reconciler and no query of ours since.

    Another filter event for such a NIC adds nothing: the query that the first one
    leads to starts after it and so answers it too. The event thread adds a hold when
    it hands an event over and drops events for held NICs, but for one every REFRESH
    seconds (the worker must see the guest is still busy). A hold goes when a query of
    that NIC starts, when its domain is read again (a survey: for a NIC we do not sync,
    that read is all an event can lead to), forgotten, or has a domain event, and all
    go when every domain is listed again. Dropping too few costs a hand-over; a hold
    that outlives every query and survey would lose events, hence all those releases.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the event thread adds, the loop releases
        # Domain UUID -> held aliases -> when the last event was handed over (monotonic).
        self._held: dict[str, dict[str, float]] = {}
        self.dropped = 0  # filter events not handed over (written by the event thread)

    def admit(self, uuid: str, alias: str, now: float | None = None) -> bool:
        """Whether to hand this NIC's event over (and hold the NIC until released)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            aliases = self._held.setdefault(uuid, {})
            handed = aliases.get(alias)
            if handed is not None and now - handed < REFRESH:
                self.dropped += 1
                return False
            aliases[alias] = now
            return True

    def release(self, uuid: str, alias: str | None = None) -> None:
        """The NIC ALIAS of domain UUID (every NIC of it when None) is held no more."""
        with self._lock:
            if alias is None:
                self._held.pop(uuid, None)
            elif uuid in self._held:
                self._held[uuid].pop(alias, None)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
