"""deploy/kubevirt/trust_hook.py as a module, loaded from its file.

The script is no package module: KubeVirt's sidecar-shim runs it from a ConfigMap
mounted at /usr/bin/onDefineDomain. importlib loads it by path, so tests need no
sys.path edit and deploy/ stays out of the installed package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HOOK = Path(__file__).resolve().parents[2] / "deploy" / "kubevirt" / "trust_hook.py"
MODULE = "rxfilterd_kubevirt_trust_hook"


def load_hook() -> ModuleType:
    """The hook's module (loaded once; later calls return the same module)."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    spec = importlib.util.spec_from_file_location(MODULE, HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # The importlib recipe for a source file: registered first, as dataclasses look it up.
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module
