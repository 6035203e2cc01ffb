"""Benchmarks on the real stack (libvirtd, QEMU guests, macvtaps). Run as root, e.g.

    .venv/bin/python -m bench.latency
    .venv/bin/python -m bench.burst
    .venv/bin/python -m bench.scale

Each prints its figures and writes them (with the machine and the load) as JSON. They
print numbers and never assert on timings. Everything they create is named with
RXFT_PREFIX (default here ``rxfb-``, never the tests' ``rxft-``) and removed at the end.
"""
