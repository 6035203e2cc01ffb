"""The demo: a peer cannot ping6 a guest on a macvtap until rxfilterd runs.

Run through scripts/demo (which prepares the host first). A veth pair stands for the
LAN: its near end is the macvtap's lower device, its far end sits in a namespace of its
own, the peer, standing for another machine. The guest's NIC is trusted
(trustGuestRxFilters='yes') and type='ethernet' on a macvtap made beforehand, which
libvirt does not sync. Everything it makes is named rxdemo-* and removed at the end,
also after an error or Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.machine import other_rxfilterd
from tests.support import guest as stack
from tests.support.peer import Peer, cleanup_namespaces, quiet_host_ipv6

REPO = Path(__file__).resolve().parents[1]

MAC0 = "52:54:00:de:00:01"
NEW_MAC = "52:54:00:de:ca:fe"
PEER_IPV6 = "2001:db8::1"
GUEST_IPV6 = "2001:db8::de:cafe"
GROUP = "33:33:ff:de:ca:fe"  # ff02::1:ffde:cafe, GUEST_IPV6's solicited-node group


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show_host(ifname: str) -> None:
    link = subprocess.run(["ip", "-br", "link", "show", ifname], capture_output=True, text=True)
    print(f"host$ ip -br link show {ifname}\n  {link.stdout.strip()}")
    groups = subprocess.run(["ip", "maddr", "show", "dev", ifname], capture_output=True, text=True)
    static = [line.strip() for line in groups.stdout.splitlines() if "static" in line]
    print(f"host$ ip maddr show dev {ifname} | grep static\n  " + ("\n  ".join(static) or "-"))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> bool:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            print(f"!! {what}: not within {timeout} s")
            return False
        time.sleep(0.02)
    print(f"-- {what}: {1000 * (time.monotonic() - started):.0f} ms")
    return True


def ping(peer: Peer, count: int = 2) -> bool:
    """The peer pings the guest; prints the command and ping's own summary."""
    print(f"peer$ ping -6 -c {count} -W 1 {GUEST_IPV6}")
    res = peer.run("busybox", "ping", "-6", "-c", str(count), "-W", "1", GUEST_IPV6)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    print("  " + "\n  ".join(lines[1:]))
    return res.returncode == 0


def host_mac(ifname: str) -> str:
    return str((stack.link_show(ifname) or {}).get("address"))


def main() -> int:
    res = stack.Resources()
    config = Path("/tmp/rxdemo-rxfilterd.toml")
    config.write_text('[log]\nlevel = "info"\nformat = "console"\n')
    daemon: subprocess.Popen[str] | None = None
    peer = Peer(stack.prefixed("peer"))
    started = time.monotonic()
    try:
        cleanup_namespaces()
        stack.cleanup_leftovers()
        say(f"host: a macvtap on a veth; the veth's far end is the peer ({PEER_IPV6})")
        mvt = res.veth_macvtap("", mac=MAC0)
        quiet_host_ipv6(stack.prefixed("a"))  # see tests/support/peer.py
        peer.start()
        peer.take(stack.prefixed("b"), f"{PEER_IPV6}/64")
        show_host(mvt.name)

        say("libvirt boots a small guest with trustGuestRxFilters='yes' on that macvtap")
        g = res.guest(stack.prefixed("guest"), [stack.EthernetNic(mvt.name, mac=MAC0, trust=True)])
        print(f"-- guest shell up after {g.boot_seconds:.1f} s")
        print(f"guest$ ip -6 addr add {GUEST_IPV6}/64 dev eth0   (joins ff02::1:ffde:cafe)")
        g.add_ipv6(GUEST_IPV6)

        say("without rxfilterd: the peer's neighbour solicitation never reaches the guest")
        show_host(mvt.name)
        if ping(peer):
            others = other_rxfilterd()
            print(f"!! answered: another rxfilterd runs on this host (pids {others})")

        say("rxfilterd starts (its log lines are prefixed 'rxfilterd |')")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "rxfilterd", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        stream = daemon.stderr
        assert stream is not None
        threading.Thread(
            target=lambda: [print(f"rxfilterd | {line}", end="", flush=True) for line in stream],
            daemon=True,
        ).start()
        wait_for(lambda: GROUP in stack_groups(mvt.name), "the host macvtap has the guest's group")
        show_host(mvt.name)
        print("peer$ ip neigh flush all   (forget the failed attempt)")
        peer.forget_neighbours()
        wait_for(lambda: ping(peer), "the peer's ping6 answered", timeout=20)

        say(f"guest$ ip link set eth0 address {NEW_MAC}")
        g.set_mac(NEW_MAC)
        wait_for(lambda: host_mac(mvt.name) == NEW_MAC, "the host macvtap has the new MAC")
        show_host(mvt.name)
        print("peer$ ip neigh flush all   (forget the old MAC)")
        peer.forget_neighbours()
        wait_for(lambda: ping(peer), "the peer reaches the new MAC", timeout=20)
        neigh = peer.run("ip", "neigh", "show", GUEST_IPV6).stdout.strip()
        print(f"peer$ ip neigh show {GUEST_IPV6}\n  {neigh}")

        say("rxfilterd explain")
        subprocess.run(
            [sys.executable, "-m", "rxfilterd", "explain", "--config", str(config)],
            cwd=REPO,
            check=False,
        )
        return 0
    finally:
        say("cleaning up")
        if daemon is not None:
            daemon.terminate()
            daemon.wait(10)
            time.sleep(0.2)
        try:
            res.close()
        finally:
            peer.remove()
            stack.cleanup_leftovers()
            cleanup_namespaces()
            config.unlink(missing_ok=True)
        print(f"-- done in {time.monotonic() - started:.0f} s")


def stack_groups(ifname: str) -> str:
    out = subprocess.run(["ip", "maddr", "show", "dev", ifname], capture_output=True, text=True)
    return out.stdout


if __name__ == "__main__":
    sys.exit(main())
