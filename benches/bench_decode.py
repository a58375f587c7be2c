"""Decode attention cells: ferroattn's KV cache vs torch SDPA vs ONNX Runtime GQA, with the
machine's read bandwidth measured in the same run.

    python benches/bench_decode.py                  # 8 and 32 KV heads, L = 4096 and 32768
    python benches/bench_decode.py --quick          # smoke test, seconds
    python benches/bench_decode.py --lengths 8192 --kv-heads 8 --dtypes int8 --repeats 21

The sweep lives in ``fabench.sweeps.decode``; see benches/README.md.
"""

import sys

from fabench.sweeps.decode import main

if __name__ == "__main__":
    sys.exit(main())
