"""The masks transformers asks for, said as ferroattn options instead of ``(B, 1, Nq, Nk)`` arrays.

transformers builds one mask per layer type and hands it to every attention call of that type.
SDPA's builder materializes causal, padded and sliding-window layers as a dense boolean mask,
which ferroattn's kernels would then scan entry by entry. ferroattn says all of those natively
(causal alignment, a window, one valid key range per sequence), so :func:`build_mask` returns
a small :class:`NativeMask` for them and keeps the dense mask only for what those options
cannot say (chunked or packed layers, image-token overlays, padding with holes).

A mask function is recognized by what it is, never by sampling it: transformers' own
``causal_mask_function``, ``bidirectional_mask_function``, and the pair
``and_masks(sliding_window_overlay(w), causal_mask_function)`` that
``sliding_window_causal_mask_function(w)`` returns. Anything else, or another version's
functions that do not look like these, falls back to the dense mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)

__all__ = ["NativeMask", "build_mask", "sequences"]

# Code objects of the closures transformers builds (shared by every closure of one function).
_AND_CODE = and_masks(causal_mask_function).__code__
_WINDOW_CODE = sliding_window_overlay(1).__code__

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class NativeMask:
    """What one mask of a forward pass says, in positions (not array indices).

    Attributes:
        causal: a query sees no later key.
        window: a query at position ``p`` sees keys ``p - window < j <= p`` (None: unbounded).
        q_offset: the position of the first query.
        kv_offset: the position of the first key the attention call is given as a tensor.
        ranges: per sequence, the positions ``[lo, hi)`` of its valid (unpadded) tokens; None
            when every token is valid.
    """

    causal: bool
    window: int | None
    q_offset: int
    kv_offset: int
    ranges: Ranges | None


def _closure(f: Callable[..., Any], name: str) -> Any:
    return f.__closure__[f.__code__.co_freevars.index(name)].cell_contents  # type: ignore[index]


def _pattern(mask_function: Any, local_size: Any) -> tuple[bool, int | None] | None:
    """``(causal, window)`` when ``mask_function`` is one ferroattn says natively, else None."""
    if mask_function is causal_mask_function:
        return True, None
    if mask_function is bidirectional_mask_function:
        return False, None
    code = getattr(mask_function, "__code__", None)
    if code is not _AND_CODE or local_size is None:
        return None
    parts = _closure(mask_function, "mask_functions")
    if len(parts) != 2 or parts[1] is not causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__code__", None) is not _WINDOW_CODE:
        return None
    window = _closure(overlay, "sliding_window")
    return (True, int(window)) if window == local_size else None


def valid_ranges(padding: Any) -> Ranges | None | bool:
    """Per sequence, the positions ``[lo, hi)`` of a 2-D padding mask's ones: None when all
    are ones, False when some row's ones are not one run (left and right padding are)."""
    if padding is None:
        return None
    m = padding.to(torch.bool)
    if bool(m.all()):
        return None
    n = m.shape[1]
    runs = m[:, 0].to(torch.int64) + (m[:, 1:] & ~m[:, :-1]).sum(1)
    if bool((runs > 1).any()):
        return False
    lo = m.to(torch.int8).argmax(1)
    hi = n - m.flip(1).to(torch.int8).argmax(1)
    empty = ~m.any(1)
    lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)
    return list(zip(lo.tolist(), hi.tolist(), strict=True))


def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: Any = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> Any:
    """transformers' mask-builder signature (as ``sdpa_mask``): a :class:`NativeMask` for
    causal, bidirectional and sliding-window causal masks whose padding leaves each sequence
    one run of tokens; SDPA's dense boolean mask (or None) for everything else."""
    on_cpu = torch.device(kwargs.get("device", "cpu")).type == "cpu"  # else torch computes
    pattern = _pattern(mask_function, local_size) if on_cpu and not use_vmap else None
    ranges = valid_ranges(attention_mask) if pattern is not None else False
    if pattern is None or ranges is False:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            use_vmap=use_vmap,
            **kwargs,
        )
    causal, window = pattern
    return NativeMask(causal, window, int(q_offset), int(kv_offset), ranges)  # type: ignore[arg-type]


def sequences(
    ranges: Ranges | None,
    batch: int,
    *,
    q_first: int,
    nq: int,
    k_first: int,
    nk: int,
    causal: bool,
) -> list[tuple[int, int, int, int, int]]:
    """The kernel's sequences ``(b, q0, q_len, k0, k_len)`` for queries at positions
    ``q_first + i`` over keys at positions ``k_first + j`` (``j < nk``), each sequence
    limited to its valid ``ranges[b]``.

    Causal: the kernel places a sequence's last query on its last key (bottom-right), so the
    keys are cut at the last query's position and the queries at the last valid key; queries
    of padding (before the first valid key or past the last) see nothing and come back as
    zeros. No key of a padding token is ever seen. Not causal: every query sees the valid keys.
    """
    out = []
    k_last = k_first + nk
    for b in range(batch):
        lo, hi = (k_first, k_last) if ranges is None else ranges[b]
        lo, hi = max(lo, k_first), min(hi, k_last)
        if causal:
            hi = min(hi, q_first + nq)
            q0, q1 = max(0, lo - q_first), hi - q_first
        else:
            q0, q1 = 0, nq
        if lo < hi and q0 < q1:
            out.append((b, q0, q1 - q0, lo - k_first, hi - lo))
    return out
