"""Cases 1 and 2: fp32 prefill, non-causal and causal, and case 7: its thread scaling."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import partial

import numpy as np

from ..env import thread_limits
from ..peers import (
    ORT_GQA,
    ORT_MHA,
    TORCH,
    numpy_cand,
    ort_gqa_prefill_cand,
    ort_mha_cand,
    torch_cand,
)
from ..timing import FA, Cand
from .base import Case, Run, rand, ratio_target, target

FA_NONCAUSAL = f"{FA} non-causal"


def prefill(run: Run, causal: bool) -> Case:
    """ferroattn, torch SDPA, ORT MHA (and GQA when causal) and NumPy at H=16 N=2048,
    D=64 and 128; causal also times ferroattn non-causal in the same round-robin."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("causal" if causal else "prefill")
    h, n, dims = (2, 128, (32, 64)) if cfg.quick else (16, 2048, (64, 128))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed)
    for d in dims:
        label = f"B=1 H={h} N={n} D={d}"
        q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
        dense = 4.0 * h * n * n * d
        with thread_limits(t, fa, peers):
            cands = [Cand(FA, partial(fa.attention, q, k, v, causal=causal))]
            if causal:
                cands.append(Cand(FA_NONCAUSAL, partial(fa.attention, q, k, v), ref=None))
            cands.append(torch_cand(peers, q, k, v, causal=causal))
            cands.append(ort_mha_cand(peers, t, q, k, v, causal))
            if causal:
                cands.append(ort_gqa_prefill_cand(peers, t, q, k, v))
            else:
                cands.append(Cand(ORT_GQA, status="n/a (GroupQueryAttention is causal only)"))
            cands.append(numpy_cand(q, k, v, causal))
            res, ok = run.time(cands)
        case.accuracy_ok &= ok
        fa_ms = res[FA].get("median_ms")
        rows = {
            c.name: case.add(
                label,
                c.name,
                res[c.name],
                threads=t,
                flops=dense if c.name == FA_NONCAUSAL or not causal else dense / 2,
                fa_ms=fa_ms,
            )
            for c in cands
        }
        if causal:
            nc, fr = rows[FA_NONCAUSAL], rows[FA]
            ratio = fa_ms / nc["median_ms"] if nc.get("median_ms") and fa_ms else None
            fr["causal_over_noncausal"] = ratio
            target(fr, "causal/non-causal time <= 0.55", ratio, (ratio or 1) <= 0.55, "")
            ratio_target(rows[ORT_GQA], 1.5, "ort GQA/fa")
        else:
            ratio_target(rows[ORT_MHA], 1.0, "ort MHA/fa")
            ratio_target(rows[TORCH], 2.5, "torch/fa")
        del q, k, v
    return case


def scaling(run: Run) -> Case:
    """Case 1 at D=64 on 1 thread and on ``--threads`` (2 if that is 1), interleaved:
    ``set_num_threads`` runs untimed before each call."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("scaling")
    h, n, d = (2, 128, 32) if cfg.quick else (16, 2048, 64)
    hi = cfg.threads if cfg.threads > 1 else 2
    rng = np.random.default_rng(cfg.seed + 7)
    label = f"B=1 H={h} N={n} D={d}"
    q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
    flops = 4.0 * h * n * n * d
    prev = fa.get_num_threads()

    def threads(nt: int) -> Callable[[], None]:
        return lambda: fa.set_num_threads(nt)

    call = partial(fa.attention, q, k, v)
    cands = [
        Cand(f"{FA} 1 thread", call, ref=None, setup=threads(1)),
        Cand(f"{FA} {hi} threads", call, ref=f"{FA} 1 thread", setup=threads(hi)),
    ]
    tpc = peers.get("threadpoolctl")
    limiter = tpc.threadpool_limits(limits=hi, user_api="blas") if tpc else contextlib.nullcontext()
    try:
        with limiter:
            res, ok = run.time(cands)
    finally:
        fa.set_num_threads(prev)
    case.accuracy_ok &= ok
    one = case.add(label, cands[0].name, res[cands[0].name], threads=1, flops=flops)
    many = case.add(label, cands[1].name, res[cands[1].name], threads=hi, flops=flops)
    if one.get("median_ms") and many.get("median_ms"):
        s = one["median_ms"] / many["median_ms"]
        many["speedup_over_1_thread"] = s
        target(many, f"{hi} threads vs 1 >= {0.925 * hi:g}x", s, s >= 0.925 * hi)
    if hi > (os.cpu_count() or 1):
        case.notes.append(f"scaling: {hi} threads on {os.cpu_count()} logical CPUs")
    return case
