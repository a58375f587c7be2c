"""Case 9: block-sparse time against density, linear attention time against N, and the cost
of a mask or bias that changes nothing."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..timing import FA, Cand
from .base import Case, Run, rand, target


def _density_layout(n_blocks: int, per_row: int, rng: np.random.Generator) -> np.ndarray:
    """A block layout with ``per_row`` live blocks in every row (the diagonal among them)."""
    layout = np.eye(n_blocks, dtype=bool)
    for row in range(n_blocks):
        others = np.setdiff1d(np.arange(n_blocks), [row])
        layout[row, rng.choice(others, size=per_row - 1, replace=False)] = True
    return layout


def _medians(rows: list[dict[str, Any]]) -> list[float] | None:
    """Every row's median, or None if one of them did not run."""
    times = [float(r["median_ms"]) for r in rows if r.get("median_ms")]
    return times if len(times) == len(rows) else None


def variants(run: Run) -> Case:
    """Each sub-case is its own reference (ferroattn only)."""
    fa, cfg = run.fa, run.cfg
    case = Case("variants")
    rng = np.random.default_rng(cfg.seed + 9)
    nt = cfg.threads

    # Block-sparse: the same shape at falling densities.
    h, n, d, bs = (2, 512, 32, 64) if cfg.quick else (8, 4096, 64, 64)
    nb = n // bs
    q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
    cands = []
    for share in (1.0, 0.5, 0.25, 0.125):
        layout = _density_layout(nb, max(1, round(share * nb)), rng)
        call = partial(fa.attention, q, k, v, block_layout=layout, block_size=bs)
        cands.append(Cand(f"{FA} density {share:.3g}", call, ref=None))
    res, ok = run.time(cands)
    case.accuracy_ok &= ok
    label = f"block-sparse H={h} N={n} D={d} bs={bs}"
    rows = list(case.add_all(label, cands, res, threads=nt).values())
    times = _medians(rows)
    if times:
        for r, t in zip(rows, times, strict=True):
            r["time_over_dense"] = t / times[0]
        falling = all(a > b for a, b in zip(times, times[1:], strict=False))
        target(rows[-1], "time falls with density", times[-1] / times[0], falling, unit="")

    # Linear attention: time against N (doubling N should double the time).
    h, d = (2, 32) if cfg.quick else (8, 64)
    lengths = [128, 256, 512] if cfg.quick else [1024, 2048, 4096, 8192]
    lin_rows = []
    for n in lengths:
        q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
        call = partial(fa.linear_attention, q, k, v, causal=True)
        c = Cand(f"{FA} linear causal", call, ref=None)
        res, ok = run.time([c])
        case.accuracy_ok &= ok
        lin_rows.append(case.add(f"linear H={h} N={n} D={d}", c.name, res[c.name], threads=nt))
    lt = _medians(lin_rows)
    if lt:
        growth = lt[-1] / lt[0]
        expected = lengths[-1] / lengths[0]
        lin_rows[-1]["time_over_first"] = growth
        target(
            lin_rows[-1],
            f"time(N={lengths[-1]}) / time(N={lengths[0]}) <= 1.25 x {expected:g} (linear)",
            growth,
            growth <= 1.25 * expected,
            unit="",
        )

    # Mask / bias overhead where they change nothing (all-true, all-zero).
    h, n, d = (2, 256, 32) if cfg.quick else (16, 2048, 64)
    q, k, v = (rand(rng, 1, h, n, d) for _ in range(3))
    ones = np.ones((n, n), dtype=bool)
    zeros = np.zeros((n, n), dtype=np.float32)
    plain_name = f"{FA} plain"
    cands = [
        Cand(plain_name, partial(fa.attention, q, k, v), ref=None),
        Cand(f"{FA} mask all-true", partial(fa.attention, q, k, v, mask=ones), ref=plain_name),
        Cand(f"{FA} bias all-zero", partial(fa.attention, q, k, v, bias=zeros), ref=plain_name),
    ]
    res, ok = run.time(cands)
    case.accuracy_ok &= ok
    label = f"mask/bias H={h} N={n} D={d}"
    rows_by = case.add_all(label, cands, res, threads=nt, flops=4.0 * h * n * n * d)
    plain = rows_by[plain_name]
    for c in cands[1:]:
        row = rows_by[c.name]
        if plain.get("median_ms") and row.get("median_ms"):
            over = row["median_ms"] / plain["median_ms"]
            row["time_over_plain"] = over
            target(row, "time <= 1.10 x plain", over, over <= 1.10, unit="")
    return case
