"""pyroute2 without its package __init__ until something needs it.

pyroute2's __init__ imports every netlink family the library supports (conntrack,
nftables, WireGuard, nl80211, IPDB, NDB... about 300 modules, unittest and
multiprocessing among them) to offer them as top-level names. rxfilterd uses
rtnetlink and ethtool's ioctls, imported from their own modules. Measured with 500
NICs (docs/benchmarks.md): 4.5 MiB of the daemon's idle RSS and ~100 ms of its
start-up went to the rest.

install() puts the package module in place without running its __init__: submodules
(`pyroute2.iproute.linux`, `from pyroute2 import config`) import as usual, and the
first use of any other top-level name (`pyroute2.IPRoute`) runs the real __init__,
so nothing else sees a difference.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def install() -> None:
    """Make `pyroute2` lazy, unless it is imported already (then nothing to save)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed, or not a plain package: let the import say so
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
    loader = spec.loader

    def load_all(name: str) -> object:
        # PEP 562: called for names the package does not have yet. A submodule
        # (`from pyroute2 import config`, as pyroute2's own modules do) is imported
        # alone; any other name needs the whole package.
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = load_all
    sys.modules["pyroute2"] = package
