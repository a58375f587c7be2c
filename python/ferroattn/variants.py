"""Scores beyond ``q·k``: masks, biases, ALiBi, T5 relative bias, sinks, block-sparse layouts.

Everything here is validated and normalized for the kernels (into a :class:`Variants`, the
binding's ``variants``), which apply it tile by tile: no ``N × N`` array is built unless the
caller passes one (``mask=`` / ``bias=``), and even those are read through broadcast strides,
never expanded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._args import F32_MAX, aligned_copy
from ._memory import allocating

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


class RelBias(NamedTuple):
    """A :class:`T5Bias` as the kernels take it: the table ``(num_buckets, heads)`` flat."""

    table: list[float]
    num_buckets: int
    max_distance: int
    bidirectional: bool


class BlockLayout(NamedTuple):
    """A block-sparse layout as the kernels take it: ``(heads, q_blocks, k_blocks)`` flat,
    nonzero where a block of queries sees a block of keys."""

    layout: list[int]
    heads: int
    block: int
    q_blocks: int
    k_blocks: int


@dataclass(frozen=True, slots=True)
class Variants:
    """The score variants of a call, validated and normalized (each None when not given).

    ``mask`` (uint8, nonzero = visible) and ``bias`` (float32) are broadcast views of shape
    ``(B, Hq, Nq, Nk)``; ``alibi_slopes`` and ``sinks`` one float per query head.
    """

    alibi_slopes: list[float] | None = None
    sinks: list[float] | None = None
    rel_bias: RelBias | None = None
    bias: np.ndarray | None = None
    mask: np.ndarray | None = None
    blocks: BlockLayout | None = None


# More heads than any model has by orders of magnitude (and 4 MiB of slopes): a count beyond
# it is a mistake, refused before anything is built.
MAX_ALIBI_HEADS = 2**20


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The standard ALiBi slopes for ``num_heads`` heads (Press et al.; as in BLOOM/MPT).

    A power of two ``n`` gets ``2^(-8/n · (i+1))``; other counts take those of the next lower
    power of two and interleave the odd ones of the next higher, as the reference code does.
    ``num_heads`` is an int in ``[1, 2**20]``.

    Example:
        >>> ferroattn.alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if num_heads > MAX_ALIBI_HEADS:
        raise ValueError(f"num_heads must be at most {MAX_ALIBI_HEADS}, got {num_heads}")
    n = int(num_heads)

    def power_of_two(m: int) -> np.ndarray:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return start ** np.arange(1, m + 1, dtype=np.float64)

    low = 2 ** math.floor(math.log2(n))
    slopes = power_of_two(low)
    if low != n:
        slopes = np.concatenate([slopes, power_of_two(2 * low)[0::2][: n - low]])
    return slopes.astype(np.float32)


def _count(name: str, x: Any, lo: int = 0) -> int:
    """A count option of the layout helpers: an int (a bool counts as 0 or 1) of at least
    ``lo``."""
    if not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {x!r}")
    if x < lo:
        raise ValueError(f"{name} must be at least {lo}, got {x}")
    return int(x)


def _blocks(n_blocks: int, name: str = "n_blocks") -> int:
    if not isinstance(n_blocks, (int, np.integer)) or n_blocks < 1:
        raise ValueError(f"{name} must be a positive int, got {n_blocks!r}")
    return int(n_blocks)


def _building(n: int) -> allocating:
    """The allocations of an ``(n, n)`` layout, refused by name when they cannot be made."""
    return allocating(f"a layout of n_blocks={n} blocks squared", n * n)


def local_global_layout(
    n_blocks: int, *, window: int = 1, global_blocks: int = 1, causal: bool = False
) -> np.ndarray:
    """Longformer: each block sees ``window`` blocks on each side, and the first
    ``global_blocks`` blocks see and are seen by all. Returns a bool ``(n_blocks, n_blocks)``.

    ``window`` and ``global_blocks`` are ints ``>= 0``.
    """
    n = _blocks(n_blocks)
    w, g = _count("window", window), _count("global_blocks", global_blocks)
    with _building(n):
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        layout = np.abs(i - j) <= min(w, n)
        layout[:g, :] = True
        layout[:, :g] = True
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
    """BigBird: local window + global blocks + ``random_blocks`` random blocks per row.

    Counts are ints ``>= 0``; ``seed`` a non-negative int (the same seed, the same layout).
    """
    n = _blocks(n_blocks)
    picks = min(_count("random_blocks", random_blocks), n)
    rng = np.random.default_rng(_count("seed", seed))
    layout = local_global_layout(n, window=window, global_blocks=global_blocks)
    for row in range(n):
        layout[row, rng.choice(n, size=picks, replace=False)] = True
    return np.tril(layout) if causal else layout


def strided_layout(
    n_blocks: int, *, local: int = 1, stride: int = 4, causal: bool = True
) -> np.ndarray:
    """Sparse Transformer (strided): the previous ``local`` blocks and every ``stride``-th
    block (the "summary" columns ``j ≡ stride−1 mod stride``). ``local >= 0``, ``stride >= 1``.
    """
    n = _blocks(n_blocks)
    loc, st = _count("local", local), _count("stride", stride, lo=1)
    with _building(n):
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        layout = np.abs(i - j) < min(loc, n) + 1
        if st <= n:  # a longer stride has no summary column among n blocks
            layout |= j % st == st - 1
        return np.tril(layout) if causal else layout


def _beyond_float32(x: np.ndarray) -> bool:
    """Whether ``x`` holds finite values that float32 cannot (they would be inf there)."""
    if x.dtype.kind != "f" or x.dtype.itemsize <= 4 or x.size == 0:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.any(np.isfinite(x) & (np.abs(x) > F32_MAX)))


def _per_head(name: str, x: Any, hq: int) -> list[float]:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be numbers, one per query head, got {x!r:.80}") from e
    if arr.shape != (hq,):
        raise ValueError(f"{name} must have one value per query head of q ({hq},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if _beyond_float32(arr):
        raise ValueError(f"{name} holds values beyond float32's range (±{F32_MAX:.4g})")
    return [float(v) for v in arr]


def _stored_values(x: np.ndarray) -> np.ndarray:
    """The values ``x`` holds, once each: its broadcast (zero-stride) axes cut to length 1."""
    return x[tuple(slice(0, 1) if st == 0 else slice(None) for st in x.strides)]


def _bias_float32(bb: np.ndarray) -> np.ndarray:
    """``bias`` as an aligned float32 array of its shape, converting only the values it holds
    (a broadcast view stays a broadcast view); finite values beyond float32 are refused."""
    held = _stored_values(bb)
    if _beyond_float32(held):
        raise ValueError(
            f"bias holds values beyond float32's range (±{F32_MAX:.4g}), where the kernels "
            "add it to the scores"
        )
    if held.dtype != np.float32 or not held.flags.aligned:
        held = aligned_copy("bias", held, np.float32)
    return np.broadcast_to(held, bb.shape)


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
            f"{name} of shape {shape} does not broadcast to (B, H, Nq, Nk) = {shape4}, "
            f"the shapes of q and k (for {ndim}-D inputs: {want})"
        )


def normalize_variants(
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
) -> Variants | None:
    """Validate the optional score terms and turn them into the binding's :class:`Variants`
    (None when no term is given).

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
        out["bias"] = np.broadcast_to(_bias_float32(bb), shape4)
    if alibi_slopes is not None:
        out["alibi_slopes"] = _per_head("alibi_slopes", alibi_slopes, hq)
    if sinks is not None:
        out["sinks"] = _per_head("sinks", sinks, hq)
    if rel_bias is not None:
        if not isinstance(rel_bias, T5Bias):
            raise TypeError(f"rel_bias must be a ferroattn.T5Bias, got {type(rel_bias).__name__}")
        try:
            table = np.asarray(rel_bias.table, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"rel_bias.table must be an array of numbers: {e}") from e
        if table.ndim != 2 or table.shape[1] != hq:
            raise ValueError(
                f"rel_bias.table must have shape (num_buckets >= 2, heads={hq}: the query heads "
                f"of q), got {table.shape}"
            )
        if _beyond_float32(table):
            raise ValueError(f"rel_bias.table holds values beyond float32's range (±{F32_MAX:.4g})")
        table = table.astype(np.float32)
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
        if rel_bias.max_distance >= 2**64:  # the kernels take it as a 64-bit count
            raise ValueError(
                f"rel_bias.max_distance must be below 2**64, got {rel_bias.max_distance}"
            )
        out["rel_bias"] = RelBias(
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
                f"block_size {block_size} must divide the query length {nq} of q and the key "
                f"length {nk} of k"
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
                f"block_size {block_size} and the heads and lengths of q and k, "
                f"got {np.shape(block_layout)}"
            )
        out["blocks"] = BlockLayout(
            np.ascontiguousarray(lay, dtype=np.uint8).ravel().tolist(),
            lay.shape[0],
            int(block_size),
            int(want[0]),
            int(want[1]),
        )
    return Variants(**out) if out else None
