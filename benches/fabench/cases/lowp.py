"""Case 4: bf16 and fp16 inputs against ferroattn's own fp32 throughput."""

from __future__ import annotations

import contextlib
from functools import partial

import numpy as np

from ..env import thread_limits
from ..timing import FA, RTOL, Cand
from .base import Case, Run, rand, target

FP32, BF16, FP16 = f"{FA} fp32", f"{FA} bf16", f"{FA} fp16"


def lowp(run: Run) -> Case:
    """Case 1's shapes with ``ml_dtypes.bfloat16`` and float16 inputs (checked against fp32:
    rel err < 3e-2 bf16, 5e-3 fp16). bf16 >= 1.6x fp32 is a target only where the CPU has
    ``avx512_bf16``; otherwise "never slower than fp32"."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("lowp")
    h, n, dims = (2, 128, (32, 64)) if cfg.quick else (16, 2048, (64, 128))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 4)
    features = []
    with contextlib.suppress(Exception):
        features = [str(f) for f in fa.info().get("cpu_features", [])]
    has_bf16 = "avx512_bf16" in features
    mld = peers.get("ml_dtypes")
    for d in dims:
        label = f"B=1 H={h} N={n} D={d}"
        q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
        flops = 4.0 * h * n * n * d
        cands = [Cand(FP32, partial(fa.attention, q, k, v), ref=None)]
        if mld is None:
            cands.append(Cand(BF16, status=f"ml_dtypes {peers.status('ml_dtypes')}"))
        else:
            qb, kb, vb = (x.astype(mld.bfloat16) for x in (q, k, v))
            call = partial(fa.attention, qb, kb, vb)
            cands.append(Cand(BF16, call, ref=FP32, tol=RTOL["bfloat16"]))
        qh, kh, vh = (x.astype(np.float16) for x in (q, k, v))
        cands.append(Cand(FP16, partial(fa.attention, qh, kh, vh), ref=FP32, tol=RTOL["float16"]))
        with thread_limits(t, fa, peers):
            res, ok = run.time(cands)
        case.accuracy_ok &= ok
        base = res[FP32].get("median_ms")
        for c in cands:
            row = case.add(label, c.name, res[c.name], threads=t, flops=flops)
            med = row.get("median_ms")
            if c.name == FP32 or not med or not base:
                continue
            speed = base / med  # throughput vs our fp32
            row["throughput_vs_fp32"] = speed
            if c.name == FP16:
                target(row, "fp16 throughput >= 1.0x fp32", speed, speed >= 1.0)
            elif has_bf16:
                target(row, "bf16 throughput >= 1.6x fp32", speed, speed >= 1.6)
            else:
                target(row, "bf16 throughput >= 1.0x fp32", speed, speed >= 1.0)
                row["target"]["note"] = "1.6x: not applicable (no avx512_bf16)"
    if not has_bf16:
        case.notes.append(
            "bf16 >= 1.6x fp32 target: not applicable on this CPU (no avx512_bf16 in "
            "ferroattn.info()['cpu_features']); only 'never slower than fp32' is checked"
        )
    return case
