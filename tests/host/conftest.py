"""Host tier: real netlink in throwaway network namespaces (needs root).

Each test gets its own namespace "rxft-<random>" with a veth pair and macvtaps on it:
  mvb0, mvb1  mode bridge on veth0
  mvp0        mode passthru on veth1
Expected results are read back with ip/bridge, independently of rxfilterd.macvtap.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

PREFIX = "rxft-"


def _unavailable(reason: str) -> None:
    # In CI a missing prerequisite is a broken runner, not a reason to go green.
    if os.environ.get("CI") == "true":
        pytest.fail(f"host tier cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"host tier: {reason}")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    # Run `async def` tests on a fresh loop (no pytest-asyncio in this project).
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="session")
def host_tier() -> Iterator[None]:
    if os.geteuid() != 0:
        _unavailable("needs root (network namespaces, macvtap)")
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} (iproute2) not installed")
    # Leftovers from runs that were killed before their teardown.
    listing = _run("ip", "-j", "netns", "list", check=False).stdout.strip()
    for entry in json.loads(listing) if listing else []:
        if entry["name"].startswith(PREFIX):
            _run("ip", "netns", "del", entry["name"], check=False)
    yield


@dataclass
class Netns:
    name: str

    def ip(self, *args: str) -> str:
        return _run("ip", "-n", self.name, *args).stdout

    def bridge(self, *args: str) -> str:
        return _run("bridge", "-n", self.name, *args).stdout

    def link(self, ifname: str) -> dict[str, Any]:
        result: list[dict[str, Any]] = json.loads(self.ip("-j", "link", "show", "dev", ifname))
        return result[0]

    def mac(self, ifname: str) -> str:
        return str(self.link(ifname)["address"])

    def flags(self, ifname: str) -> set[str]:
        return set(self.link(ifname)["flags"])

    def maddr(self, ifname: str) -> dict[str, bool]:
        """Link-layer multicast entries -> whether `ip maddr` calls them static."""
        entries: dict[str, bool] = {}
        for line in self.ip("maddr", "show", "dev", ifname).splitlines():
            fields = line.split()
            if fields and fields[0] == "link":
                entries[fields[1].lower()] = "static" in fields
        return entries

    def fdb(self, ifname: str) -> set[str]:
        entries = json.loads(self.bridge("-j", "fdb", "show", "dev", ifname) or "[]")
        return {str(entry["mac"]).lower() for entry in entries}

    def add_macvtap(self, name: str, lower: str, mode: str) -> None:
        self.ip("link", "add", "link", lower, "name", name, "type", "macvtap", "mode", mode)
        self.ip("link", "set", name, "up")


@pytest.fixture
def ns(host_tier: None) -> Iterator[Netns]:
    name = PREFIX + secrets.token_hex(4)
    try:
        _run("ip", "netns", "add", name)
    except subprocess.CalledProcessError as exc:
        _unavailable(f"cannot create a network namespace: {exc.stderr.strip()}")
    netns = Netns(name)
    try:
        netns.ip("link", "set", "lo", "up")
        netns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        for veth in ("veth0", "veth1"):
            netns.ip("link", "set", veth, "up")
        try:
            netns.add_macvtap("mvb0", "veth0", "bridge")
        except subprocess.CalledProcessError as exc:
            _unavailable(f"cannot create a macvtap: {exc.stderr.strip()}")
        netns.add_macvtap("mvb1", "veth0", "bridge")
        netns.add_macvtap("mvp0", "veth1", "passthru")
        yield netns
    finally:
        _run("ip", "netns", "del", name, check=False)
