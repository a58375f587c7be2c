"""Merging attention computed over disjoint key ranges (split-K / ring / distributed attention)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._args import check_out

__all__ = ["merge_partials"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _as_float_array(name: str, x: Any) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 (ragged lists and the like)
        raise TypeError(f"{name} must be an array, got {type(x).__name__}: {exc}") from exc
    if a.dtype.name not in _FLOAT_NAMES:
        raise TypeError(
            f"{name} must be a float16, bfloat16, float32 or float64 array, got dtype {a.dtype}"
        )
    return a


def _as_list(name: str, x: Any) -> list[Any]:
    if isinstance(x, np.ndarray):  # a stacked (P, ...) array: one part per leading index
        return list(x) if x.ndim > 0 else [x]
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(
            f"{name} must be a sequence of arrays (one per key range), got {type(x).__name__}"
        )
    return list(x)


def merge_partials(
    outputs: Sequence[Any], lses: Sequence[Any], *, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Combine attention over disjoint key ranges into the attention over all of them.

    If the keys/values of one problem are split into disjoint parts ``p`` (a long context spread
    over processes, Ray/Dask workers or devices; chunked prefill against a cache) and each part
    is computed with ``attention(q, k_p, v_p, return_lse=True)``, this returns exactly what
    ``attention(q, k, v, return_lse=True)`` over all keys would (up to rounding)::

        lse = log Σ_p exp(lse_p)
        out = Σ_p exp(lse_p − lse) · out_p

    computed with a max shift (no overflow for large scores) in float64 for the weights and
    float32 (float64 for float64 outputs) for the sums. A part whose ``lse`` is ``-inf`` for a
    row (it saw no key there) contributes nothing to that row, whatever its output holds; a row
    where every part is ``-inf`` gets output 0 and lse ``-inf``, never NaN.

    Masks must be expressed per part so that each part sees exactly the keys the full problem
    would: e.g. bottom-right ``causal=True`` over ``Nk`` keys is, for the part
    ``k[..., a:b, :]``, ``causal=False, window=(None, Nk - b)``.

    Args:
        outputs: a sequence of ``P >= 1`` arrays of one shape ``(..., N, Dv)`` and one dtype
            (float16, bfloat16, float32 or float64), or a stacked array ``(P, ..., N, Dv)``.
        lses: the matching log-sum-exps ``(..., N)`` (float32 as ``return_lse=True`` gives, or
            float64), one per output, or a stacked ``(P, ..., N)`` array. Each must have the
            shape of its output without the last axis: for ``layout="bshd"`` outputs
            ``(B, N, H, Dv)`` pass ``lse.swapaxes(-1, -2)``, for ``attention_varlen`` outputs
            ``lse.T``.
        out: optional array of the outputs' shape and dtype to write the result into (it may be
            one of ``outputs``: the sum is formed in a separate buffer first).

    Returns:
        ``(out, lse)``: the merged output in the outputs' dtype, and the merged lse, float32
        (float64 if any ``lses`` is float64).

    Example:
        >>> import numpy as np, ferroattn
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((2, 64, 32), dtype=np.float32) for _ in range(3))
        >>> parts = [ferroattn.attention(q, k[:, s], v[:, s], return_lse=True)
        ...          for s in (slice(0, 40), slice(40, 64))]
        >>> o, lse = ferroattn.merge_partials([p[0] for p in parts], [p[1] for p in parts])
        >>> bool(np.allclose(o, ferroattn.attention(q, k, v), atol=1e-5))
        True
    """
    outs = [_as_float_array(f"outputs[{i}]", o) for i, o in enumerate(_as_list("outputs", outputs))]
    ls = [_as_float_array(f"lses[{i}]", x) for i, x in enumerate(_as_list("lses", lses))]
    if not outs:
        raise ValueError("outputs must contain at least one array")
    if len(ls) != len(outs):
        raise ValueError(
            f"outputs and lses must have the same length, got {len(outs)} and {len(ls)}"
        )
    shape, dtype = outs[0].shape, outs[0].dtype
    if len(shape) < 1:
        raise ValueError("outputs[0] must have at least 1 dimension (..., N, Dv), got a scalar")
    for i, o in enumerate(outs):
        if o.dtype != dtype:
            raise TypeError(
                f"outputs must share one dtype: outputs[0] is {dtype}, outputs[{i}] is {o.dtype}"
            )
        if o.shape != shape:
            raise ValueError(
                f"outputs must share one shape: outputs[0] is {shape}, outputs[{i}] is {o.shape}"
            )
    for i, x in enumerate(ls):
        if x.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}] has shape {x.shape}, expected {shape[:-1]} (outputs' shape without "
                "the last axis; for layout='bshd' pass lse.swapaxes(-1, -2), for varlen lse.T)"
            )
    if out is not None:
        # Overlap with the parts is harmless: `out` is written once, after the sum.
        check_out(out, shape, dtype, [], dtype_note=" (the outputs' dtype)")

    lse_dtype = np.float64 if any(x.dtype == np.float64 for x in ls) else np.float32
    acc_dtype = np.float64 if dtype == np.float64 else np.float32

    # Weights in float64 (they are (..., N): cheap), max-shifted so nothing overflows.
    lse64 = np.stack([x.astype(np.float64, copy=False) for x in ls])  # (P, ..., N)
    m = lse64.max(axis=0)
    shift = np.where(np.isneginf(m), 0.0, m)  # all parts empty: shift by 0, weights all 0
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.exp(lse64 - shift)  # -inf parts -> exactly 0
        total = w.sum(axis=0)
        empty = total == 0.0
        with np.errstate(divide="ignore"):
            merged_lse = np.where(empty, -np.inf, shift + np.log(np.where(empty, 1.0, total)))
        w /= np.where(empty, 1.0, total)

    acc = np.zeros(shape, dtype=acc_dtype)
    for o, wp, lp in zip(outs, w, lse64, strict=True):
        seen = ~np.isneginf(lp)
        if not seen.any():
            continue
        contrib = wp.astype(acc_dtype)[..., None] * o.astype(acc_dtype, copy=False)
        if seen.all():
            acc += contrib
        else:  # rows this part did not see: ignore whatever it wrote there (0, NaN, garbage)
            acc += np.where(seen[..., None], contrib, 0)

    if out is None:
        result = acc if acc.dtype == dtype else acc.astype(dtype)
    else:
        out[...] = acc
        result = out
    return result, np.asarray(merged_lse, dtype=lse_dtype)
