"""rxfilterd loads pyroute2's rtnetlink modules, not the whole library (lazy_pyroute2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import rxfilterd.app
before = sorted(m for m in sys.modules if m.startswith("pyroute2"))
from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2 import IPRoute, NetlinkError
import pyroute2
after = sorted(m for m in sys.modules if m.startswith("pyroute2"))
print(json.dumps({"before": before, "after": after, "same": pyroute2.IPRoute is IPRoute,
                  "error": NetlinkError.__module__, "async": AsyncIPRoute.__module__}))
"""


@pytest.fixture(scope="module")
def found() -> dict[str, object]:
    # A fresh interpreter (one for both tests): this one may have imported pyroute2.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_the_daemon_imports_rtnetlink_without_the_rest_of_pyroute2(
    found: dict[str, object],
) -> None:
    before = found["before"]
    assert isinstance(before, list)
    assert "pyroute2.iproute.linux" in before
    for unused in ("pyroute2.ndb.main", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.nftables"):
        assert unused not in before, unused


def test_a_top_level_name_loads_the_whole_package_as_usual(found: dict[str, object]) -> None:
    after = found["after"]
    assert isinstance(after, list)
    assert "pyroute2.ndb.main" in after
    assert found["same"] is True
    assert (found["error"], found["async"]) == (
        "pyroute2.netlink.exceptions",
        "pyroute2.iproute.linux",
    )
