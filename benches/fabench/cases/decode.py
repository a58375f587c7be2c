"""Case 6: one decode step from a KV cache (32 query / 8 KV heads, D=128, 32768 tokens)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..env import short, thread_limits
from ..peers import (
    NUMPY,
    ORT_GQA,
    TORCH,
    kv_bytes,
    numpy_cand,
    ort_gqa_decode_cand,
    reference64,
    torch_cand,
)
from ..timing import FA, RTOL, Cand, Flusher
from .base import Case, Run, rand, ratio_target, target

CACHE_DTYPES = ("float32", "float16", "int8")
FA32 = f"{FA} KVCache float32"


def decode(run: Run) -> Case:
    """``KVCache.attend`` per cache dtype, torch SDPA ``enable_gqa`` and NumPy on the float32
    arrays, ORT GQA one decode step (over L + 1 keys); 256 MiB read before every timed call
    (untimed), so that a step reads its cache from memory as in a real model. Every output is
    checked against a float64 reference over the same keys."""
    fa, peers, cfg = run.fa, run.peers, run.cfg
    case = Case("decode")
    h, hkv, d, length = (8, 2, 32, 512) if cfg.quick else (32, 8, 128, 32768)
    flush_mib = 0 if cfg.quick else 256
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 6)
    label = f"Hq={h} Hkv={hkv} D={d} L={length}"
    q = rand(rng, 1, h, 1, d)
    k, v = (rand(rng, 1, hkv, length, d) for _ in range(2))
    k_new, v_new = (rand(rng, 1, hkv, 1, d) for _ in range(2))
    refs = {
        "past": reference64(q, k, v),
        "past+new": reference64(
            q, np.concatenate([k, k_new], axis=2), np.concatenate([v, v_new], axis=2)
        ),
    }
    flush = Flusher(flush_mib)
    cands: list[Cand] = []
    nbytes: dict[str, int] = {}
    caches: list[Any] = []
    with thread_limits(t, fa, peers):
        for dt in CACHE_DTYPES:
            name = f"{FA} KVCache {dt}"
            try:
                cache = fa.KVCache(1, hkv, d, length, dtype=dt)
                cache.append(k, v)
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                cands.append(Cand(name, status=f"failed: {short(exc)}"))
                continue
            caches.append(cache)
            cands.append(Cand(name, partial(cache.attend, q), ref="past", tol=RTOL[dt]))
            nbytes[name] = kv_bytes(dt, hkv, length, d)
        cands.append(torch_cand(peers, q, k, v, gqa=True))
        cands.append(ort_gqa_decode_cand(peers, t, q, k, v, k_new, v_new, case.notes))
        cands.append(numpy_cand(q, k, v))
        cands[-3].ref = cands[-1].ref = "past"
        nbytes[TORCH] = nbytes[NUMPY] = kv_bytes("float32", hkv, length, d)
        nbytes[ORT_GQA] = kv_bytes("float32", hkv, length + 1, d)
        res, ok = run.time(cands, refs, flush=flush)
        caches.clear()
    case.accuracy_ok &= ok
    fa_ms = res.get(FA32, {}).get("median_ms")
    bw = run.ceil.bandwidth_gbs(t)
    rows = {
        c.name: case.add(
            label, c.name, res[c.name], threads=t, nbytes=nbytes.get(c.name), fa_ms=fa_ms
        )
        for c in cands
    }
    for name, row in rows.items():
        if name.startswith(FA) and row.get("gbs") is not None:
            pct = 100.0 * row["gbs"] / bw
            target(row, "K/V read >= 80% of bandwidth", pct, pct >= 80.0, "%")
    ratio_target(rows[ORT_GQA], 2.0, "ort GQA/fa fp32")
    ratio_target(rows[TORCH], 5.0, "torch/fa fp32")
    case.notes.append(
        f"decode: caches flushed before every timed call ({flush_mib} MiB read, untimed); "
        "peer/fa ratios are against the float32 KVCache row; ORT attends over L+1 keys "
        "(the new token appended in place, as in bench_decode.py)"
    )
    return case
