"""Case 3: a batch of small shapes, and the fixed cost of one tiny call."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ..env import thread_limits
from ..peers import TORCH, numpy_cand, ort_mha_cand, torch_cand
from ..timing import FA, Cand, gc_off, per_call_us
from .base import Case, Run, rand, ratio_target, target


def small(run: Run) -> Case:
    """B=32 H=12 N=128 D=32 against every peer; then B=1 H=1 N=1 D=8 called 5000 times per
    repeat (ferroattn and torch), µs per call."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("small")
    b, h, n, d = (4, 2, 32, 16) if cfg.quick else (32, 12, 128, 32)
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 3)
    label = f"B={b} H={h} N={n} D={d}"
    q, k, v = (rand(rng, b, h, n, d) for _ in range(3))
    with thread_limits(t, fa, peers):
        cands = [
            Cand(FA, partial(fa.attention, q, k, v)),
            torch_cand(peers, q, k, v),
            ort_mha_cand(peers, t, q, k, v, False),
            numpy_cand(q, k, v),
        ]
        res, ok = run.time(cands)
    case.accuracy_ok &= ok
    flops = 4.0 * b * h * n * n * d
    rows = case.add_all(label, cands, res, threads=t, flops=flops, fa_ms=res[FA].get("median_ms"))
    ratio_target(rows[TORCH], 1.5, "torch/fa")
    _overhead(run, case, rng)
    return case


def _overhead(run: Run, case: Case, rng: np.random.Generator) -> None:
    """Per-call overhead: many calls on a tiny input, median of the repeats (µs per call)."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    t = cfg.threads
    label = "overhead B=1 H=1 N=1 D=8"
    tq, tk, tv = (rand(rng, 1, 1, 1, 8) for _ in range(3))
    calls = 300 if cfg.quick else 5000
    fns: dict[str, Callable[[], Any]] = {FA: partial(fa.attention, tq, tk, tv)}
    torch = peers.get("torch")
    if torch is not None:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        xt = [torch.from_numpy(x) for x in (tq, tk, tv)]

        def torch_tiny() -> Any:
            with torch.inference_mode():
                return sdpa(*xt)

        fns[TORCH] = torch_tiny
    us: dict[str, list[float]] = {name: [] for name in fns}
    reps = max(cfg.repeats, 3)
    with thread_limits(t, fa, peers), gc_off():
        for fn in fns.values():
            per_call_us(fn, max(10, calls // 10))  # warm-up
        names = list(fns)
        for r in range(reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                us[name].append(per_call_us(fns[name], calls))
    fa_us = statistics.median(us[FA])
    for name, vals in us.items():
        med = statistics.median(vals)
        stats = {
            "status": "ok",
            "median_ms": med / 1e3,
            "min_ms": min(vals) / 1e3,
            "max_ms": max(vals) / 1e3,
            "spread": (max(vals) - min(vals)) / med if med > 0 else None,
            "per_call_us": med,
            "calls_per_repeat": calls,
        }
        row = case.add(label, name, stats, threads=t, fa_ms=fa_us / 1e3)
        if name == FA:
            target(row, "per call < 10 us", med, med < 10.0, "us")
    if torch is None:
        case.add(label, TORCH, {"status": peers.status("torch")}, threads=t)
