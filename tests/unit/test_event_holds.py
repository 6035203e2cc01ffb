"""EventHolds: one hand-over per NIC until a query of it starts; releases never miss."""

from __future__ import annotations

import threading

from rxfilterd.event_holds import REFRESH, EventHolds

A, B = "uuid-a", "uuid-b"


def test_one_event_per_nic_is_handed_over_until_its_query_starts() -> None:
    holds = EventHolds()
    assert holds.admit(A, "net0", now=0.0)
    assert not holds.admit(A, "net0", now=0.001)
    assert not holds.admit(A, "net0", now=0.002)
    # Another NIC, and the same alias in another domain, are not held by it.
    assert holds.admit(A, "net1", now=0.002)
    assert holds.admit(B, "net0", now=0.002)
    holds.release(A, "net0")  # its query starts: what comes next may be news
    assert holds.admit(A, "net0", now=0.003)
    assert not holds.admit(A, "net1", now=0.003)
    assert holds.dropped == 3


def test_a_held_nic_still_has_an_event_handed_over_every_refresh_interval() -> None:
    """So that a worker waiting for the guest to pause sees it is still changing."""
    holds = EventHolds()
    handed = [t for t in range(100) if holds.admit(A, "net0", now=t * REFRESH * 0.3)]
    assert handed == list(range(0, 100, 4))  # 1.2 intervals apart: none dropped at 0.9


def test_a_domain_read_or_event_releases_every_nic_of_it_and_a_listing_all() -> None:
    holds = EventHolds()
    for uuid in (A, B):
        for alias in ("net0", "net1"):
            assert holds.admit(uuid, alias)
    holds.release(A)
    assert holds.admit(A, "net0") and holds.admit(A, "net1")
    assert not holds.admit(B, "net0")
    holds.clear()
    assert holds.admit(A, "net0") and holds.admit(B, "net1")
    # Releasing what is not held is harmless.
    holds.release("uuid-unknown")
    holds.release("uuid-unknown", "net0")


def test_admissions_from_a_thread_racing_releases_never_lose_the_last_event() -> None:
    """After the last release, the next event is always handed over."""
    holds = EventHolds()
    stop = threading.Event()

    def events() -> None:
        while not stop.is_set():
            holds.admit(A, "net0")

    thread = threading.Thread(target=events)
    thread.start()
    try:
        for _ in range(2000):
            holds.release(A, "net0")
    finally:
        stop.set()
        thread.join()
    holds.release(A, "net0")
    assert holds.admit(A, "net0")
