"""Allocations whose size a caller controls: refused as ``MemoryError`` naming the argument.

NumPy reports an allocation it cannot make in three ways, none of which says which of the
caller's arguments asked for it: ``MemoryError("Unable to allocate 4.00 TiB ...")``,
``ValueError("array is too big; ...")`` when the byte count overflows, and
``ValueError("Maximum allowed dimension exceeded")`` for a shape beyond ``intp``. Every
allocation ferroattn makes on a caller's behalf (results, converted copies, cache storage,
layouts) goes through :func:`allocating`, which turns all three into one ``MemoryError`` whose
message starts with what asked for the memory (the arguments, by name) and the bytes asked for.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["allocating", "empty", "nbytes", "zeros"]

# NumPy's words for a size it cannot even represent (the messages of NumPy 1.x and 2.x).
_TOO_BIG = ("array is too big", "maximum allowed dimension", "maximum supported dimension")
_INT64_MAX = 2**63 - 1


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype``, as an exact Python int (no overflow)."""
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def _refusal(what: str, size: int | None, detail: str) -> MemoryError:
    asked = "" if size is None else f" ({size} bytes)"
    err = MemoryError(f"{what}: cannot allocate the memory asked for{asked}: {detail}")
    err.named = True  # type: ignore[attr-defined]  # an outer `allocating` passes it on as is
    return err


class allocating:  # noqa: N801 - used as a function: `with allocating(...):`
    """Runs the allocations of a ``with`` block, reporting any that fails as a
    ``MemoryError`` that begins with ``what`` (the arguments behind the size, by name) and,
    when given, the bytes asked for (NumPy's own message, which holds its size, follows).

    A class rather than ``contextlib.contextmanager``: it sits on the general call paths,
    where a generator per call would show.
    """

    __slots__ = ("size", "what")

    def __init__(self, what: str, size: int | None = None) -> None:
        self.what, self.size = what, size

    def __enter__(self) -> None:
        if self.size is not None and self.size > _INT64_MAX:
            raise _refusal(self.what, self.size, "more bytes than a 64-bit size holds")

    def __exit__(self, kind: type | None, err: BaseException | None, tb: Any) -> None:
        if err is None or getattr(err, "named", False):
            return  # nothing failed, or an inner `allocating` named it already
        if isinstance(err, ValueError) and not any(w in str(err).lower() for w in _TOO_BIG):
            return
        if isinstance(err, (MemoryError, ValueError, OverflowError)):
            # OverflowError: a dimension beyond intp, from Python ints.
            raise _refusal(self.what, self.size, str(err) or "out of memory") from err


def empty(what: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.empty(shape, dtype)``, refused by name (see :func:`allocating`)."""
    try:  # the plain call first: on the general paths of tiny calls, the checks would show
        return np.empty(shape, dtype=dtype)
    except (MemoryError, ValueError, OverflowError):
        with allocating(what, nbytes(shape, dtype)):
            return np.empty(shape, dtype=dtype)


def zeros(what: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``np.zeros(shape, dtype)``, refused by name (see :func:`allocating`)."""
    try:
        return np.zeros(shape, dtype=dtype)
    except (MemoryError, ValueError, OverflowError):
        with allocating(what, nbytes(shape, dtype)):
            return np.zeros(shape, dtype=dtype)
