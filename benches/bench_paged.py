"""Paged KV cache cells: decode through ``PagedKVCache`` and ``paged_attention`` vs the
contiguous ``KVCache`` (the cost of paging, target <= 1.1x), and a continuous-batching step of
16 mixed sequences as one ``paged_attention_varlen`` call vs a call per sequence (speedup, K/V
GB/s against the read bandwidth measured in the same run).

    python benches/bench_paged.py               # L = 4096, 32768; fp16, int8; blocks 16, 64
    python benches/bench_paged.py --quick           # smoke test, seconds
    python benches/bench_paged.py --lengths 8192 --dtypes int8 --block-sizes 16 --repeats 21

The cells live in ``fabench.sweeps.paged``; see benches/README.md.
"""

import sys

from fabench.sweeps.paged import main

if __name__ == "__main__":
    sys.exit(main())
