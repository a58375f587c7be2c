"""Prefill attention across thread counts: ferroattn vs torch SDPA (CPU) vs NumPy.

    python benches/bench_prefill.py                 # H=16 N=2048 D=64, dense and causal
    python benches/bench_prefill.py --quick         # smoke test, seconds
    python benches/bench_prefill.py --n 4096 --threads 1,2,4 --repeats 9

The sweep lives in ``fabench.sweeps.prefill``; see benches/README.md.
"""

import sys

from fabench.sweeps.prefill import main

if __name__ == "__main__":
    sys.exit(main())
