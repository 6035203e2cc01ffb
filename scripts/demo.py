"""The demo: a tiny guest on a macvtap changes its NIC, the host follows.

Run through scripts/demo (which prepares the host first). Everything it makes is
named rxdemo-* and removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RXFT_PREFIX", "rxdemo-")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import guest as stack  # noqa: E402

MAC0 = "52:54:00:de:00:01"
NEW_MAC = "52:54:00:de:ca:fe"
IPV6 = "2001:db8::de:cafe"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show_host(ifname: str) -> None:
    link = subprocess.run(["ip", "-br", "link", "show", ifname], capture_output=True, text=True)
    print(f"host$ ip -br link show {ifname}\n  {link.stdout.strip()}")
    groups = subprocess.run(["ip", "maddr", "show", "dev", ifname], capture_output=True, text=True)
    static = [line.strip() for line in groups.stdout.splitlines() if "static" in line]
    print(f"host$ ip maddr show dev {ifname} | grep static\n  " + ("\n  ".join(static) or "-"))


def wait_for(check: object, what: str, timeout: float = 10) -> None:
    assert callable(check)
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            print(f"!! {what}: not within {timeout} s")
            return
        time.sleep(0.02)
    print(
        f"-- {what}: {1000 * (time.monotonic() - started):.0f} ms after the guest command returned"
    )


def static_groups(ifname: str) -> str:
    out = subprocess.run(["ip", "maddr", "show", "dev", ifname], capture_output=True, text=True)
    return out.stdout


def main() -> int:
    res = stack.Resources()
    config = Path("/tmp/rxdemo-rxfilterd.toml")
    config.write_text('[log]\nlevel = "info"\nformat = "console"\n')
    daemon: subprocess.Popen[str] | None = None
    try:
        stack.cleanup_leftovers()
        say("host: a veth pair and a macvtap on it (type='ethernet', managed='no')")
        mvt = res.veth_macvtap("", mac=MAC0)
        show_host(mvt.name)

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
        time.sleep(1)

        say("libvirt boots a small guest with trustGuestRxFilters='yes' on that macvtap")
        g = res.guest(stack.prefixed("guest"), [stack.EthernetNic(mvt.name, mac=MAC0, trust=True)])
        print(f"-- guest shell up after {g.boot_seconds:.1f} s")
        time.sleep(1.5)
        show_host(mvt.name)

        say(f"guest$ ip link set eth0 address {NEW_MAC}")
        g.set_mac(NEW_MAC)
        wait_for(
            lambda: (stack.link_show(mvt.name) or {}).get("address") == NEW_MAC,
            "host macvtap has the new MAC",
        )
        show_host(mvt.name)

        say(f"guest$ ip -6 addr add {IPV6}/64 dev eth0   (joins ff02::1:ffde:cafe)")
        g.add_ipv6(IPV6)
        wait_for(
            lambda: "33:33:ff:de:ca:fe" in static_groups(mvt.name),
            "host macvtap has the solicited-node group",
        )
        show_host(mvt.name)

        say("guest$ ip link set eth0 promisc on")
        g.set_promisc(True)
        wait_for(
            lambda: "PROMISC" in (stack.link_show(mvt.name) or {}).get("flags", []),
            "host macvtap is promiscuous",
        )
        show_host(mvt.name)

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
        res.close()
        stack.cleanup_leftovers()
        config.unlink(missing_ok=True)
        print("-- done")


if __name__ == "__main__":
    sys.exit(main())
