"""Which queries see which keys when the keys are split into ranges, as one kernel call per range
can say it.

A run of consecutive queries at positions ``first .. first + count - 1`` sees key ``j`` when
``p - left <= j <= p + right`` (a side ``None``: unbounded; causal is ``right = 0``). A part of
the keys ``[lo, hi)`` (a shard of a cache, a block of a long prefill) is computed by one call of
the kernels, whose window is counted from the bottom-right alignment inside the call: query
``i`` of ``nq`` sits at key ``i + nk - nq`` of ``nk``. Where the part's queries are not the last
of the whole problem, that alignment is off by a shift, and the window absorbs it: ``(left -
shift, right + shift)``. A side could then go negative (a query whose window ends before the
part's last key), which the kernels do not take; trimming the part to the queries that see at
least one of its keys, and its keys to those some query sees, keeps both sides >= 0 (see
:func:`visible_part`). Pure arithmetic: no arrays, no Ray.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Part", "split", "visible_part"]

Side = int | None


class Part(NamedTuple):
    """What one call computes: queries ``q0 : q0 + q_len`` (indices into the run of queries)
    over keys ``k0 : k0 + k_len`` (positions), with ``window`` ``(left, right)`` counted from
    the call's own bottom-right alignment, ``None`` for a side that hides nothing."""

    q0: int
    q_len: int
    k0: int
    k_len: int
    window: tuple[Side, Side]


def visible_part(first: int, count: int, lo: int, hi: int, left: Side, right: Side) -> Part | None:
    """The part of keys ``[lo, hi)`` that queries at positions ``first .. first + count - 1``
    see through the window ``(left, right)``, or None when no query sees any of them.

    The queries are trimmed to those that see some key of the range and the keys to those
    some query sees; the window comes back shifted to the call's alignment, both sides >= 0.
    """
    if count <= 0 or hi <= lo:
        return None
    # Query i sees a key of the range iff first + i + right >= lo and first + i - left < hi.
    i_lo = 0 if right is None else max(0, lo - right - first)
    i_hi = count if left is None else min(count, hi + left - first)
    if i_lo >= i_hi:
        return None
    p_first, p_last = first + i_lo, first + i_hi - 1
    k_lo = lo if left is None else max(lo, p_first - left)
    k_hi = hi if right is None else min(hi, p_last + right + 1)
    nq, nk = i_hi - i_lo, k_hi - k_lo
    # The call puts the last query at key nk - 1; it really sits at p_last - k_lo.
    shift = (p_last - k_lo) - (nk - 1)
    part_left = None if left is None else left - shift
    part_right = None if right is None else right + shift
    # The trimming above keeps both sides >= 0: the last query sees key k_hi - 1
    # (k_hi <= p_last + right + 1 and p_last - left <= k_hi - 1).
    assert (part_left is None or part_left >= 0) and (part_right is None or part_right >= 0)
    # Sides that reach past every key hide nothing: None, so parts group by what they mask.
    if part_left is not None and part_left >= nk - 1:
        part_left = None
    if part_right is not None and part_right >= nq - 1:
        part_right = None
    return Part(i_lo, nq, k_lo, nk, (part_left, part_right))


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``parts`` contiguous ranges of near-equal length (the first ones one
    longer), empty ranges left out."""
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds
