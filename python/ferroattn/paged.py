"""Attention over a paged key/value cache (flash-attn's ``block_table`` contract, vLLM's
``reshape_and_cache``): a NumPy stand-in.

Keys and values live in fixed-size blocks, ``k_cache (num_blocks, block_size, Hkv, D)``; a
sequence's tokens are the rows of the blocks its ``block_table`` row lists, in order. This
module gathers each sequence's blocks into contiguous arrays and runs the ordinary kernels over
them: the same results the in-place paged kernels give, at the cost of one copy per call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._args import as_array, check_layout, dtype_code, mask_options
from ._cache_storage import CacheQuery, NumpyStorage, encode_numpy
from .functional import attention

__all__ = ["paged_attention", "paged_attention_varlen", "paged_write"]

_INT8 = np.dtype(np.int8)


def _int_vector(name: str, x: Any, ndim: int) -> np.ndarray:
    arr = as_array(name, x)
    if arr.ndim != ndim or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a {ndim}-D integer array, got {arr.shape} {arr.dtype}")
    return arr.astype(np.int64)


def _check_cache(k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any) -> tuple:
    k_cache, v_cache = as_array("k_cache", k_cache), as_array("v_cache", v_cache)
    if k_cache.ndim != 4 or v_cache.ndim != 4 or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            "k_cache and v_cache must be (num_blocks, block_size, kv_heads, dim) with the same "
            f"first three sizes, got {k_cache.shape} and {v_cache.shape}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache differ in dtype: {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.dtype == _INT8:
        if k_scale is None or v_scale is None:
            raise ValueError("an int8 cache needs k_scale and v_scale")
        k_scale, v_scale = as_array("k_scale", k_scale), as_array("v_scale", v_scale)
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s.shape != k_cache.shape[:3] or s.dtype != np.float32:
                raise ValueError(
                    f"{name} must be float32 {k_cache.shape[:3]}, got {s.shape} {s.dtype}"
                )
    elif k_scale is not None or v_scale is not None:
        raise ValueError("k_scale and v_scale only go with an int8 cache")
    return k_cache, v_cache, k_scale, v_scale


def _gather(cache: np.ndarray, table: np.ndarray, n: int) -> np.ndarray:
    """``(B, Hkv, n, D)``: the first ``n`` rows of each sequence's blocks, in order."""
    bs = cache.shape[1]
    blocks = -(-n // bs)
    rows = cache[table[:, :blocks]]  # (B, blocks, bs, Hkv, D)
    rows = rows.reshape(table.shape[0], blocks * bs, *cache.shape[2:])[:, :n]
    return np.ascontiguousarray(np.moveaxis(rows, 1, 2))


def _tables(block_table: Any, seq_lens: Any, num_blocks: int, block_size: int) -> tuple:
    table = _int_vector("block_table", block_table, 2)
    lens = _int_vector("seq_lens", seq_lens, 1)
    if lens.shape[0] != table.shape[0]:
        raise ValueError(f"seq_lens must hold {table.shape[0]} lengths, got {lens.shape[0]}")
    if lens.size and lens.min() < 0:
        raise ValueError(f"seq_lens must be >= 0, got {lens.tolist()}")
    n = int(lens.max()) if lens.size else 0
    used = -(-lens // block_size)
    if used.size and int(used.max()) > table.shape[1]:
        raise ValueError(f"seq_lens {lens.tolist()} need more blocks than block_table lists")
    clean = np.zeros((table.shape[0], max(1, -(-n // block_size))), dtype=np.int64)
    for b, m in enumerate(used.tolist()):
        row = table[b, :m]
        if m and (row.min() < 0 or row.max() >= num_blocks):
            raise ValueError(f"block_table row {b} names blocks outside [0, {num_blocks})")
        clean[b, :m] = row
    return clean, lens, n


def _gathered(k_cache, v_cache, k_scale, v_scale, table, n) -> tuple:
    """Each sequence's keys and values (and int8 scales, or None), ``(B, Hkv, n, ·)``."""
    gk, gv = _gather(k_cache, table, n), _gather(v_cache, table, n)
    if k_cache.dtype != _INT8:
        return gk, gv, None
    ks = _gather(k_scale[..., None], table, n)[..., 0]
    vs = _gather(v_scale[..., None], table, n)[..., 0]
    return gk, gv, (ks, vs)


def paged_attention(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_table: Any,
    seq_lens: Any,
    *,
    causal: Any = True,
    window: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    layout: str = "bhsd",
    return_lse: bool = False,
    out: Any = None,
) -> Any:
    """Attention of the last ``Nq`` tokens of each sequence over its paged keys and values.

    ``q (B, Hq, Nq, D)`` (``layout="bshd"``: ``(B, Nq, Hq, D)``); ``block_table (B, max_blocks)``
    int32, ``seq_lens (B,)`` int32. Other options as in :func:`ferroattn.attention`.
    """
    layout = check_layout(layout)
    k_cache, v_cache, k_scale, v_scale = _check_cache(k_cache, v_cache, k_scale, v_scale)
    table, lens, n = _tables(block_table, seq_lens, k_cache.shape[0], k_cache.shape[1])
    q = as_array("q", q)
    gk, gv, scales = _gathered(k_cache, v_cache, k_scale, v_scale, table, n)
    options = {"scale": scale, "softcap": softcap, "alibi_slopes": alibi_slopes, "sinks": sinks}
    if return_lse or layout != "bhsd" or window is not None or causal is not True:
        if scales is not None:
            gk = (gk.astype(np.float32) * scales[0][..., None]).astype(q.dtype)
            gv = (gv.astype(np.float32) * scales[1][..., None]).astype(q.dtype)
        if layout == "bshd":
            gk, gv = gk.swapaxes(1, 2), gv.swapaxes(1, 2)
        return attention(
            q,
            gk,
            gv,
            causal=causal,
            window=window,
            kv_lengths=lens.astype(np.int32),
            layout=layout,  # type: ignore[arg-type]
            return_lse=return_lse,
            out=out,
            **options,
        )
    # The common case runs as KVCache's attend does (int8 read in place, with its scales).
    opts = mask_options(head_dim=q.shape[3], causal=True, window=None, scale=scale, softcap=softcap)
    nq = q.shape[2]
    seqs = [(b, 0, nq, 0, int(m)) for b, m in enumerate(lens.tolist()) if m]
    terms = {"alibi_slopes": alibi_slopes, "sinks": sinks}
    code = "int8" if scales is not None else (dtype_code(gk) or "float32")
    shape = (q.shape[0], q.shape[1], nq, gv.shape[3])
    query = CacheQuery(seqs, 0, opts, terms, shape, code)
    return NumpyStorage.run(query, q, gk, gv, scales, out)


def paged_attention_varlen(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    block_table: Any,
    seq_lens: Any,
    cu_seqlens_q: Any,
    *,
    causal: Any = True,
    window: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    return_lse: bool = False,
    out: Any = None,
) -> Any:
    """Packed queries ``q (T, Hq, D)``: sequence ``b``'s are ``q[cu[b]:cu[b+1]]``, its last
    tokens. Returns ``(T, Hq, Dv)``."""
    q = as_array("q", q)
    cu = _int_vector("cu_seqlens_q", cu_seqlens_q, 1)
    lens = _int_vector("seq_lens", seq_lens, 1)
    if cu.shape[0] != lens.shape[0] + 1 or cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must be {lens.shape[0] + 1} offsets from 0 to {q.shape[0]}")
    if np.any(np.diff(cu) < 0):
        raise ValueError("cu_seqlens_q must not decrease")
    k_cache, v_cache, k_scale, v_scale = _check_cache(k_cache, v_cache, k_scale, v_scale)
    dv = v_cache.shape[3]
    result = np.zeros((q.shape[0], q.shape[1], dv), dtype=q.dtype) if out is None else out
    if out is not None:
        result[...] = 0
    lses = []
    for b in range(lens.shape[0]):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if hi == lo:
            continue
        got = paged_attention(
            q[None, lo:hi].swapaxes(1, 2),
            k_cache,
            v_cache,
            np.asarray(block_table)[b : b + 1],
            lens[b : b + 1].astype(np.int32),
            causal=causal,
            window=window,
            scale=scale,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            sinks=sinks,
            k_scale=k_scale,
            v_scale=v_scale,
            return_lse=return_lse,
        )
        if return_lse:
            got, lse = got
            lses.append((lo, hi, lse[0]))
        result[lo:hi] = got[0].swapaxes(0, 1)
    if not return_lse:
        return result
    lse_all = np.full((q.shape[1], q.shape[0]), -np.inf, dtype=np.float32)
    for lo, hi, lse in lses:
        lse_all[:, lo:hi] = lse
    return result, lse_all


def paged_write(
    k_cache: Any,
    v_cache: Any,
    k: Any,
    v: Any,
    slot_mapping: Any,
    *,
    k_scale: Any = None,
    v_scale: Any = None,
) -> None:
    """Store ``k (T, Hkv, D)``, ``v (T, Hkv, Dv)`` at ``slot_mapping (T,)`` int64
    (``block * block_size + offset``; -1 skips the token), converting to the cache's dtype
    (int8: quantized per token and head, scales written to ``k_scale``/``v_scale``)."""
    k_cache, v_cache, k_scale, v_scale = _check_cache(k_cache, v_cache, k_scale, v_scale)
    k, v = as_array("k", k), as_array("v", v)
    slots = _int_vector("slot_mapping", slot_mapping, 1)
    nb, bs, hkv = k_cache.shape[:3]
    for name, x, cache in (("k", k, k_cache), ("v", v, v_cache)):
        if x.shape != (slots.shape[0], hkv, cache.shape[3]):
            raise ValueError(
                f"{name} must be ({slots.shape[0]}, {hkv}, {cache.shape[3]}), got {x.shape}"
            )
    keep = slots >= 0
    picked = slots[keep]
    if picked.size and int(picked.max()) >= nb * bs:
        raise ValueError(f"slot_mapping names slots outside [0, {nb * bs})")
    if np.unique(picked).size != picked.size:
        raise ValueError("slot_mapping names a slot twice")
    blk, off = np.divmod(picked, bs)
    code = "int8" if k_cache.dtype == _INT8 else ""
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        data, s = encode_numpy(x[keep], code, cache.dtype)
        cache[blk, off] = data
        if s is not None:
            scale[blk, off] = s
