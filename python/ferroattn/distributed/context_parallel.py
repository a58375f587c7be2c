"""One long attention (a prefill) computed by a grid of Ray tasks.

The queries are cut into ``num_shards`` blocks and the keys into ``num_shards`` blocks; each
(query block, key block) pair that the mask leaves any score in is one task, which returns the
block's partial output and log-sum-exp, and the partials of each query block are merged
exactly with :func:`ferroattn.merge_partials`. ``q``, ``k`` and ``v`` go to the object store
once; tasks receive references and read their blocks from it (without a copy on the node that
holds them).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import ray

from .._args import (
    as_array,
    as_is,
    check_flag,
    dtype_code,
    from_bhsd_shape,
    kernel_ready,
    mask_options,
    prepare,
    to_bhsd,
)
from ..functional import Causal, Window, attention
from ..kv_cache import _count
from ..merge import merge_partials
from ..precision import Precision, check_precision
from ._ranges import Part, split, visible_part
from ._workers import connect, use_assigned_cpus
from .errors import gather

__all__ = ["context_parallel_attention"]


def _block(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    layout: str,
    rows: tuple[int, int],
    part: Part,
    options: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """The partial result of query rows ``rows`` over the keys of ``part``: ``(out, lse)``,
    head-major ``(B, H, rows, Dv)`` and ``(B, H, rows)``, 0 and ``-inf`` on the rows the part
    trimmed away (they see none of its keys)."""
    use_assigned_cpus()
    q4, k4, v4 = (to_bhsd(n, a, layout) for n, a in (("q", q), ("k", k), ("v", v)))
    start = rows[0] + part.q0
    keys = slice(part.k0, part.k0 + part.k_len)
    o, lse = attention(
        q4[:, :, start : start + part.q_len],
        k4[:, :, keys],
        v4[:, :, keys],
        window=part.window,
        return_lse=True,
        **options,
    )
    n = rows[1] - rows[0]
    out = np.zeros(q4.shape[:2] + (n, v4.shape[3]), dtype=o.dtype)
    full_lse = np.full(q4.shape[:2] + (n,), -np.inf, dtype=np.float32)
    out[:, :, part.q0 : part.q0 + part.q_len] = o
    full_lse[:, :, part.q0 : part.q0 + part.q_len] = lse
    return out, full_lse


_block_task = ray.remote(_block)


def context_parallel_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    num_shards: int,
    causal: Causal = False,
    window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    return_lse: bool = False,
    precision: Precision | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """:func:`ferroattn.attention` computed by up to ``num_shards²`` Ray tasks.

    Queries and keys are each cut into ``num_shards`` contiguous blocks; every (query block,
    key block) pair is a task unless ``causal``/``window`` hide all of its scores (a causal
    square problem runs ``num_shards · (num_shards + 1) / 2`` tasks), and the partials of each
    query block are merged exactly. Same result as ``attention`` with the same options, up to
    rounding: partial outputs are rounded to the inputs' dtype before the merge (float16 and
    bfloat16 inputs: one more rounding than ``attention`` does).

    Args:
        q, k, v: as for :func:`ferroattn.attention` (2-D, 3-D or 4-D, GQA), NumPy arrays.
        num_shards: blocks per axis (an int >= 1).
        causal, window, scale, softcap, layout, return_lse, precision: as for
            :func:`ferroattn.attention`.

    Runs on the cluster ``ray.init()`` connected this process to, or a local one started on
    first use. Every argument is checked before anything is sent; a task that fails raises
    :class:`ferroattn.distributed.ShardError` naming its key block.

    Example:
        >>> import numpy as np, ferroattn
        >>> from ferroattn.distributed import context_parallel_attention
        >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 8, 4096, 64), "float32")
        >>> out = context_parallel_attention(q, k, v, num_shards=4, causal=True)
        >>> bool(np.allclose(out, ferroattn.attention(q, k, v, causal=True), atol=1e-5))
        True
    """
    shards = _count("num_shards", num_shards, 1)
    return_lse = check_flag("return_lse", return_lse)
    arrays, (q4, k4, v4), dtype, ndim = prepare({"q": q, "k": k, "v": v}, layout, as_array, as_is)
    b, hq, nq, d = q4.shape
    nk = k4.shape[2]
    opts = mask_options(
        head_dim=d,
        span=max(nq, nk),
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        precision=check_precision(precision),
    )
    # Query i sits at position i + nk - nq (bottom-right) or i (top-left) among the keys.
    first = 0 if opts.top_left else nk - nq
    left, right = opts.window_left, (0 if opts.causal else opts.window_right)
    # float64 or byte-swapped inputs: converted once here, not in every task.
    if dtype_code(arrays[0]) is None:
        arrays = [kernel_ready(n, a) for n, a in zip("qkv", arrays, strict=True)]
    options = {"scale": opts.scale, "softcap": opts.softcap, "precision": opts.precision}
    blocks = split(nq, shards)
    connect()
    q_ref, k_ref, v_ref = (ray.put(a) for a in arrays)
    tasks: list[list[tuple[int, Any]]] = [[] for _ in blocks]
    for i, (qa, qb) in enumerate(blocks):
        for j, (ka, kb) in enumerate(split(nk, shards)):
            part = visible_part(first + qa, qb - qa, ka, kb, left, right)
            if part is not None:
                ref = _block_task.remote(q_ref, k_ref, v_ref, layout, (qa, qb), part, options)
                tasks[i].append((j, ref))
    results = gather([t for block in tasks for t in block], "context_parallel_attention")

    dv = v4.shape[3]
    result = np.zeros(from_bhsd_shape((b, hq, nq, dv), ndim, layout), dtype=dtype)
    out4 = to_bhsd("out", result, layout)
    lse = np.full((b, hq, nq), -np.inf, dtype=np.float32)
    done = 0
    for (qa, qb), block in zip(blocks, tasks, strict=True):
        parts, done = results[done : done + len(block)], done + len(block)
        if parts:  # no task: no query of the block sees a key (zeros, -inf)
            o, block_lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
            out4[:, :, qa:qb] = o
            lse[:, :, qa:qb] = block_lse
    if not return_lse:
        return result
    return result, lse.reshape((b, hq, nq)[4 - ndim :])
