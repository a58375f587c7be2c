"""Attention over paged key/value caches (vLLM's and flash-attn's block tables).

A paged cache is one pool of fixed-size blocks that every sequence shares; a block table lists,
per sequence, the physical blocks that hold its tokens in order. Sequences then grow a block at
a time, share prefix blocks, and free blocks without moving anything. The kernels read each key
and value in the block where it is stored (no gather copy): the same kernels as
:func:`ferroattn.attention`, so the same options mean the same thing.

- :func:`paged_attention`: queries ``(B, Hq, Nq, D)``, the last ``Nq`` tokens of each sequence.
- :func:`paged_attention_varlen`: packed queries ``(T, Hq, D)``, a different number per
  sequence (zero for a sequence that is idle this step).
- :func:`paged_write`: writes new tokens into their slots (vLLM's ``reshape_and_cache``).

Blocks come in two layouts (FlashInfer's names), chosen with ``kv_layout``:

- ``"nhd"`` (the default): ``(num_blocks, block_size, Hkv, D)``, flash-attn's and vLLM's
  token-major blocks; int8 scales ``(num_blocks, block_size, Hkv)``.
- ``"hnd"``: ``(num_blocks, Hkv, block_size, D)``, head-major blocks; scales
  ``(num_blocks, Hkv, block_size)``. Each head's rows of a block are one contiguous run, so a
  decode step (one task per KV head) streams them; token-major blocks interleave the heads,
  and a task reads ``D`` elements out of every ``Hkv * D``. Decode over ``"hnd"`` is the faster.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, TypeAlias, cast

import numpy as np

from ._args import (
    Sequences,
    aligned_copy,
    as_array,
    check_dtypes,
    check_flag,
    check_layout,
    from_bhsd_shape,
    int_vector,
    kernel_ready,
    mask_options,
    output_array,
    to_bhsd,
)
from ._cache_storage import KVEncoding, quantize_rows
from .functional import Causal, Window, run_kernel
from .precision import check_precision
from .variants import normalize_variants

__all__ = ["paged_attention", "paged_attention_varlen", "paged_write"]

KVLayout: TypeAlias = Literal["nhd", "hnd"]


class PageTable(NamedTuple):
    """The block table as the binding takes it (its ``pages``): ``block_table`` flat, C-order
    int32, ``per_row`` entries per sequence."""

    block_table: np.ndarray
    per_row: int


_CACHE_CODES = ("float32", "float16", "bfloat16", "int8")


class _Caches(NamedTuple):
    """Checked key/value caches and what the kernels need of them."""

    k: np.ndarray
    v: np.ndarray
    code: str
    num_blocks: int
    block_size: int
    heads: int
    encoding: KVEncoding


def _cache_code(arr: np.ndarray) -> str | None:
    """The kernel name of a cache's dtype (native byte order only), or None."""
    dt = arr.dtype
    if not dt.isnative:
        return None
    name = (
        "bfloat16" if (dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16") else dt.name
    )
    return name if name in _CACHE_CODES else None


def check_kv_layout(kv_layout: Any) -> KVLayout:
    """``kv_layout`` when it is ``"nhd"`` or ``"hnd"``; refuses anything else by name."""
    if isinstance(kv_layout, str) and kv_layout in ("nhd", "hnd"):
        return cast(KVLayout, kv_layout)
    raise ValueError(f"kv_layout must be 'nhd' or 'hnd', got {kv_layout!r}")


def _token_major(a: np.ndarray, kv_layout: KVLayout) -> np.ndarray:
    """A block array (data ``(·, ·, ·, D)`` or scales ``(·, ·, ·)``) of ``kv_layout`` as a
    token-major view ``(num_blocks, block_size, Hkv, …)``, the same memory."""
    return a if kv_layout == "nhd" else a.swapaxes(1, 2)


def _check_caches(
    k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any, kv_layout: Any = "nhd"
) -> _Caches:
    """``k_cache`` and ``v_cache`` of one cache dtype in ``kv_layout`` (``"nhd"``: ``(num_blocks,
    block_size, Hkv, D)``, ``"hnd"``: ``(num_blocks, Hkv, block_size, D)``), int8 with float32
    scales of the first three axes, others without. Returned as token-major views of the same
    memory, whatever the layout."""
    kv_layout = check_kv_layout(kv_layout)
    axes = "(num_blocks, block_size, Hkv" if kv_layout == "nhd" else "(num_blocks, Hkv, block_size"
    k = as_array("k_cache", k_cache)
    v = as_array("v_cache", v_cache)
    shapes = f"k_cache {k.shape}, v_cache {v.shape}"
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"k_cache and v_cache must be {axes}, D); got {shapes}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k_cache and v_cache must agree in blocks, block size and heads; {shapes}"
        )
    scale_shape = k.shape[:3]
    k, v = _token_major(k, kv_layout), _token_major(v, kv_layout)
    num_blocks, block_size, heads, d = k.shape
    if block_size < 1 or heads < 1 or d < 1 or v.shape[3] < 1:
        raise ValueError(
            f"block_size, Hkv, D and Dv must be at least 1 (num_blocks may be 0); got {shapes}"
        )
    code = _cache_code(k)
    if code is None or k.dtype != v.dtype:
        raise TypeError(
            "k_cache and v_cache must share one dtype of float32, float16, bfloat16 or int8; "
            f"got {k.dtype} and {v.dtype}"
        )
    if code != "int8":
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale and v_scale go with int8 caches only, not {code}")
        return _Caches(k, v, code, num_blocks, block_size, heads, KVEncoding(code))
    scales = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"int8 caches need {name} {axes}) float32")
        s = as_array(name, s)
        if s.dtype != np.float32:
            raise TypeError(f"{name} must be float32, got {s.dtype}")
        if s.shape != scale_shape:
            raise ValueError(f"{name} must have shape {scale_shape}, got {s.shape}")
        scales.append(_token_major(s, kv_layout))
    return _Caches(k, v, code, num_blocks, block_size, heads, KVEncoding(code, *scales))


def _readable(name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` when the kernels can read it in place (a contiguous last axis, aligned), else an
    aligned copy of it."""
    if (arr.shape[-1] <= 1 or arr.strides[-1] == arr.itemsize) and arr.flags.aligned:
        return arr
    return aligned_copy(name, arr)


def _kernel_caches(c: _Caches) -> tuple[np.ndarray, np.ndarray, KVEncoding]:
    """The caches as the binding reads them: head-major block views ``(num_blocks, Hkv,
    block_size, ·)`` (scales with a unit last axis), no copy unless unreadable in place."""
    k = _readable("k_cache", c.k).transpose(0, 2, 1, 3)
    v = _readable("v_cache", c.v).transpose(0, 2, 1, 3)
    enc = c.encoding
    if enc.k_scales is not None and enc.v_scales is not None:
        ks = _readable("k_scale", enc.k_scales[..., None]).transpose(0, 2, 1, 3)
        vs = _readable("v_scale", enc.v_scales[..., None]).transpose(0, 2, 1, 3)
        enc = KVEncoding(enc.kv_dtype, ks, vs)
    return k, v, enc


def _check_table(
    block_table: Any, seq_lens: Any, batch: int, c: _Caches
) -> tuple[np.ndarray, list[int]]:
    """``block_table (batch, max_blocks)`` of integers and ``seq_lens (batch,)``: every
    sequence fits its row, and the entries its tokens use name blocks of the cache. Returns
    the table as C-order int32 and the lengths."""
    table = as_array("block_table", block_table)
    if table.ndim != 2 or not (table.dtype.kind in "iu" or table.size == 0):
        raise ValueError(
            f"block_table must be a 2-D array of integers (sequences, max_blocks_per_seq), got "
            f"shape {table.shape} dtype {table.dtype}"
        )
    if table.shape[0] != batch:
        raise ValueError(f"block_table has {table.shape[0]} rows for {batch} sequences")
    lens = int_vector("seq_lens", seq_lens, batch)
    per_row, bs = table.shape[1], c.block_size
    used = np.array([-(-n // bs) for n in lens], dtype=np.int64)
    for b, n in enumerate(lens):
        if used[b] > per_row:
            raise ValueError(
                f"seq_lens[{b}] = {n} needs {used[b]} blocks of {bs}, but block_table has "
                f"{per_row} per sequence"
            )
    if table.size:
        live = np.arange(per_row)[None, :] < used[:, None]
        bad = live & ((table < 0) | (table >= c.num_blocks))
        if bad.any():
            b, j = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(
                f"block_table[{b}, {j}] = {int(table[b, j])} is not a block of the cache "
                f"(0 <= id < {c.num_blocks})"
            )
        table = np.where(live, table, 0)
    return np.ascontiguousarray(table, dtype=np.int32), lens


def _check_query(q: np.ndarray, layout: str, c: _Caches) -> tuple[np.ndarray, Any]:
    """``q`` as a 4-D head-major view of a float dtype that fits the caches; returns it and
    its dtype."""
    dtype = check_dtypes({"q": q})
    if q.ndim != 4:
        dims = "(B, Hq, Nq, D)" if layout == "bhsd" else "(B, Nq, Hq, D)"
        raise ValueError(f"q must be 4-D {dims}, got shape {q.shape}")
    q4 = to_bhsd("q", q, layout)
    _, hq, _, d = q4.shape
    if d != c.k.shape[3]:
        raise ValueError(f"q and k_cache have different head dimensions ({d} vs {c.k.shape[3]})")
    if hq % c.heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({c.heads})")
    return q4, dtype


def _options(q4: np.ndarray, span: int, causal: Any, window: Any, scale: Any, softcap: Any) -> Any:
    return mask_options(
        head_dim=q4.shape[3],
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        span=span,
        precision=check_precision(None),
    )


def _run(
    q4: np.ndarray,
    c: _Caches,
    table: np.ndarray,
    out4: np.ndarray,
    opts: Any,
    return_lse: bool,
    sequences: Sequences,
    variants: Any,
) -> np.ndarray | None:
    """The kernel call of both paged functions: ``q4`` over the checked caches ``c`` through
    ``table``, into ``out4``; the LSE when ``return_lse``, else None."""
    k4, v4, encoding = _kernel_caches(c)
    lse = run_kernel(
        kernel_ready("q", q4),
        k4,
        v4,
        out4,
        opts,
        return_lse,
        sequences,
        variants,
        kv_encoding=encoding,
        pages=PageTable(table.reshape(-1), table.shape[1]),
    )
    if not return_lse:
        return None
    assert lse is not None
    return lse


def paged_attention(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_table: Any,
    seq_lens: Any,
    *,
    causal: Causal = True,
    window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    kv_layout: KVLayout = "nhd",
    layout: Literal["bhsd", "bshd"] = "bhsd",
    return_lse: bool = False,
    out: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention of each sequence's newest queries over its keys in a paged cache.

    Args:
        q: ``(B, Hq, Nq, D)`` (``layout="bshd"``: ``(B, Nq, Hq, D)``), float32, float16 or
            bfloat16: the last ``Nq`` tokens of each sequence (1 when decoding, a chunk when
            prefilling in chunks); their keys and values must be in the cache already.
        k_cache: ``(num_blocks, block_size, Hkv, D)`` (``kv_layout="hnd"``: ``(num_blocks,
            Hkv, block_size, D)``), float32, float16, bfloat16 or int8.
        v_cache: ``(num_blocks, block_size, Hkv, Dv)`` (``"hnd"``: ``(num_blocks, Hkv,
            block_size, Dv)``), the dtype of ``k_cache``.
        block_table: ``(B, max_blocks_per_seq)`` integers: sequence ``b``'s token ``n`` is row
            ``n % block_size`` of block ``block_table[b, n // block_size]``. Entries past
            ``ceil(seq_lens[b] / block_size)`` are ignored (may be anything, e.g. -1).
        seq_lens: ``(B,)`` integers: the tokens each sequence holds, the ``Nq`` queries
            included.
        causal: ``True`` (default) or ``"bottom_right"``: query ``i`` sits at position
            ``seq_len - Nq + i``; ``False`` lets every query see all of its sequence. A
            sequence shorter than ``Nq`` behaves as in :func:`ferroattn.attention` with
            ``kv_lengths``: its first queries sit before its first key and see nothing
            (zeros, ``lse = -inf``) when causal.
        window, scale, softcap, alibi_slopes, sinks, return_lse, out: as in
            :func:`ferroattn.attention` (``lse`` ``(B, Hq, Nq)``).
        k_scale, v_scale: for int8 caches, float32 ``(num_blocks, block_size, Hkv)``
            (``"hnd"``: ``(num_blocks, Hkv, block_size)``): a stored value is worth
            ``int8 · scale`` (symmetric per token and head, as :func:`paged_write` and an int8
            :class:`ferroattn.KVCache` store them).
        kv_layout: ``"nhd"`` (default, token-major blocks as flash-attn's) or ``"hnd"``
            (head-major blocks, faster to decode from); see :mod:`ferroattn.paged`.
        layout: of ``q`` and the output.

    Returns:
        ``(B, Hq, Nq, Dv)`` in ``q``'s layout and dtype, or ``(out, lse)``.

    Example:
        >>> import numpy as np, ferroattn
        >>> cache = np.ones((4, 16, 2, 8), np.float32)
        >>> q = np.ones((2, 4, 1, 8), np.float32)
        >>> ferroattn.paged_attention(q, cache, cache, [[0, 1], [3, -1]], [20, 5]).shape
        (2, 4, 1, 8)
    """
    return_lse = check_flag("return_lse", return_lse)
    checked_layout = check_layout(layout)
    c = _check_caches(k_cache, v_cache, k_scale, v_scale, kv_layout)
    user_q = as_array("q", q)
    q4, dtype = _check_query(user_q, checked_layout, c)
    b, hq, nq, _ = q4.shape
    table, lens = _check_table(block_table, seq_lens, b, c)
    span = table.shape[1] * c.block_size
    opts = _options(q4, max(nq, span), causal, window, scale, softcap)
    variants = normalize_variants(
        shape4=(b, hq, nq, span), ndim=4, alibi_slopes=alibi_slopes, sinks=sinks
    )
    dv = c.v.shape[3]
    result = output_array(
        out, from_bhsd_shape((b, hq, nq, dv), 4, layout), dtype, [user_q, c.k, c.v]
    )
    out4 = to_bhsd("out", result, checked_layout)
    seqs = Sequences(kv_lengths=lens)
    lse = _run(q4, c, table, out4, opts, return_lse, seqs, variants)
    return result if lse is None else (result, lse.reshape(b, hq, nq))


def paged_attention_varlen(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_table: Any,
    seq_lens: Any,
    cu_seqlens_q: Any,
    *,
    causal: Causal = True,
    window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    kv_layout: KVLayout = "nhd",
    return_lse: bool = False,
    out: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """:func:`paged_attention` with packed queries, a different number per sequence.

    Args:
        q: ``(T, Hq, D)``: sequence ``s``'s queries are ``q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]``,
            its last tokens (none for a sequence idle this step).
        k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, kv_layout: as in
            :func:`paged_attention`, one table row and length per sequence.
        cu_seqlens_q: ``(S + 1,)`` integers: starts at 0, never decreases, ends at ``T``.
        causal, window, scale, softcap, alibi_slopes, sinks, return_lse, out: as in
            :func:`paged_attention`.

    Returns:
        ``(T, Hq, Dv)`` of ``q``'s dtype, or with ``return_lse`` also the float32 LSE
        ``(Hq, T)`` (as :func:`ferroattn.attention_varlen`).

    Example:
        >>> import numpy as np, ferroattn
        >>> cache = np.ones((4, 16, 2, 8), np.float32)
        >>> q = np.ones((3, 4, 8), np.float32)
        >>> ferroattn.paged_attention_varlen(
        ...     q, cache, cache, [[0, 1], [3, -1]], [20, 5], [0, 1, 3]).shape
        (3, 4, 8)
    """
    return_lse = check_flag("return_lse", return_lse)
    c = _check_caches(k_cache, v_cache, k_scale, v_scale, kv_layout)
    user_q = as_array("q", q)
    if user_q.ndim != 3:
        raise ValueError(f"q must be 3-D (total_tokens, Hq, D), got shape {user_q.shape}")
    q4, dtype = _check_query(user_q[None], "bshd", c)
    _, hq, total, _ = q4.shape
    table = as_array("block_table", block_table)
    seqs = table.shape[0] if table.ndim == 2 else -1
    table, lens = _check_table(table, seq_lens, seqs, c)
    cu = int_vector("cu_seqlens_q", cu_seqlens_q, seqs + 1)
    if cu[0] != 0 or cu[-1] != total or any(a > b for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(
            f"cu_seqlens_q must start at 0, never decrease and end at {total} (the packed "
            f"length); got {cu}"
        )
    per_seq = table.shape[1] * c.block_size
    opts = _options(q4, max(total, per_seq), causal, window, scale, softcap)
    variants = normalize_variants(
        shape4=(1, hq, total, seqs * per_seq), ndim=4, alibi_slopes=alibi_slopes, sinks=sinks
    )
    dv = c.v.shape[3]
    result = output_array(out, (total, hq, dv), dtype, [user_q, c.k, c.v])
    # Every table row in the one batch entry of packed queries: sequence s's keys start at its
    # row's first token.
    spans = [(0, cu[s], cu[s + 1] - cu[s], s * per_seq, lens[s]) for s in range(seqs)]
    out4 = to_bhsd("out", result, "bshd")
    lse = _run(q4, c, table, out4, opts, return_lse, Sequences(explicit=spans), variants)
    return result if lse is None else (result, lse.reshape(hq, total))


def _check_slots(slot_mapping: Any, tokens: int, slots: int) -> np.ndarray:
    """``slot_mapping (T,)`` integers in ``[-1, slots)``, no slot twice; as int64."""
    s = as_array("slot_mapping", slot_mapping)
    if s.ndim != 1 or not (s.dtype.kind in "iu" or s.size == 0):
        raise ValueError(
            f"slot_mapping must be a 1-D array of integers, got shape {s.shape} dtype {s.dtype}"
        )
    if s.shape[0] != tokens:
        raise ValueError(f"slot_mapping has {s.shape[0]} entries for {tokens} tokens")
    s = s.astype(np.int64, copy=False)
    bad = (s < -1) | (s >= slots)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"slot_mapping[{i}] = {int(s[i])} is not a slot of the cache (-1 <= slot < {slots})"
        )
    live = s[s >= 0]
    if np.unique(live).size != live.size:
        dup = np.sort(live)
        first = int(dup[np.argmax(dup[1:] == dup[:-1]) + 1])
        raise ValueError(f"slot_mapping names slot {first} more than once")
    return s


def paged_write(
    k_cache: Any,
    v_cache: Any,
    k: Any,
    v: Any,
    slot_mapping: Any,
    *,
    k_scale: Any = None,
    v_scale: Any = None,
    kv_layout: KVLayout = "nhd",
) -> None:
    """Write new tokens' keys and values into their slots of a paged cache (vLLM's
    ``reshape_and_cache``), converting to the cache's dtype.

    Args:
        k_cache, v_cache: writable caches as :func:`paged_attention` reads them.
        k: ``(T, Hkv, D)`` float32, float16 or bfloat16 (float64 is converted).
        v: ``(T, Hkv, Dv)``.
        slot_mapping: ``(T,)`` integers: token ``t`` goes to slot ``block · block_size +
            offset``; ``-1`` skips it (padding). No slot may appear twice.
        k_scale, v_scale: for int8 caches, their writable scales: each token and head is
            rounded symmetrically against its own ``max |x| / 127`` (half to even), exactly
            as an int8 :class:`ferroattn.KVCache` stores it.
        kv_layout: of the caches and scales, as in :func:`paged_attention`.

    Everything is checked before the first write: a refused call changes nothing.

    Example:
        >>> import numpy as np, ferroattn
        >>> kc, vc = np.zeros((2, 4, 1, 8), np.float16), np.zeros((2, 4, 1, 8), np.float16)
        >>> x = np.ones((2, 1, 8), np.float32)
        >>> ferroattn.paged_write(kc, vc, x, x, [5, -1])
        >>> float(kc[1, 1, 0, 0])
        1.0
    """
    c = _check_caches(k_cache, v_cache, k_scale, v_scale, kv_layout)
    kx, vx = as_array("k", k), as_array("v", v)
    check_dtypes({"k": kx, "v": vx})
    shapes = f"k {kx.shape}, v {vx.shape}"
    if kx.shape[1:] != c.k.shape[2:] or vx.ndim != 3 or vx.shape != (kx.shape[0], *c.v.shape[2:]):
        raise ValueError(
            f"k and v must be (T, Hkv, D) and (T, Hkv, Dv) as the caches hold them "
            f"(Hkv={c.heads}, D={c.k.shape[3]}, Dv={c.v.shape[3]}); got {shapes}"
        )
    targets = {"k_cache": c.k, "v_cache": c.v}
    if c.encoding.k_scales is not None and c.encoding.v_scales is not None:
        targets |= {"k_scale": c.encoding.k_scales, "v_scale": c.encoding.v_scales}
    for name, arr in targets.items():
        if not arr.flags.writeable:
            raise ValueError(f"{name} is read-only")
    slots = _check_slots(slot_mapping, kx.shape[0], c.num_blocks * c.block_size)
    keep = slots >= 0
    block, offset = np.divmod(slots[keep], c.block_size)
    new_k, new_v = kx[keep], vx[keep]
    if c.code == "int8":
        (qk, sk), (qv, sv) = quantize_rows(new_k), quantize_rows(new_v)
        c.k[block, offset], c.v[block, offset] = qk, qv
        targets["k_scale"][block, offset], targets["v_scale"][block, offset] = sk, sv
        return
    c.k[block, offset] = new_k.astype(c.k.dtype, copy=False)
    c.v[block, offset] = new_v.astype(c.v.dtype, copy=False)
