"""Scores beyond ``q·k``: masks, biases, ALiBi, T5 relative bias, sinks, block-sparse layouts.

Everything here is validated and normalized for the kernels, which apply it tile by tile: no
``N × N`` array is built unless the caller passes one (``mask=`` / ``bias=``), and even those
are read through broadcast strides, never expanded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "T5Bias",
    "alibi_slopes",
    "bigbird_layout",
    "local_global_layout",
    "strided_layout",
]


@dataclass(frozen=True)
class T5Bias:
    """A learned T5-style relative-position bias, computed inside the kernel.

    Args:
        table: ``(num_buckets, heads)``: the bias of each relative-position bucket per query
            head (T5's ``relative_attention_bias.weight``).
        bidirectional: encoder-style buckets (keys before and after the query get separate
            buckets); ``False`` for decoders (only the distance to earlier keys counts).
        max_distance: distances beyond it share the last bucket (T5 uses 128).

    The bucket of key ``j`` for a query at position ``p`` follows T5's
    ``_relative_position_bucket(j − p, ...)``.
    """

    table: Any
    bidirectional: bool = True
    max_distance: int = 128


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The standard ALiBi slopes for ``num_heads`` heads (Press et al.; as in BLOOM/MPT).

    A power of two ``n`` gets ``2^(-8/n · (i+1))``; other counts take those of the next lower
    power of two and interleave the odd ones of the next higher, as the reference code does.

    Example:
        >>> ferroattn.alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


def _blocks(n_blocks: int, name: str = "n_blocks") -> int:
    if not isinstance(n_blocks, (int, np.integer)) or n_blocks < 1:
        raise ValueError(f"{name} must be a positive int, got {n_blocks!r}")
    return int(n_blocks)


def local_global_layout(
    n_blocks: int, *, window: int = 1, global_blocks: int = 1, causal: bool = False
) -> np.ndarray:
    """Longformer: each block sees ``window`` blocks on each side, and the first
    ``global_blocks`` blocks see and are seen by all. Returns a bool ``(n_blocks, n_blocks)``.
    """
    n = _blocks(n_blocks)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    layout = np.abs(i - j) <= window
    layout[:global_blocks, :] = True
    layout[:, :global_blocks] = True
    return np.tril(layout) if causal else layout


def bigbird_layout(
    n_blocks: int,
    *,
    window: int = 1,
    global_blocks: int = 1,
    random_blocks: int = 2,
    seed: int = 0,
    causal: bool = False,
) -> np.ndarray:
    """BigBird: local window + global blocks + ``random_blocks`` random blocks per row."""
    layout = local_global_layout(n_blocks, window=window, global_blocks=global_blocks)
    rng = np.random.default_rng(seed)
    n = layout.shape[0]
    for row in range(n):
        picks = rng.choice(n, size=min(random_blocks, n), replace=False)
        layout[row, picks] = True
    return np.tril(layout) if causal else layout


def strided_layout(
    n_blocks: int, *, local: int = 1, stride: int = 4, causal: bool = True
) -> np.ndarray:
    """Sparse Transformer (strided): the previous ``local`` blocks and every ``stride``-th
    block (the "summary" columns ``j ≡ stride−1 mod stride``)."""
    n = _blocks(n_blocks)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    layout = (np.abs(i - j) < local + 1) | (j % stride == stride - 1)
    return np.tril(layout) if causal else layout


def _per_head(name: str, x: Any, hq: int) -> list[float]:
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (hq,):
        raise ValueError(f"{name} must have one value per query head ({hq},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return [float(v) for v in arr]


_DENSE_KINDS = {"mask": "a boolean array (True = attend)", "bias": "a float array"}


def check_dense_term(
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    dtype_ok: bool,
    shape4: tuple[int, int, int, int],
    ndim: int,
) -> None:
    """The checks of ``mask`` or ``bias`` (``name``) on its dtype and shape alone, so NumPy
    arrays and torch tensors (on any device) meet the same rules and messages.

    ``dtype_ok`` is the array library's answer to "a boolean mask" / "a real bias".
    """
    if not dtype_ok:
        raise TypeError(f"{name} must be {_DENSE_KINDS[name]}, got dtype {dtype}")
    if len(shape) > 4:
        raise ValueError(f"{name} must have at most 4 dimensions, got shape {shape}")
    try:
        fits = np.broadcast_shapes(shape, shape4) == shape4
    except ValueError:
        fits = False
    if not fits:
        want = shape4[4 - ndim :] if ndim < 4 else shape4
        raise ValueError(
            f"{name} of shape {shape} does not broadcast to (B, H, Nq, Nk) = {shape4} "
            f"(for {ndim}-D inputs: {want})"
        )


def extras_kwargs(
    *,
    shape4: tuple[int, int, int, int],
    ndim: int,
    mask: Any = None,
    bias: Any = None,
    alibi_slopes: Any = None,
    rel_bias: Any = None,
    sinks: Any = None,
    block_layout: Any = None,
    block_size: Any = None,
) -> dict[str, Any]:
    """Validate the optional score terms and turn them into the binding's keyword arguments.

    ``shape4`` is ``(B, Hq, Nq, Nk)``; ``ndim`` the rank the caller used (for messages).
    """
    b, hq, nq, nk = shape4
    out: dict[str, Any] = {}
    if mask is not None:
        m = np.asarray(mask)
        check_dense_term("mask", m.shape, m.dtype, m.dtype == np.bool_, shape4, ndim)
        out["mask"] = np.broadcast_to(m, shape4).view(np.uint8)
    if bias is not None:
        bb = np.asarray(bias)
        real = bb.dtype.kind in "fiu" or bb.dtype.name == "bfloat16"
        check_dense_term("bias", bb.shape, bb.dtype, real, shape4, ndim)
        out["bias"] = np.broadcast_to(bb.astype(np.float32, copy=False), shape4)
    if alibi_slopes is not None:
        out["alibi_slopes"] = _per_head("alibi_slopes", alibi_slopes, hq)
    if sinks is not None:
        out["sinks"] = _per_head("sinks", sinks, hq)
    if rel_bias is not None:
        if not isinstance(rel_bias, T5Bias):
            raise TypeError(f"rel_bias must be a ferroattn.T5Bias, got {type(rel_bias).__name__}")
        table = np.asarray(rel_bias.table, dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != hq:
            raise ValueError(
                f"rel_bias.table must have shape (num_buckets >= 2, heads={hq}), got {table.shape}"
            )
        buckets = table.shape[0]
        per_side = buckets // 2 if rel_bias.bidirectional else buckets
        if per_side // 2 < 1:
            raise ValueError(f"rel_bias needs at least 2 buckets per direction, got {buckets}")
        if not isinstance(rel_bias.max_distance, (int, np.integer)) or (
            rel_bias.max_distance <= per_side // 2
        ):
            raise ValueError(
                f"rel_bias.max_distance must exceed half the buckets per direction "
                f"({per_side // 2}), got {rel_bias.max_distance!r}"
            )
        out["rel_bias"] = (
            table.ravel().tolist(),
            buckets,
            int(rel_bias.max_distance),
            bool(rel_bias.bidirectional),
        )
    if block_layout is not None or block_size is not None:
        if block_layout is None or block_size is None:
            raise ValueError("block_layout and block_size go together")
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if nq % block_size or nk % block_size:
            raise ValueError(
                f"block_size {block_size} must divide the query length {nq} and the key length {nk}"
            )
        lay = np.asarray(block_layout)
        if lay.dtype != np.bool_:
            raise TypeError(f"block_layout must be a boolean array, got dtype {lay.dtype}")
        want = (nq // block_size, nk // block_size)
        if lay.ndim == 2:
            lay = lay[None]
        if lay.ndim != 3 or lay.shape[1:] != want or lay.shape[0] not in (1, hq):
            raise ValueError(
                f"block_layout must have shape {want} or ({hq}, {want[0]}, {want[1]}) for "
                f"block_size {block_size}, got {np.shape(block_layout)}"
            )
        out["blocks"] = (
            np.ascontiguousarray(lay, dtype=np.uint8).ravel().tolist(),
            lay.shape[0],
            int(block_size),
            want[0],
            want[1],
        )
    return out
