"""Rotary position embedding (RoPE), vectorized NumPy."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._args import as_array
from ._memory import allocating, empty

__all__ = ["rope"]

_INT64_MAX = 2**63 - 1


def _float_dtype(name: str, x: np.ndarray) -> np.dtype:
    dt = x.dtype
    if dt.name == "bfloat16" or (dt.kind == "f" and dt.itemsize in (2, 4, 8)):
        return dt
    raise TypeError(
        f"{name} has dtype {dt}; rope takes float32, float16, bfloat16 or float64, "
        f"got shape {x.shape}"
    )


def _check_rotary_dim(rotary_dim: Any, d: int, shape: tuple[int, ...]) -> int:
    if d % 2:
        raise ValueError(f"x: the last axis (head dimension) must be even, got shape {shape}")
    if rotary_dim is None:
        return d
    if isinstance(rotary_dim, (bool, np.bool_)) or not isinstance(
        rotary_dim, (numbers.Integral, np.integer)
    ):
        raise TypeError(f"rotary_dim must be an int, got {rotary_dim!r}")
    rd = int(rotary_dim)
    if rd < 2 or rd > d or rd % 2:
        raise ValueError(
            f"rotary_dim must be even and in [2, {d}] (the head dimension of x {shape}), got {rd}"
        )
    return rd


def _check_positions(positions: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Positions as int64, shaped to broadcast against ``x.shape[:-1]``."""
    pos = as_array("positions", positions)
    if pos.dtype.kind not in "iu" and not (pos.size == 0 and pos.dtype.kind == "f"):
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
    if pos.dtype.kind == "u" and pos.dtype.itemsize == 8 and pos.size and pos.max() > _INT64_MAX:
        # Not wrapped to negative positions, as a cast to int64 would.
        raise ValueError(f"positions must fit in int64 (at most 2**63 - 1), got {pos.max()}")
    pos = pos.astype(np.int64, copy=False)
    n = shape[-2]
    if pos.ndim == 1 and pos.shape[0] == n:
        return pos
    if pos.ndim == 2 and len(shape) == 4 and pos.shape == (shape[0], n):
        # Per-sequence positions (B, N) are shared by all heads of x (B, H, N, D).
        return pos[:, None, :]
    raise ValueError(
        f"positions must have shape (N,) = ({n},), or (B, N) for x of shape (B, H, N, D); "
        f"got positions {pos.shape} for x {shape}"
    )


def _cos_sin(
    pos: np.ndarray, half: int, rd: int, theta: float, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    # Angles in float64: positions reach 1e5+ and float32 would lose the low-frequency phase.
    inv_freq = theta ** (-np.arange(0, rd, 2, dtype=np.float64)[:half] / rd)
    angles = pos[..., None].astype(np.float64) * inv_freq
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope(
    x: Any,
    positions: Any,
    *,
    theta: float = 10000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rotate pairs of features of ``x`` by angles proportional to the token positions.

    Pair ``i`` (of ``rd / 2``, ``rd = rotary_dim or D``) is rotated by
    ``position · theta^(-2i / rd)``; features past ``rd`` pass through unchanged. After the
    rotation, ``q·k`` depends on the positions of ``q`` and ``k`` only through their difference.

    Args:
        x: ``(..., N, D)`` queries or keys, e.g. ``(B, H, N, D)`` or ``(N, D)``; ``D`` even.
            float32, float16, bfloat16 (``ml_dtypes``) or float64.
        positions: integer positions of the ``N`` tokens: ``(N,)``, shared by everything in
            front of the token axis, or ``(B, N)`` for 4-D ``x`` ``(B, H, N, D)`` (one row per
            sequence, shared by its heads).
        theta: the base of the frequencies (10000 in Llama 2, 500000 in Llama 3).
        interleaved: pair feature ``2i`` with ``2i + 1`` (GPT-J, Meta's original Llama code).
            By default pair ``i`` with ``i + rd/2`` (GPT-NeoX, Hugging Face ``rotate_half``).
        rotary_dim: rotate only the first ``rotary_dim`` features (even, at most ``D``; partial
            rotary as in GPT-NeoX / Phi).
        out: array of ``x``'s shape and dtype to write into; may be ``x`` itself (in place).

    Returns:
        The rotated array, of ``x``'s shape and dtype (``out`` when given). Angles are computed
        in float64, the rotation in float32 (float64 for float64 input).

    Raises:
        ValueError: odd ``D`` or ``rotary_dim``, positions of the wrong shape or beyond
            int64 (a uint64 position ``>= 2**63``), a bad ``theta`` or ``out`` shape.
        MemoryError: a result (or working array) too large to allocate, naming ``x``.
        TypeError: non-float ``x``, non-integer positions, ``out`` of another dtype.

    Example:
        >>> import numpy as np
        >>> from ferroattn.rope import rope
        >>> q = np.ones((1, 2, 4, 8), np.float32)           # (B, H, N, D)
        >>> rope(q, np.arange(4)).shape
        (1, 2, 4, 8)
        >>> bool(np.allclose(rope(q, np.zeros(4, int)), q))  # position 0: no rotation
        True
    """
    x = as_array("x", x)
    dtype = _float_dtype("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, D) with at least 2 axes, got {x.shape}")
    rd = _check_rotary_dim(rotary_dim, x.shape[-1], x.shape)
    pos = _check_positions(positions, x.shape)
    try:
        theta_f = float(theta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"theta must be a number, got {theta!r}") from e
    if not (math.isfinite(theta_f) and theta_f > 0):
        raise ValueError(f"theta must be a positive finite number, got {theta!r}")
    if out is None:
        out = empty("the output of x", x.shape, dtype)
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
        if out.dtype != dtype:
            raise TypeError(f"out has dtype {out.dtype}, expected {dtype} (the dtype of x)")
        if out.shape != x.shape:
            raise ValueError(f"out has shape {out.shape}, expected {x.shape} (the shape of x)")
        if not out.flags.writeable:
            raise ValueError("out is read-only")

    compute = np.float64 if dtype == np.float64 else np.float32
    half = rd // 2
    # The angles and rotated halves are as large as x (positions may be a broadcast view).
    with allocating("x and positions (the rotation's working arrays)"):
        cos, sin = _cos_sin(pos, half, rd, theta_f, compute)
        if interleaved:
            first, second = slice(0, rd, 2), slice(1, rd, 2)
        else:
            first, second = slice(0, half), slice(half, rd)
        # astype copies, so both halves are read before anything is written: out may alias x.
        a = x[..., first].astype(compute)
        b = x[..., second].astype(compute)
        out[..., first] = a * cos - b * sin
        out[..., second] = b * cos + a * sin
    if rd < x.shape[-1] and out is not x:
        out[..., rd:] = x[..., rd:]
    return out
