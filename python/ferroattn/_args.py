"""Argument normalization shared by the public functions.

Everything the Rust layer needs arrives as a 4-D ``(B, H, N, D)`` view with a contiguous last
axis and a native float dtype; layouts and ranks are views (strides), never copies. Copies happen
only for float64 or byte-swapped input (computed in float32), for a non-contiguous last axis, and
for misaligned buffers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._memory import empty


def as_array(name: str, x: Any) -> np.ndarray:
    """Return ``x`` as an ndarray, refusing things that are not numeric arrays."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - report any conversion failure as a type problem
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}") from e
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}")
    return arr


# A dict lookup: `dtype.name` is slow enough to matter on tiny calls. bfloat16 (ml_dtypes, not
# imported here) takes the slower check below.
# Native byte order only (a byte-swapped dtype compares unequal): the kernels read these
# without conversion.
NATIVE_CODES: dict[np.dtype, str] = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
}


def dtype_code(arr: np.ndarray) -> str | None:
    """The kernel dtype name of ``arr``, or None when it must be converted to float32 first."""
    dt = arr.dtype
    code = NATIVE_CODES.get(dt)
    if code is not None and dt.isnative:
        return code
    if dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16":
        return "bfloat16"
    return None


def check_dtypes(arrays: dict[str, Any]) -> Any:
    """All inputs (NumPy arrays or torch tensors) must share one floating dtype; return it."""
    dtypes = {name: a.dtype for name, a in arrays.items()}
    for name, dt in dtypes.items():
        if isinstance(dt, np.dtype):
            floating = dt.kind == "f" or dt.name == "bfloat16"
        else:
            floating = dt.is_floating_point  # a torch.dtype
        if not floating:
            raise TypeError(
                f"{name} has dtype {dt}; ferroattn takes float32, float16, bfloat16 "
                "(or float64, computed in float32)"
            )
    first = next(iter(dtypes.values()))
    if any(dt != first for dt in dtypes.values()):
        listed = ", ".join(f"{n}={dt}" for n, dt in dtypes.items())
        raise TypeError(f"inputs must share one dtype, got {listed}")
    return first


def aligned_copy(name: str, arr: np.ndarray, dtype: Any = None) -> np.ndarray:
    """A C-contiguous, aligned copy of ``arr`` (as ``dtype`` when given), refused by name when
    it cannot be allocated. ``np.ascontiguousarray`` is no such copy: it returns a contiguous
    but misaligned array as it is."""
    out = empty(name, arr.shape, arr.dtype if dtype is None else dtype)
    out[...] = arr
    return out


def kernel_ready(name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` itself when the kernels can read it directly (a native kernel dtype, a
    contiguous last axis, aligned to the item size), else one aligned C-order copy of it (in
    float32 when its dtype needs converting)."""
    convert = dtype_code(arr) is None
    last_ok = arr.shape[-1] <= 1 or arr.strides[-1] == arr.itemsize
    if convert or not last_ok or not arr.flags.aligned:
        arr = aligned_copy(name, arr, np.float32 if convert else None)
    return arr


def kernel_views(*views: np.ndarray) -> list[np.ndarray]:
    """The 4-D views of ``q``, ``k`` (, ``v``) as the kernels read them (:func:`kernel_ready`):
    converted or copied only once every argument of the call has been checked."""
    return [kernel_ready(name, a) for name, a in zip("qkv", views, strict=False)]


def as_is(name: str, arr: Any) -> Any:
    """The ``ready`` of :func:`prepare` that leaves the views as they are, for a caller that
    checks more (options, lengths, ``out``) before it makes them :func:`kernel_ready`."""
    return arr


def to_bhsd(name: str, arr: Any, layout: str) -> Any:
    """View an input of rank 2, 3 or 4 in ``layout`` as 4-D head-major ``(B, H, N, D)``.

    A view for NumPy arrays and torch tensors alike (both spell the swap ``swapaxes``).
    """
    if arr.ndim == 4:
        return arr if layout == "bhsd" else arr.swapaxes(1, 2)
    if arr.ndim == 3:
        return arr[None] if layout == "bhsd" else arr.swapaxes(0, 1)[None]
    if arr.ndim == 2:
        return arr[None, None]
    raise ValueError(f"{name} must have 2, 3 or 4 dimensions, got shape {tuple(arr.shape)}")


def from_bhsd_shape(shape4: tuple[int, ...], ndim: int, layout: str) -> tuple[int, ...]:
    """The user-facing shape of a 4-D head-major shape for an input of rank ``ndim``."""
    b, h, n, d = shape4
    if ndim == 4:
        return (b, h, n, d) if layout == "bhsd" else (b, n, h, d)
    if ndim == 3:
        return (h, n, d) if layout == "bhsd" else (n, h, d)
    return (n, d)


def check_layout(layout: Any) -> str:
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    return layout


def check_shapes(q4: Any, k4: Any, v4: Any | None, shapes: str) -> None:
    """q, k (and v) as head-major 4-D views must fit together; ``shapes`` ends each message."""
    b, hq, _, d = q4.shape
    bk, hk, nk, dk = k4.shape
    if d < 1:
        raise ValueError(f"q: head dimension must be at least 1; {shapes}")
    if bk != b:
        raise ValueError(f"q and k have different batch sizes; {shapes}")
    if dk != d:
        raise ValueError(f"q and k have different head dimensions ({d} vs {dk}); {shapes}")
    if hk < 1:
        raise ValueError(f"k: key/value heads must be at least 1, got {hk}; {shapes}")
    if hq % hk:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hk}); {shapes}"
        )
    if v4 is not None:
        if tuple(v4.shape[:3]) != (bk, hk, nk):
            raise ValueError(f"k and v must agree in batch, heads and length; {shapes}")
        if v4.shape[3] < 1:
            raise ValueError(f"v: value dimension must be at least 1; {shapes}")


def prepare(
    named: dict[str, Any],
    layout: Any,
    convert: Callable[[str, Any], Any],
    ready: Callable[[str, Any], Any],
) -> tuple[list[Any], list[Any], Any, int]:
    """Check ``q``, ``k`` (and ``v``) together: ``(inputs, head-major views, dtype, rank)``.

    The one set of checks both paths run, so both raise the same errors: ``convert`` turns a
    caller's argument into the path's array (``as_array`` for NumPy; tensors as they are),
    ``ready`` makes it readable by what computes (``kernel_ready``; ``detach`` for torch).
    """
    layout = check_layout(layout)
    arrays = {n: convert(n, x) for n, x in named.items()}
    dtype = check_dtypes(arrays)
    shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in arrays.items())
    if len({a.ndim for a in arrays.values()}) != 1:
        raise ValueError(f"q, k and v must have the same number of dimensions; got {shapes}")
    ndim = arrays["q"].ndim
    # Shapes first, on the caller's arrays: a float64 input is converted (copied) only once
    # it is known to fit the others.
    views = [to_bhsd(n, a, layout) for n, a in arrays.items()]
    check_shapes(views[0], views[1], views[2] if len(views) == 3 else None, f"got {shapes}")
    if ready is not as_is:
        views = [ready(n, a) for n, a in zip(arrays, views, strict=True)]
    return list(arrays.values()), views, dtype, ndim


def check_packed(named: dict[str, Any]) -> None:
    """Packed (varlen) inputs are 3-D: ``(total_tokens, heads, dim)``."""
    for name, a in named.items():
        if a.ndim != 3:
            raise ValueError(
                f"{name} must be 3-D (total_tokens, heads, dim), got shape {tuple(a.shape)}"
            )


@dataclass(frozen=True, slots=True)
class MaskOptions:
    """Normalized mask and score options, as the binding takes them (its ``mask``; slots, so
    the binding reads each field without a dictionary lookup).

    ``sink_keys``: the leading keys the window does not hide (a window cache's sinks).
    """

    scale: float
    softcap: float | None
    causal: bool
    top_left: bool
    window_left: int | None
    window_right: int | None
    sink_keys: int = 0
    precision: str = "highest"


class Sequences(NamedTuple):
    """Which queries see which keys, as the binding takes it (its ``sequences``): at most one
    description; none means every query of a batch entry sees all of its keys.

    Attributes:
        kv_lengths: valid keys per batch entry (right padding).
        cu_seqlens_q, cu_seqlens_k: packed sequences' cumulative lengths (together).
        explicit: ``(batch, q_start, q_len, k_start, k_len)`` per sequence.
    """

    kv_lengths: list[int] | None = None
    cu_seqlens_q: list[int] | None = None
    cu_seqlens_k: list[int] | None = None
    explicit: list[tuple[int, int, int, int, int]] | None = None


# The largest finite float32: the kernels compute in float32, so an option or a bias beyond
# it would become inf (and scores NaN) there.
F32_MAX = float(np.finfo(np.float32).max)


def check_flag(name: str, x: Any) -> bool:
    """A yes/no option: a bool (or NumPy bool); anything else is refused by name."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {x!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


# Window sides at least this long are unbounded whatever the sequence: no array holds 2**62
# tokens, and the kernels compute positions in 64-bit integers, which a side near 2**63 would
# overflow.
_FAR = 2**62


def _window_side(x: Any, span: int) -> int | None:
    if x is None:
        return None
    if not _is_int(x):
        raise ValueError(f"window sides must be ints, -1 or None, got {x!r}")
    if x == -1:
        return None
    if x < 0:
        raise ValueError(f"window sides must be >= 0 (or -1/None for unbounded), got {x}")
    # A side that reaches past every key and query hides nothing: the same as unbounded.
    return None if x >= span else int(x)


def mask_options(
    *,
    head_dim: int,
    causal: Any,
    window: Any,
    scale: Any,
    softcap: Any,
    span: int = _FAR,
    precision: str = "highest",
) -> MaskOptions:
    """Validate ``causal``, ``window``, ``scale`` and ``softcap``; ``precision`` is one
    that :func:`ferroattn.precision.check_precision` returned.

    ``span``: ``max(Nq, Nk)`` when known. A window side of at least that many tokens sees
    every key a side can reach, so it is passed on as unbounded (exactly the same mask), and
    so is any side of ``2**62`` or more (huge ints included).
    """
    span = min(span, _FAR)
    top_left = False
    if isinstance(causal, str):
        if causal not in ("bottom_right", "top_left"):
            raise ValueError(f"causal must be a bool, 'bottom_right' or 'top_left', got {causal!r}")
        top_left = causal == "top_left"
        is_causal = True
    elif isinstance(causal, (bool, np.bool_)) or (_is_int(causal) and causal in (0, 1)):
        is_causal = bool(causal)
    else:
        raise TypeError(f"causal must be a bool, 'bottom_right' or 'top_left', got {causal!r}")

    if window is None:
        left = right = None
    elif _is_int(window):
        if window < 1:
            raise ValueError(f"window must be >= 1 (the number of keys seen), got {window}")
        left, right = _window_side(window - 1, span), 0
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = _window_side(window[0], span), _window_side(window[1], span)
    else:
        raise ValueError(f"window must be None, an int or a (left, right) pair, got {window!r}")

    if scale is None:
        scale_f = 1.0 / math.sqrt(head_dim)
    else:
        try:
            scale_f = float(scale)
        except (TypeError, ValueError) as e:
            raise TypeError(f"scale must be a number, got {scale!r}") from e
        if not math.isfinite(scale_f):
            raise ValueError(f"scale must be finite, got {scale!r}")
        if abs(scale_f) > F32_MAX:  # the kernels multiply in float32: it would be inf there
            raise ValueError(
                f"scale must lie within float32's range (±{F32_MAX:.4g}), got {scale!r}"
            )

    if softcap is None:
        cap = None
    else:
        try:
            cap = float(softcap)
        except (TypeError, ValueError) as e:
            raise TypeError(f"softcap must be a number, got {softcap!r}") from e
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
        if cap > F32_MAX or np.float32(cap) == 0:  # the kernels divide by it in float32
            raise ValueError(
                f"softcap must be a positive number within float32's range, got {softcap!r}"
            )

    return MaskOptions(scale_f, cap, is_causal, top_left, left, right, precision=precision)


def int_vector(name: str, x: Any, length: int | None = None) -> list[int]:
    """A 1-D array-like of non-negative integers as a list."""
    arr = np.asarray(x)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or (arr.size == 0 and arr.dtype.kind == "f")):
        raise ValueError(
            f"{name} must be a 1-D array of integers, got shape {arr.shape} dtype {arr.dtype}"
        )
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {arr.shape[0]}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must not be negative, got {arr.tolist()}")
    return [int(v) for v in arr]


def valid_counts(lengths: Any, n: int, t: int) -> np.ndarray:
    """A cache's ``lengths=``: the valid new tokens of each of ``n`` sequences (right padding
    of ``t`` tokens), ``n`` ints in ``[0, t]``, as int64; ``t`` each when None."""
    if lengths is None:
        return np.full(n, t, dtype=np.int64)
    counts = np.asarray(lengths)
    if counts.shape != (n,) or counts.dtype.kind not in "iu":
        raise ValueError(
            f"lengths must be {n} integers, got shape {counts.shape} dtype {counts.dtype}"
        )
    if counts.size and (counts.min() < 0 or counts.max() > t):
        raise ValueError(f"lengths must lie in [0, {t}], got {counts.tolist()}")
    return counts.astype(np.int64)


def check_kv_lengths(kv_lengths: Any, batch: int, nk: int) -> list[int] | None:
    """``kv_lengths``: None, or ``batch`` integers in ``[0, nk]`` (the key length)."""
    if kv_lengths is None:
        return None
    lens = int_vector("kv_lengths", kv_lengths, batch)
    if any(n > nk for n in lens):
        raise ValueError(f"kv_lengths must lie in [0, {nk}] (the key length), got {lens}")
    return lens


def check_cu_seqlens(
    cu_seqlens_q: Any, cu_seqlens_k: Any, total_q: int, total_k: int
) -> tuple[list[int], list[int]]:
    """The sequence starts of packed queries and keys, as lists: each starts at 0, never
    decreases and ends at its packed length; both count the same sequences."""
    cq = int_vector("cu_seqlens_q", cu_seqlens_q)
    ck = int_vector("cu_seqlens_k", cu_seqlens_k)
    for name, cu, total in (("cu_seqlens_q", cq, total_q), ("cu_seqlens_k", ck, total_k)):
        if (
            not cu
            or cu[0] != 0
            or cu[-1] != total
            or any(a > b for a, b in zip(cu, cu[1:], strict=False))
        ):
            raise ValueError(
                f"{name} must start at 0, never decrease and end at {total} "
                f"(the packed length); got {cu}"
            )
    if len(cq) != len(ck):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cq)} and {len(ck)}"
        )
    return cq, ck


def check_out_fits(
    out: Any, shape: tuple[int, ...], dtype: Any, dtype_note: str = "", shape_note: str = ""
) -> None:
    """A caller's ``out`` (NumPy array or torch tensor) has the result's dtype and shape.
    ``dtype_note`` and ``shape_note`` follow the expected dtype and shape in its messages."""
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype}{dtype_note}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}{shape_note}")


def check_out(
    out: Any,
    shape: tuple[int, ...],
    dtype: np.dtype,
    inputs: list[np.ndarray],
    dtype_note: str = "",
):
    """Validate a caller's `out=` array: type, dtype, shape, writable, no overlap with inputs
    (named q, k, v). `dtype_note` follows the expected dtype in its error message."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    names = [n for n, _ in zip(("q", "k", "v"), inputs, strict=False)]
    source = f" (the result's, from {', '.join(names)})" if names else ""
    check_out_fits(out, shape, dtype, dtype_note, source)
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, a in zip(("q", "k", "v"), inputs, strict=False):
        if np.may_share_memory(out, a):
            raise ValueError(f"out must not share memory with {name}")


def output_array(
    out: Any, shape: tuple[int, ...], dtype: np.dtype, inputs: list[np.ndarray]
) -> np.ndarray:
    """The array a call writes its result into: the caller's ``out=``, checked (see
    :func:`check_out`), or a new one of ``shape`` and ``dtype``."""
    if out is None:
        return empty("the output of q, k and v", shape, dtype)
    check_out(out, shape, dtype, inputs)
    return out
