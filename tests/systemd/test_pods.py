"""The pods mode under the packaged unit and its shipped drop-in (pods.conf).

The container has its own PID namespace, so the pods are made inside it: a stand-in
"libvirtd" (python3 run through a symlink of that name: /proc/PID/comm is the name
exec'd) in a mount and network namespace of its own, listening on /run/libvirt/libvirt-sock
in its own tmpfs, as a session daemon does (uid 107, socket mode 0700) and as a root
one with no capabilities. It speaks no libvirt: a connection to it fails after
connect() ("libvirt away" with a read/write error), which shows the socket was reached;
EACCES there would be "Permission denied". Finding a pod ("pod found") means the daemon
entered its network namespace and opened its netlink handles there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.container import CONFIG_PATH, DROPIN_DIR, SystemdContainer
from tests.support.daemon import wait_until
from tests.support.guest import prefixed
from tests.systemd.conftest import shipped_config
from tests.systemd.test_unit import dropin, messages, start

pytestmark = pytest.mark.systemd

UNIT = "rxfilterd.service"
# Where the package ships the drop-in, inactive; docs/service.md says to copy it here.
SHIPPED_DROPIN = "/usr/share/rxfilterd/pods.conf"
POD_DIR = "/var/lib/rxft-pods"
LISTENER = """\
import os, socket, sys
os.umask(0o077)  # the socket 0700, as libvirt's session daemon makes it
s = socket.socket(socket.AF_UNIX)
s.bind("/run/libvirt/libvirt-sock")
s.listen()
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""


@dataclass(frozen=True)
class Pod:
    name: str  # its hostname, so the daemon calls it pod/NAME
    unit: str  # the transient unit it runs in, inside the container

    @property
    def libvirt(self) -> str:
        return f"pod/{self.name}"


def pod_script(name: str, uid: int) -> str:
    """A pod's namespaces, hostname and socket directory, then its "libvirtd" as UID.

    Root's pod keeps no capability (an empty bounding set), so that a daemon without
    CAP_SYS_PTRACE may still read its /proc entries: same uid, capabilities a subset.
    """
    drop = "--clear-groups --bounding-set=-all" if uid == 0 else "--clear-groups"
    inner = (
        "set -e; "
        f"mount -t tmpfs -o mode=0755,uid={uid},gid={uid} pod-run /run/libvirt; "
        f"echo {name} > /run/libvirt/hostname; "
        "mount --bind /run/libvirt/hostname /etc/hostname; "
        f"exec setpriv --reuid={uid} --regid={uid} {drop} {POD_DIR}/libvirtd {POD_DIR}/listen.py"
    )
    return (
        "set -e\n"
        f"exec unshare --mount --net --propagation private --fork --kill-child sh -c '{inner}'\n"
    )


def run_pod(box: SystemdContainer, name: str, uid: int) -> Pod:
    box.write(f"{POD_DIR}/listen.py", LISTENER)
    box.run("ln", "-sf", "/usr/bin/python3", f"{POD_DIR}/libvirtd")
    box.write(f"{POD_DIR}/{name}.sh", pod_script(name, uid))
    pod = Pod(name, f"{name}.service")
    box.run("systemd-run", f"--unit={pod.unit}", "/bin/sh", f"{POD_DIR}/{name}.sh")
    try:
        wait_until(lambda: bool(box.journal("MESSAGE=listening", unit=pod.unit)), 30, "")
    except AssertionError:
        log = box.run("journalctl", "-u", pod.unit, "--no-pager", check=False).stdout
        raise AssertionError(f"{name} is not listening:\n{log}") from None
    return pod


@dataclass(frozen=True)
class Pods:
    session: Pod  # uid 107, socket 0700: KubeVirt's default non-root virt-launcher
    root: Pod  # root without capabilities: visible even without CAP_SYS_PTRACE
    # (named so that a scan takes the session pod first)


@pytest.fixture(scope="module")
def pods(container: SystemdContainer) -> Iterator[Pods]:
    made: list[Pod] = []
    try:
        made.append(run_pod(container, prefixed("pod-107"), 107))
        made.append(run_pod(container, prefixed("pod-root"), 0))
        yield Pods(*made)
    finally:
        for pod in made:
            container.systemctl("stop", pod.unit, check=False)


# [libvirt] uri = "": a KubeVirt node has no libvirt of its own (and see docs/service.md's
# known limit); scans every 0.5 s so that pods are found quickly.
PODS_MODE: dict[str, str | float] = {
    "libvirt.uri": "",
    "pods.enabled": "true",
    "pods.scan_interval": 0.5,
}


def pods_mode(box: SystemdContainer, *, with_dropin: bool) -> None:
    """The config pods mode wants on a KubeVirt node, and the drop-in as docs say."""
    box.write(CONFIG_PATH, shipped_config(**PODS_MODE), 0o640)
    if with_dropin:
        box.run("install", "-D", "-m", "0644", SHIPPED_DROPIN, f"{DROPIN_DIR}/pods.conf")
    box.systemctl("daemon-reload")


def found(box: SystemdContainer, pod: Pod, cursor: str) -> bool:
    return bool(box.journal("EVENT=pod found", f"LIBVIRT={pod.libvirt}", after=cursor))


def away(box: SystemdContainer, pod: Pod, cursor: str) -> str:
    """The reason of the pod's first "libvirt away" line."""
    line = box.wait_journal("EVENT=libvirt away", f"LIBVIRT={pod.libvirt}", after=cursor)
    return str(line["REASON"])


def cannot_enter(box: SystemdContainer, pod: Pod, cursor: str) -> str:
    line = box.wait_journal(
        "EVENT=pod: cannot open its network", f"LIBVIRT={pod.libvirt}", after=cursor
    )
    return str(line["ERROR"])


REFUSED = "Permission denied"  # EACCES on connect()


def test_the_package_ships_the_drop_in_inactive(unit: SystemdContainer) -> None:
    assert state_of(unit, "DropInPaths") == ""
    unit.run("test", "-f", SHIPPED_DROPIN)
    owner = unit.run("dpkg", "-S", SHIPPED_DROPIN).stdout
    assert owner.startswith("rxfilterd: "), owner


def state_of(box: SystemdContainer, prop: str) -> str:
    return box.show(UNIT, prop)[prop]


def test_with_the_drop_in_pods_are_entered_and_their_sockets_reached(
    unit: SystemdContainer, pods: Pods
) -> None:
    pods_mode(unit, with_dropin=True)
    assert state_of(unit, "DropInPaths") == f"{DROPIN_DIR}/pods.conf"
    cursor = unit.cursor()
    start(unit)  # Type=notify: returns once READY=1 (no host libvirt to wait for)
    assert state_of(unit, "ActiveState") == "active"
    for pod in (pods.session, pods.root):
        reason = away(unit, pod, cursor)
        assert found(unit, pod, cursor), pod
        # Reached and then refused by a socket that speaks no libvirt, not EACCES.
        assert REFUSED not in reason and "Failed to connect socket" not in reason, reason
    session = unit.journal("EVENT=pod found", f"LIBVIRT={pods.session.libvirt}", after=cursor)
    assert session[0]["URI"].startswith("qemu+unix:///session?socket=/proc/"), session
    assert not unit.journal("EVENT=pod: cannot open its network", after=cursor)
    status = json.loads(unit.run("/usr/bin/rxfilterd", "status", "--json").stdout)
    served = {c["libvirt"] for c in status["connections"]}
    assert served == {pods.session.libvirt, pods.root.libvirt}, status["connections"]
    security = unit.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security)
    assert match and float(match.group(1)) <= 2.6, security


def test_without_the_drop_in_no_pod_is_served(unit: SystemdContainer, pods: Pods) -> None:
    pods_mode(unit, with_dropin=False)
    cursor = unit.cursor()
    start(unit)
    # The root pod is visible to the unit as it is; entering its namespace is refused.
    assert "setns" in cannot_enter(unit, pods.root, cursor)
    # The session pod (uid 107) is not even visible: a scan takes pods in name order, the
    # session pod first, and says nothing of it.
    assert not unit.journal(f"LIBVIRT={pods.session.libvirt}", after=cursor)
    status = json.loads(unit.run("/usr/bin/rxfilterd", "status", "--json").stdout)
    assert status["connections"] == [], status["connections"]


@pytest.mark.parametrize(
    "taken", ["CAP_SYS_ADMIN", "RestrictNamespaces", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"]
)
def test_each_item_of_the_drop_in_is_needed(unit: SystemdContainer, pods: Pods, taken: str) -> None:
    pods_mode(unit, with_dropin=True)
    # test.conf sorts after pods.conf: it takes one item back.
    dropin(
        unit,
        "RestrictNamespaces=yes\n"
        if taken == "RestrictNamespaces"
        else f"CapabilityBoundingSet=~{taken}\n",
    )
    cursor = unit.cursor()
    start(unit)
    if taken in ("CAP_SYS_ADMIN", "RestrictNamespaces"):
        for pod in (pods.session, pods.root):
            error = cannot_enter(unit, pod, cursor)
            assert "setns" in error and "Operation not permitted" in error, error
        assert not unit.journal("EVENT=pod found", after=cursor)
    elif taken == "CAP_SYS_PTRACE":
        # /proc/PID of a uid-107 process is hidden (ProtectProc=invisible) and its root
        # and namespaces refused; the root pod without capabilities is still served.
        # A scan serves pods in name order, the session pod first: once the root pod is
        # found, the session pod would have been too.
        unit.wait_journal("EVENT=pod found", f"LIBVIRT={pods.root.libvirt}", after=cursor)
        assert not unit.journal(f"LIBVIRT={pods.session.libvirt}", after=cursor)
    else:
        assert REFUSED in away(unit, pods.session, cursor)  # connect() to the 0700 socket
        assert REFUSED not in away(unit, pods.root, cursor)
    assert not [m for m in messages(unit.journal(after=cursor)) if "Traceback" in m]
