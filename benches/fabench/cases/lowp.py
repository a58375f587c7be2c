"""Case 4: bf16 and fp16 inputs, and fp32 at a lower ``precision=``, against ferroattn's own
fp32 throughput, with torch SDPA in fp32 and bf16 beside them."""

from __future__ import annotations

import contextlib
from functools import partial

import numpy as np

from ..env import thread_limits
from ..peers import torch_cand
from ..timing import FA, RTOL, Cand
from .base import Case, Run, rand, target

FP32, BF16, FP16 = f"{FA} fp32", f"{FA} bf16", f"{FA} fp16"
HIGH, MEDIUM = f"{FA} fp32 high", f"{FA} fp32 medium"
TORCH32, TORCH16 = "torch SDPA fp32", "torch SDPA bf16"

# What this case reads from ferroattn.info(): a key, and a name in its "cpu_features"
# (tests/test_info.py checks that both exist in info()'s vocabulary).
INFO_KEYS = ("bf16_dot", "cpu_features")
CPU_FEATURES = ("avx512bf16",)
# Errors of the lower precisions against our fp32 (relative Frobenius): "high" keeps ~16 bits
# of each operand, "medium" ~8 (module ferroattn.precision).
TOL = {HIGH: 1e-4, MEDIUM: RTOL["bfloat16"]}
# Targets on a CPU with bf16 dot products, in throughput over our fp32 of the same shape.
SPEEDUPS = {BF16: 1.6, MEDIUM: 2.5, HIGH: 1.5}


def lowp(run: Run) -> Case:
    """Case 1's shapes, non-causal and causal, with ``ml_dtypes.bfloat16`` and float16 inputs
    (checked against fp32: rel err < 3e-2 bf16, 5e-3 fp16), fp32 at ``precision="high"`` and
    ``"medium"`` (D=128), torch SDPA fp32 and bf16. bf16 >= 1.6x fp32, medium >= 2.5x and
    high >= 1.5x are targets only where ``ferroattn.info()["bf16_dot"]`` (AVX-512 BF16 in use);
    otherwise bf16 and fp16 must never be slower than fp32."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("lowp")
    h, n, dims = (2, 128, (32, 64)) if cfg.quick else (16, 2048, (64, 128))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 4)
    info: dict = {}
    with contextlib.suppress(Exception):
        info = dict(fa.info())
    features = [str(f) for f in info.get("cpu_features", [])]
    dot = bool(info.get("bf16_dot", False))
    mld = peers.get("ml_dtypes")
    for causal in (False, True):
        for d in dims:
            label = f"B=1 H={h} N={n} D={d}" + (" causal" if causal else "")
            q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
            flops = 4.0 * h * n * n * d / (2 if causal else 1)
            att = partial(fa.attention, causal=causal)
            cands = [Cand(FP32, partial(att, q, k, v), ref=None)]
            if mld is None:
                cands.append(Cand(BF16, status=f"ml_dtypes {peers.status('ml_dtypes')}"))
            else:
                qb, kb, vb = (x.astype(mld.bfloat16) for x in (q, k, v))
                cands.append(Cand(BF16, partial(att, qb, kb, vb), ref=FP32, tol=RTOL["bfloat16"]))
            if not causal:
                qh, kh, vh = (x.astype(np.float16) for x in (q, k, v))
                cands.append(Cand(FP16, partial(att, qh, kh, vh), ref=FP32, tol=RTOL["float16"]))
            if d == dims[-1]:
                for name, p in ((HIGH, "high"), (MEDIUM, "medium")):
                    cands.append(
                        Cand(name, partial(att, q, k, v, precision=p), ref=FP32, tol=TOL[name])
                    )
            for name, dtype in ((TORCH32, "float32"), (TORCH16, "bfloat16")):
                c = torch_cand(peers, q, k, v, causal=causal, dtype=dtype, name=name)
                c.ref, c.tol = FP32, RTOL[dtype]
                cands.append(c)
            with thread_limits(t, fa, peers):
                res, ok = run.time(cands)
            case.accuracy_ok &= ok
            base = res[FP32].get("median_ms")
            for c in cands:
                row = case.add(label, c.name, res[c.name], threads=t, flops=flops, fa_ms=base)
                med = row.get("median_ms")
                if c.name in (FP32, TORCH32, TORCH16) or not med or not base:
                    continue
                speed = base / med  # throughput vs our fp32
                row["throughput_vs_fp32"] = speed
                if c.name == FP16:
                    target(row, "fp16 throughput >= 1.0x fp32", speed, speed >= 1.0)
                elif dot:
                    want = SPEEDUPS[c.name]
                    target(row, f"throughput >= {want}x fp32", speed, speed >= want)
                elif c.name == BF16:
                    target(row, "bf16 throughput >= 1.0x fp32", speed, speed >= 1.0)
                    row["target"]["note"] = "1.6x: not applicable (no bf16 dot products)"
            del q, k, v
    if not dot:
        has = "avx512bf16" in features
        case.notes.append(
            "bf16 >= 1.6x, fp32 medium >= 2.5x and high >= 1.5x fp32: not applicable "
            f"(ferroattn.info()['bf16_dot'] is False; avx512bf16 in cpu_features: {has}); "
            "only 'never slower than fp32' is checked"
        )
    return case
