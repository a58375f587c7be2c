"""float64 reference for paged attention, and helpers that lay contiguous keys out in blocks.

Nothing in here imports ferroattn: a paged cache is read back by gathering each sequence's
blocks in block-table order (the obviously right reading of flash-attn's ``block_table``
contract), and the gathered keys go through :func:`reference.reference_attention`.
"""

from __future__ import annotations

import numpy as np
from reference import reference_attention, reference_varlen

INT8 = np.dtype(np.int8)


def gather(cache, table_row, n, scale=None):
    """The first ``n`` tokens of one sequence, ``(Hkv, n, D)`` float64 (int8 times ``scale``).

    ``cache (num_blocks, block_size, Hkv, D)``; ``table_row`` its blocks in order (entries past
    ``ceil(n / block_size)`` are not read); ``scale (num_blocks, block_size, Hkv)`` for int8.
    """
    bs = cache.shape[1]
    rows = [cache[int(table_row[j // bs]), j % bs] for j in range(n)]
    out = np.asarray(rows, dtype=np.float64).reshape(n, *cache.shape[2:])
    if scale is not None:
        s = [scale[int(table_row[j // bs]), j % bs] for j in range(n)]
        out = out * np.asarray(s, dtype=np.float64).reshape(n, cache.shape[2])[..., None]
    return out.transpose(1, 0, 2)


def gather_all(k_cache, v_cache, block_table, seq_lens, k_scale=None, v_scale=None):
    """Every sequence's keys and values, zero-padded to the longest: ``(B, Hkv, n, D)`` each."""
    n = int(max(seq_lens, default=0))
    b = len(seq_lens)
    hkv = k_cache.shape[2]
    k = np.zeros((b, hkv, n, k_cache.shape[3]))
    v = np.zeros((b, hkv, n, v_cache.shape[3]))
    for i, m in enumerate(np.asarray(seq_lens).tolist()):
        k[i, :, :m] = gather(k_cache, block_table[i], m, k_scale)
        v[i, :, :m] = gather(v_cache, block_table[i], m, v_scale)
    return k, v


def paged_reference(
    q, k_cache, v_cache, block_table, seq_lens, *, k_scale=None, v_scale=None, **opts
):
    """float64 ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))`` of bhsd ``q`` over the paged keys:
    bottom-right causal by default, each sequence's queries its last ``Nq`` tokens."""
    k, v = gather_all(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale)
    opts.setdefault("causal", True)
    lens = np.asarray(seq_lens, dtype=np.int64)
    return reference_attention(np.asarray(q, np.float64), k, v, kv_lengths=lens, **opts)


def paged_reference_varlen(
    q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, k_scale=None, v_scale=None, **opts
):
    """float64 ``(out (T, Hq, Dv), lse (Hq, T))`` of packed ``q (T, Hq, D)`` over the paged
    keys: sequence ``b``'s queries ``q[cu[b]:cu[b+1]]`` are its last tokens."""
    parts_k, parts_v, cu_k = [], [], [0]
    for i, m in enumerate(np.asarray(seq_lens).tolist()):
        parts_k.append(gather(k_cache, block_table[i], m, k_scale).transpose(1, 0, 2))
        parts_v.append(gather(v_cache, block_table[i], m, v_scale).transpose(1, 0, 2))
        cu_k.append(cu_k[-1] + m)
    opts.setdefault("causal", True)
    k, v = np.concatenate(parts_k), np.concatenate(parts_v)
    return reference_varlen(q, k, v, np.asarray(cu_seqlens_q), np.asarray(cu_k), **opts)


def scatter(rng, k, v, block_size, num_blocks=None, dtype=np.float32, spare=0):
    """Lay contiguous ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)`` out in blocks at shuffled
    places: ``(k_cache, v_cache, block_table int32 (B, max_blocks) padded with -1)``.

    ``num_blocks`` defaults to the blocks needed plus ``spare``; values are cast to ``dtype``.
    """
    b, hkv, length = k.shape[:3]
    per_seq = -(-length // block_size)
    need = b * per_seq
    num_blocks = need + spare if num_blocks is None else num_blocks
    k_cache = np.zeros((num_blocks, block_size, hkv, k.shape[3]), dtype=dtype)
    v_cache = np.zeros((num_blocks, block_size, hkv, v.shape[3]), dtype=dtype)
    order = rng.permutation(num_blocks)[:need].reshape(b, per_seq)
    table = np.full((b, per_seq + 1), -1, dtype=np.int32)
    table[:, :per_seq] = order
    for i in range(b):
        for j in range(length):
            blk, off = order[i, j // block_size], j % block_size
            k_cache[blk, off] = k[i, :, j]
            v_cache[blk, off] = v[i, :, j]
    return k_cache, v_cache, table
