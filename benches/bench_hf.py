"""``generate()`` through transformers: the harness's case 10 on its own.

    python benches/bench_hf.py                  # prompts 1024 and 8192, 32 new tokens, ~5 min
    python benches/bench_hf.py --quick          # a toy model, seconds
    python benches/bench_hf.py --threads 2 --gap-ms 0

A Llama-shaped model (8 layers, hidden 1024, 16 / 4 heads, D=64, fp32, random weights): prefill
and decode ms/token for ``sdpa`` and ``ferroattn`` on transformers' ``DynamicCache`` and for
``ferroattn`` on ``FerroattnCache`` (fp32, fp16, int8), with each cache's bytes; then a
sliding-window prefill at 8192 tokens with the masks as kernel options vs dense masks. Options
and files as ``harness.py`` (``results/harness-<date>-hf.*``); see benches/README.md.
"""

import sys

from harness import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "hf", *sys.argv[1:]]))
