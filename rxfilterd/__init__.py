"""rxfilterd: propagate trusted guests' NIC receive filters to their host macvtaps."""

from __future__ import annotations

from rxfilterd import lazy_pyroute2

lazy_pyroute2.install()  # before any module of ours imports from pyroute2


def __getattr__(name: str) -> str:
    """`rxfilterd.__version__`: pyproject.toml's version, from the installed metadata."""
    if name != "__version__":
        raise AttributeError(f"module 'rxfilterd' has no attribute {name!r}")
    # Imported on first use: importlib.metadata and the look-up cost about 50 ms of CPU,
    # half of what `rxfilterd --help` or `check-config` takes in all (measured).
    from importlib.metadata import version

    globals()["__version__"] = found = version("rxfilterd")
    return found
