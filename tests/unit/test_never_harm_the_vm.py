"""Never harm the VM: no code path can stop, pause, reset or reconfigure a domain.

hypervisor.py is the only module that talks to libvirt, so it is enough to show that
it names no libvirt call beyond a few read-only ones, and that the only QMP command
it can send is query-rx-filter. The forbidden set is every other method libvirt
offers, taken from the installed bindings, so a new harmful call cannot slip by.
"""

from __future__ import annotations

import ast
from pathlib import Path

import libvirt
import libvirt_qemu

PACKAGE = Path(__file__).resolve().parents[2] / "rxfilterd"
HYPERVISOR = PACKAGE / "hypervisor.py"

# What rxfilterd may call on libvirt objects: look-ups, XML, events, the connection.
READ_ONLY = {
    "virDomain": {"UUIDString", "name", "XMLDesc", "isActive"},
    "virNetwork": {"XMLDesc", "portLookupByUUIDString"},
    "virNetworkPort": {"XMLDesc"},
    "virConnect": {
        "close",
        "domainEventDeregisterAny",
        "domainEventRegisterAny",
        "getLibVersion",
        "listAllDomains",
        "lookupByUUIDString",
        "networkLookupByName",
        "registerCloseCallback",
        "setKeepAlive",
        "unregisterCloseCallback",
    },
}
# Hypervisor's ThreadPoolExecutors.
THREAD_POOLS = {"self._pool", "self._ordered"}
QEMU_CALLS = {"qemuMonitorCommand", "qemuMonitorEventRegister", "qemuMonitorEventDeregister"}


def _methods(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def _tree() -> ast.Module:
    return ast.parse(HYPERVISOR.read_text(), str(HYPERVISOR))


def test_hypervisor_names_no_libvirt_call_that_changes_a_domain() -> None:
    forbidden: set[str] = set()
    for cls_name, allowed in READ_ONLY.items():
        forbidden |= _methods(getattr(libvirt, cls_name)) - allowed
    forbidden -= {n for allowed in READ_ONLY.values() for n in allowed}
    assert {"destroy", "suspend", "reset", "detachDeviceFlags", "shutdown"} <= forbidden
    hits = []
    for node in ast.walk(_tree()):
        if isinstance(node, ast.Attribute) and node.attr in forbidden:
            # The thread pools' shutdown() shares its name with virDomain.shutdown.
            if node.attr == "shutdown" and ast.unparse(node.value) in THREAD_POOLS:
                continue
            hits.append(f"line {node.lineno}: {ast.unparse(node)}")
        # getattr(dom, "destroy") and friends.
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) == "getattr"
            and len(node.args) >= 2
            and not (isinstance(node.args[1], ast.Constant) and node.args[1].value not in forbidden)
        ):
            hits.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not hits, "hypervisor.py names libvirt calls that can harm a VM:\n" + "\n".join(hits)


def test_the_only_qemu_calls_are_the_monitor_query_and_its_event() -> None:
    qemu_api = {n for n in dir(libvirt_qemu) if not n.startswith("_")}
    used = {
        node.attr
        for node in ast.walk(_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "libvirt_qemu"
    }
    assert used <= QEMU_CALLS, used & qemu_api
    assert "qemuAgentCommand" in qemu_api  # the bindings list what we forbid


def test_the_only_qmp_command_is_query_rx_filter() -> None:
    executes = [
        value
        for node in ast.walk(_tree())
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == "execute"
    ]
    assert executes and all(
        isinstance(v, ast.Constant) and v.value == "query-rx-filter" for v in executes
    )
    # The raw monitor call is reached from the query alone.
    callers = set()
    for fn in ast.walk(_tree()):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr == "_monitor_command":
                    callers.add(fn.name)
    assert callers == {"_query_rx_filter"}


def test_no_other_module_talks_to_libvirt_or_runs_programs() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                module = node.module if isinstance(node, ast.ImportFrom) else None
                mods = [module] if module else names
                if path != HYPERVISOR and any(m.split(".")[0].startswith("libvirt") for m in mods):
                    offenders.append(f"{path.name}:{node.lineno} imports libvirt")
                if any(m.split(".")[0] == "subprocess" for m in mods):
                    offenders.append(f"{path.name}:{node.lineno} imports subprocess")
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.split(" ")[0] in ("virsh", "/usr/bin/virsh")
            ):
                offenders.append(f"{path.name}:{node.lineno} runs virsh")
    assert not offenders, offenders
