"""The benchmarks' names: their own prefix (never the tests'), and where results go."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.guest import prefix, stack_problem

TEST_PREFIX = "rxft-"
RESULTS = Path("/tmp/rxfb-bench")


def check_prefix() -> str:
    """The prefix in force; refuses one that would also match the tests' objects."""
    p = prefix()
    if not p or TEST_PREFIX.startswith(p) or p.startswith(TEST_PREFIX):
        raise SystemExit(f"RXFT_PREFIX={p!r} would touch the tests' {TEST_PREFIX!r} objects")
    return p


def require_stack() -> None:
    problem = stack_problem()
    if problem is not None:
        raise SystemExit(f"the real stack is not available: {problem}")


def out_dir(name: str, given: str | None) -> Path:
    path = Path(given) if given else RESULTS / f"{name}-{time.strftime('%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path
