"""Records that cross module boundaries: decisions and NIC state."""

from __future__ import annotations

from typing import Any

# A decision as every sink receives it (event, time and its fields).
Decision = dict[str, Any]
# One NIC's state as the state sinks receive it.
NicState = dict[str, Any]
