"""rxfilterd: propagate trusted guests' NIC receive filters to their host macvtaps."""

__version__ = "0.1.0"
