"""Benchmarks on the real stack (libvirtd, QEMU guests, macvtaps). Run as root, e.g.

    .venv/bin/python -m bench.latency
    .venv/bin/python -m bench.burst
    .venv/bin/python -m bench.scale
    .venv/bin/python -m bench.hostile

Each prints its figures and writes them (with the machine and the load) as JSON. They
print numbers and never assert on timings. Everything they create is named with
RXFT_PREFIX (default here ``rxfb-``, never the tests' ``rxft-``) and removed at the end.

The modules they share, by concern: naming (prefix, output directory), machine (facts
for the record), monitors (links and QEMU events seen from outside), daemon (rxfilterd
under measurement), process (another process's CPU and memory), figures (percentiles,
JSON), profiling (py-spy) and session (the set-up and clean-up every main repeats).
"""

import os

BENCH_PREFIX = "rxfb-"
# Set here, on the package's import, so that it is in force before anything reads it.
os.environ.setdefault("RXFT_PREFIX", BENCH_PREFIX)
