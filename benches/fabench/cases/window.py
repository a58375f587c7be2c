"""Case 5: causal sliding-window attention (w=1024) at N=8192 and 32768."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..env import progress, thread_limits
from ..peers import (
    FLEX,
    ORT_MHA,
    TORCH,
    band,
    flex_cand,
    numpy_cand,
    ort_gqa_prefill_cand,
    torch_cand,
    visible_pairs,
)
from ..tables import fmt_bytes
from ..timing import FA, Cand
from .base import Case, Run, rand, ratio_target, target

TORCH_MAX_MASK = 256 << 20  # bytes of the (N, N) boolean mask for SDPA
SDPA_MASK = TORCH + "+mask"


def window(run: Run) -> Case:
    """ferroattn ``window=w``, SDPA with the equivalent boolean mask (while it fits),
    FlexAttention compiled (not in ``--quick``), ORT GQA ``local_window_size``, NumPy."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("window")
    h, d, w, ns = (2, 32, 64, (512, 2048)) if cfg.quick else (16, 64, 1024, (8192, 32768))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 5)
    fa_rows: dict[int, dict[str, Any]] = {}
    for n in ns:
        label = f"B=1 H={h} N={n} D={d} w={w}"
        q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
        flops = 4.0 * h * d * visible_pairs(n, w, True)
        with thread_limits(t, fa, peers):
            cands = [Cand(FA, partial(fa.attention, q, k, v, causal=True, window=w))]
            if n * n > TORCH_MAX_MASK:
                why = f"the (N, N) bool mask is {fmt_bytes(n * n)} (dense work {n // w}x ours)"
                cands.append(Cand(SDPA_MASK, status=f"skipped: {why}; too big"))
            else:
                cands.append(torch_cand(peers, q, k, v, mask=band(n, n, True, w), name=SDPA_MASK))
            if cfg.quick:
                cands.append(Cand(FLEX, status="skipped in --quick (torch.compile takes minutes)"))
            else:
                progress(f"  compiling FlexAttention for N={n} (first call) ...")
                cands.append(flex_cand(peers, q, k, v, w))
            cands.append(ort_gqa_prefill_cand(peers, t, q, k, v, window=w))
            cands.append(Cand(ORT_MHA, status="n/a (no sliding window in MultiHeadAttention)"))
            cands.append(numpy_cand(q, k, v, True, w))
            res, ok = run.time(cands)
        case.accuracy_ok &= ok
        fa_ms = res[FA].get("median_ms")
        rows = case.add_all(label, cands, res, threads=t, flops=flops, fa_ms=fa_ms)
        fa_rows[n] = rows[FA]
        ratio_target(rows[FLEX], 3.0, "flex/fa")
        if n == ns[0]:
            ratio_target(rows[SDPA_MASK], 10.0, "sdpa+mask/fa")
        del q, k, v
    small, big = fa_rows[ns[0]], fa_rows[ns[1]]
    if small.get("median_ms") and big.get("median_ms"):
        growth = big["median_ms"] / small["median_ms"]
        big["time_over_smaller_n"] = growth
        target(big, f"time(N={ns[1]}) <= 4.4x time(N={ns[0]})", growth, growth <= 4.4, "")
    return case
