"""The attention functions: NumPy arrays in, NumPy arrays out."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from . import _dispatch, _ferroattn
from ._args import (
    MaskOptions,
    Sequences,
    as_array,
    as_is,
    check_cu_seqlens,
    check_flag,
    check_kv_lengths,
    check_packed,
    dtype_code,
    from_bhsd_shape,
    kernel_views,
    mask_options,
    output_array,
    prepare,
    to_bhsd,
)
from ._memory import allocating, empty
from .precision import Precision, check_precision
from .variants import T5Bias, Variants, normalize_variants

Causal = bool | Literal["bottom_right", "top_left"]
Window = int | tuple[int | None, int | None] | None
Backend = Literal["auto", "cpu", "torch"]

__all__ = ["attention", "attention_varlen", "attention_weights"]


_NO_VALUES = object()


def _prepare(
    q: Any, k: Any, v: Any, layout: str
) -> tuple[list[np.ndarray], list[np.ndarray], np.dtype, int]:
    """Validate ranks, dtypes and shapes; return user arrays, their 4-D head-major views
    (not converted yet: see :func:`kernel_views`), dtype, rank.

    ``v`` is ``_NO_VALUES`` for :func:`attention_weights`.
    """
    named = {"q": q, "k": k} if v is _NO_VALUES else {"q": q, "k": k, "v": v}
    return prepare(named, layout, as_array, as_is)


def _mask(q4: np.ndarray, k4: np.ndarray, precision: Any, **options: Any) -> MaskOptions:
    """The mask options of a call over head-major ``q4``/``k4`` (``causal``, ``window``,
    ``scale``, ``softcap``): window sides as long as the sequences are unbounded; ``precision``
    as the caller gave it (None: the process-wide setting)."""
    span = max(q4.shape[2], k4.shape[2])
    return mask_options(
        head_dim=q4.shape[3], span=span, precision=check_precision(precision), **options
    )


def run_kernel(
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    out4: np.ndarray,
    opts: MaskOptions,
    return_lse: bool,
    sequences: Sequences | None,
    variants: Variants | None = None,
    **storage: Any,
) -> np.ndarray | None:
    """Call the kernel, writing into ``out4`` when it is kernel-writable, else via a buffer.

    ``storage``: the binding's ``kv_encoding`` and ``pages`` where keys and values are stored
    otherwise than as ``q`` (:mod:`ferroattn.paged`)."""
    direct = (
        dtype_code(out4) == dtype_code(q4)
        and (out4.shape[-1] <= 1 or out4.strides[-1] == out4.itemsize)
        and out4.flags.aligned
    )
    target = out4 if direct else empty("out (a float32 buffer for it)", out4.shape, q4.dtype)
    lse = _ferroattn.attention(
        q4,
        k4,
        v4,
        target,
        q4.dtype.name,
        opts,
        sequences=sequences,
        variants=variants,
        return_lse=return_lse,
        **storage,
    )
    if not direct:
        out4[...] = target
    return lse


_F32 = np.dtype(np.float32)

# The mask options of the fast path by head dimension, one table per value of `causal` (a
# bool indexes them): made once, looked up without building a key.
_FAST_OPTS: tuple[dict[int, MaskOptions], dict[int, MaskOptions]] = ({}, {})


def _fast_options(d: int, causal: bool) -> MaskOptions:
    """Make and keep the fast path's mask options for head dimension ``d``."""
    table = _FAST_OPTS[causal]
    if len(table) >= 64:  # head dimensions are few; keep the table small anyway
        table.clear()
    opts = table[d] = MaskOptions(1.0 / math.sqrt(d), None, causal, False, None, None)
    return opts


def _fast_float32(q: Any, k: Any, v: Any, causal: bool) -> np.ndarray | None:
    """The common call (4-D float32 arrays with a contiguous last axis, default options) with
    none of the general normalization, which costs more than a tiny attention itself. The Rust
    side still checks every shape. Returns None when the general path is needed."""
    if not (type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray):
        return None
    for a in (q, k, v):
        # `is` first: NumPy's float32 dtype is one object, and `!=` costs a conversion.
        dt = a.dtype
        if (dt is not _F32 and dt != _F32) or a.ndim != 4 or a.strides[3] != 4:
            return None
        if not a.flags.aligned:
            return None
    b, h, n, d = q.shape  # once: each `.shape` builds a tuple
    if d < 1 or k.shape[1] < 1:
        return None  # the general path names what is wrong (the kernels take Hq = Hkv = 0)
    try:
        result = np.empty((b, h, n, v.shape[3]), dtype=_F32)
    except (MemoryError, ValueError):
        return None  # the general path reports it, by name
    opts = _FAST_OPTS[causal].get(d)
    if opts is None:
        opts = _fast_options(d, causal)
    _ferroattn.attention(q, k, v, result, "float32", opts)
    return result


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Causal = False,
    window: Window = None,
    scale: float | None = None,
    kv_lengths: Any = None,
    softcap: float | None = None,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    return_lse: bool = False,
    out: Any = None,
    mask: Any = None,
    bias: Any = None,
    alibi_slopes: Any = None,
    rel_bias: T5Bias | None = None,
    sinks: Any = None,
    block_layout: Any = None,
    block_size: int | None = None,
    backend: Backend = "auto",
    precision: Precision | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Scaled-dot-product attention, ``softmax(scale · q kᵀ [masked]) v``.

    Args:
        q: queries ``(B, Hq, Nq, D)``; also ``(H, N, D)`` or ``(N, D)``. With ``layout="bshd"``:
            ``(B, N, H, D)`` or ``(N, H, D)``; a 2-D input is one head's ``(N, D)`` in either
            layout.
        k: keys ``(B, Hkv, Nk, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA: query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``).
        v: values ``(B, Hkv, Nk, Dv)``.
        causal: ``True`` or ``"bottom_right"``: query ``i`` sits at position
            ``i + k_len - q_len`` and sees keys ``j <= position`` (flash-attn's convention, right
            for decoding with a cache). ``"top_left"``: position ``i`` (torch's ``is_causal``).
        window: ``(left, right)``: a query at position ``p`` sees keys ``p-left <= j <= p+right``;
            ``None`` or ``-1`` leaves a side unbounded, and so does a side longer than the
            sequence (any int, however large: it hides nothing). An int ``w`` means
            ``(w - 1, 0)``, the last ``w`` keys including its own (Mistral's
            ``sliding_window``). Positions follow the causal alignment (bottom-right unless
            ``causal="top_left"``). Cost is ``O(N·w)``.
        scale: multiplies ``q·k``; defaults to ``1/sqrt(D)``.
        kv_lengths: ``(B,)`` integers: batch ``b`` has ``kv_lengths[b]`` valid keys (right
            padding); positions and causal alignment use that length.
        softcap: ``c``: scores become ``c·tanh(score/c)`` (after ``scale``).
        layout: ``"bhsd"`` (head-major) or ``"bshd"`` (token-major, flash-attn/HF); the output
            uses the same layout.
        return_lse: also return the natural log-sum-exp of each row's scores, float32
            ``(B, Hq, Nq)``. A bool (anything else is a ``TypeError``).
        out: array of the output's shape and dtype to write into (returned as is).
        mask: booleans broadcastable to ``(B, Hq, Nq, Nk)`` (2-D ``(Nq, Nk)``, 3-D, 4-D):
            ``True`` = may attend. Combined with the other masks; tiles with no ``True`` are
            skipped.
        bias: floats broadcastable to ``(B, Hq, Nq, Nk)``, added to the scores (after
            ``scale`` and ``softcap``). Read through broadcast strides, never expanded.
        alibi_slopes: ``(Hq,)``: adds ``−slope · |position − j|`` (flash-attn's ALiBi; see
            :func:`ferroattn.alibi_slopes` for the standard slopes).
        rel_bias: a :class:`ferroattn.T5Bias`: a learned bucketed relative-position bias,
            computed inside the kernel (no ``N × N`` array).
        sinks: ``(Hq,)`` logits that join each row's softmax denominator with no value
            (attention sinks as in gpt-oss): outputs shrink, ``lse`` includes them.
        block_layout: booleans ``(Nq/bs, Nk/bs)`` or ``(Hq, Nq/bs, Nk/bs)``: block ``(i, j)``
            of queries may see block ``j`` of keys. Only live tiles are computed, so the cost
            follows the layout's density. See :func:`ferroattn.local_global_layout`,
            :func:`ferroattn.bigbird_layout`, :func:`ferroattn.strided_layout`.
        block_size: the block size ``bs`` of ``block_layout``; must divide ``Nq`` and ``Nk``.
        backend: ``"auto"`` (default): NumPy arrays and CPU torch tensors run on the Rust
            kernels (tensors without a copy: they are read as NumPy views of their memory),
            CUDA and other non-CPU tensors on torch. ``"cpu"``: always the Rust kernels (tensors
            on another device are copied to the CPU and the result copied back). ``"torch"``:
            always torch (NumPy inputs are wrapped with ``torch.from_numpy`` and the result is
            NumPy). See :mod:`ferroattn.torch`.
        precision: how float32 inputs may be multiplied: ``"highest"`` (float32 products),
            ``"high"`` (three bfloat16 products each, ~1e-5 relative) or ``"medium"`` (one,
            ~1e-2), as :func:`torch.set_float32_matmul_precision` names them; default
            :func:`ferroattn.get_float32_precision` (``"highest"``). The bfloat16 products need
            a CPU with AVX-512 BF16 (else float32 math) and run on prefill tiles; see
            :mod:`ferroattn.precision`. The torch backend ignores it.

    Torch tensors in give torch tensors out, of the same dtype and on the same device; ``out``
    must then be a tensor (written in place). ``q``, ``k``, ``v`` and ``out`` must be all
    tensors or all NumPy arrays (else ``TypeError``); the other options may be either. Results
    carry no gradient (inputs are detached).

    Returns:
        The output, shaped like ``q`` with last axis ``Dv`` and of ``q``'s dtype, or
        ``(out, lse)``. A query that sees no key gets zeros and ``lse = -inf``.

    float32, float16 and bfloat16 (``ml_dtypes``) are computed with float32 accumulation;
    float64 and byte-swapped inputs are converted to float32 once (after the shapes are
    checked) and the result cast back; misaligned arrays are copied to aligned memory.

    Zero sizes: ``B``, ``Hq`` or ``Nq`` of 0 give an empty result (and lse) of the right shape;
    ``Nk = 0`` gives zeros and ``lse = -inf``; ``Hkv``, ``D`` or ``Dv`` of 0 raise
    ``ValueError``. A result too large to allocate raises ``MemoryError`` naming ``q``, ``k``
    and ``v`` and the bytes asked for. Options the float32 kernels cannot hold (a ``bias``,
    ``scale``, ``softcap`` or per-head value beyond float32's range) raise ``ValueError``.

    Example:
        >>> import numpy as np, ferroattn
        >>> q = np.random.default_rng(0).standard_normal((1, 8, 128, 64), dtype=np.float32)
        >>> ferroattn.attention(q, q, q, causal=True).shape
        (1, 8, 128, 64)
    """
    plain = (
        out is None
        and window is None
        and scale is None
        and kv_lengths is None
        and softcap is None
        and return_lse is False
        and layout == "bhsd"
        and backend == "auto"
        and mask is None
        and bias is None
        and alibi_slopes is None
        and rel_bias is None
        and sinks is None
        and block_layout is None
        and block_size is None
        and check_precision(precision) == "highest"
    )
    if plain and (causal is True or causal is False):
        fast = _fast_float32(q, k, v, causal)
        if fast is not None:
            return fast
    if _dispatch.wants_torch(
        backend, q, k, v, out, mask, bias, kv_lengths, alibi_slopes, sinks, rel_bias
    ):
        return _dispatch.route(
            "attention",
            attention,
            {"q": q, "k": k, "v": v, "out": out},
            {
                "causal": causal,
                "window": window,
                "scale": scale,
                "kv_lengths": kv_lengths,
                "softcap": softcap,
                "layout": layout,
                "return_lse": return_lse,
                "mask": mask,
                "bias": bias,
                "alibi_slopes": alibi_slopes,
                "rel_bias": rel_bias,
                "sinks": sinks,
                "block_layout": block_layout,
                "block_size": block_size,
            },
            backend,
        )
    return_lse = check_flag("return_lse", return_lse)
    arrays, (q4, k4, v4), dtype, ndim = _prepare(q, k, v, layout)
    b, hq, nq, _ = q4.shape
    opts = _mask(q4, k4, precision, causal=causal, window=window, scale=scale, softcap=softcap)
    lens = check_kv_lengths(kv_lengths, b, k4.shape[2])
    variants = normalize_variants(
        shape4=(b, hq, nq, k4.shape[2]),
        ndim=ndim,
        mask=mask,
        bias=bias,
        alibi_slopes=alibi_slopes,
        rel_bias=rel_bias,
        sinks=sinks,
        block_layout=block_layout,
        block_size=block_size,
    )
    shape4 = (b, hq, nq, v4.shape[3])
    user_shape = from_bhsd_shape(shape4, ndim, layout)
    result = output_array(out, user_shape, dtype, arrays)
    q4, k4, v4 = kernel_views(q4, k4, v4)
    sequences = None if lens is None else Sequences(kv_lengths=lens)
    out4 = to_bhsd("out", result, layout)
    lse = run_kernel(q4, k4, v4, out4, opts, return_lse, sequences, variants)
    if not return_lse:
        return result
    assert lse is not None
    return result, lse.reshape((b, hq, nq)[4 - ndim :])


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: Causal = False,
    window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    out: Any = None,
    backend: Backend = "auto",
    precision: Precision | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention over packed sequences of different lengths (flash-attn's varlen API).

    Args:
        q: ``(total_q, Hq, D)``: the queries of all sequences, one after another.
        k: ``(total_k, Hkv, D)``.
        v: ``(total_k, Hkv, Dv)``.
        cu_seqlens_q: ``(S + 1,)`` integers: sequence ``s`` owns query rows
            ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``; starts at 0, ends at ``total_q``.
        cu_seqlens_k: the same for keys and values.
        causal, window, scale, softcap, return_lse, out: as in :func:`attention`, per sequence.
        backend: as in :func:`attention` (torch tensors in, torch tensors out).
        precision: as in :func:`attention`.

    Returns:
        ``(total_q, Hq, Dv)``, or with ``return_lse`` also the float32 LSE ``(Hq, total_q)``.

    Example:
        >>> import numpy as np, ferroattn
        >>> x = np.ones((5, 2, 16), np.float32)
        >>> ferroattn.attention_varlen(x, x, x, [0, 2, 5], [0, 2, 5], causal=True).shape
        (5, 2, 16)
    """
    if _dispatch.wants_torch(backend, q, k, v, out, cu_seqlens_q, cu_seqlens_k):
        return _dispatch.route(
            "attention_varlen",
            attention_varlen,
            {"q": q, "k": k, "v": v, "out": out},
            {
                "cu_seqlens_q": cu_seqlens_q,
                "cu_seqlens_k": cu_seqlens_k,
                "causal": causal,
                "window": window,
                "scale": scale,
                "softcap": softcap,
                "return_lse": return_lse,
            },
            backend,
        )
    return_lse = check_flag("return_lse", return_lse)
    named = {"q": as_array("q", q), "k": as_array("k", k), "v": as_array("v", v)}
    check_packed(named)
    arrays, (q4, k4, v4), dtype, _ = _prepare(named["q"], named["k"], named["v"], layout="bshd")
    _, hq, total_q, _ = q4.shape
    opts = _mask(q4, k4, precision, causal=causal, window=window, scale=scale, softcap=softcap)
    cq, ck = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q4.shape[2], k4.shape[2])
    user_shape = (total_q, hq, v4.shape[3])
    result = output_array(out, user_shape, dtype, arrays)
    q4, k4, v4 = kernel_views(q4, k4, v4)
    sequences = Sequences(cu_seqlens_q=cq, cu_seqlens_k=ck)
    lse = run_kernel(q4, k4, v4, to_bhsd("out", result, "bshd"), opts, return_lse, sequences)
    if not return_lse:
        return result
    assert lse is not None
    return result, lse.reshape(hq, total_q)


def attention_weights(
    q: Any,
    k: Any,
    *,
    causal: Causal = False,
    window: Window = None,
    scale: float | None = None,
    kv_lengths: Any = None,
    softcap: float | None = None,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    mask: Any = None,
    bias: Any = None,
    alibi_slopes: Any = None,
    rel_bias: T5Bias | None = None,
    sinks: Any = None,
    block_layout: Any = None,
    block_size: int | None = None,
    backend: Backend = "auto",
) -> np.ndarray:
    """The attention probabilities themselves, ``softmax(scale · q kᵀ [masked])``.

    The only ferroattn function that allocates ``Nq × Nk`` per head: meant for inspection and
    plots. Options (``backend`` and torch tensors included) as in :func:`attention`.

    Returns:
        ``(B, Hq, Nq, Nk)`` (head-major for either layout; ``(Hq, Nq, Nk)`` or ``(Nq, Nk)`` for
        3-D or 2-D input) in the input's dtype. Entries a query may not see are 0; a query that
        sees no key has a row of zeros.

    Example:
        >>> import numpy as np, ferroattn
        >>> x = np.eye(3, dtype=np.float32)
        >>> ferroattn.attention_weights(x, x, causal=True)[0].tolist()
        [1.0, 0.0, 0.0]
    """
    if _dispatch.wants_torch(backend, q, k, mask, bias, kv_lengths, alibi_slopes, sinks, rel_bias):
        return _dispatch.route(
            "attention_weights",
            attention_weights,
            {"q": q, "k": k},
            {
                "causal": causal,
                "window": window,
                "scale": scale,
                "kv_lengths": kv_lengths,
                "softcap": softcap,
                "layout": layout,
                "mask": mask,
                "bias": bias,
                "alibi_slopes": alibi_slopes,
                "rel_bias": rel_bias,
                "sinks": sinks,
                "block_layout": block_layout,
                "block_size": block_size,
            },
            backend,
        )
    _, (q4, k4), dtype, ndim = _prepare(q, k, _NO_VALUES, layout)
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]
    opts = _mask(q4, k4, "highest", causal=causal, window=window, scale=scale, softcap=softcap)
    lens = check_kv_lengths(kv_lengths, b, nk)
    variants = normalize_variants(
        shape4=(b, hq, nq, nk),
        ndim=ndim,
        mask=mask,
        bias=bias,
        alibi_slopes=alibi_slopes,
        rel_bias=rel_bias,
        sinks=sinks,
        block_layout=block_layout,
        block_size=block_size,
    )
    q4, k4 = kernel_views(q4, k4)
    sequences = None if lens is None else Sequences(kv_lengths=lens)
    flat = _ferroattn.attention_weights(
        q4, k4, q4.dtype.name, opts, sequences=sequences, variants=variants
    )
    w: np.ndarray = flat.reshape(b, hq, nq, nk)
    w = w.reshape(w.shape[4 - ndim :])
    if w.dtype == dtype:
        return w
    with allocating("the weights of q and k (in their dtype)"):
        return w.astype(dtype)
