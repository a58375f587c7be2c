"""torch tensors in, torch tensors out: the only ferroattn module that imports torch.

:func:`ferroattn.attention` and friends come here (through ``ferroattn._dispatch``, the one
module that imports this one) when an argument is a torch tensor or when ``backend="torch"`` is
asked for. This module sits below them: it imports none of them, and where it runs a NumPy
function on tensor views (:func:`numpy_call`) that function is its argument. Two ways to
compute:

* **The Rust kernels** (``backend="cpu"``, and ``"auto"`` for CPU tensors). A CPU tensor is
  handed over as a NumPy view of its own memory (``t.detach().numpy()``; bfloat16 through an
  int16 view), so nothing is copied; the result is a NumPy array we allocate, returned as
  ``torch.from_numpy(result)`` (sharing it), or written in place into the caller's ``out``
  tensor. Tensors on another device are copied to the CPU and the result copied back.
* **torch itself** (``backend="torch"``, and ``"auto"`` for CUDA and other non-CPU tensors).
  ``torch.nn.functional.scaled_dot_product_attention`` where it expresses the call exactly;
  otherwise an explicit masked softmax in float32, chunked over queries, that keeps every
  semantic of the kernels (bottom-right causal, windows, ``kv_lengths``, softcap, masks,
  biases, ALiBi, T5 buckets, sinks, block layouts, lse; a row that sees no key gives 0 and lse
  ``-inf``). NumPy inputs with ``backend="torch"`` are wrapped with ``torch.from_numpy`` and
  the result is returned as NumPy.

Results never carry gradients: inputs that require grad are read through ``detach()``.
ferroattn is an inference library; train with ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._args import (
    as_array,
    check_cu_seqlens,
    check_kv_lengths,
    check_out_fits,
    check_packed,
    from_bhsd_shape,
    mask_options,
    prepare,
)
from .variants import T5Bias, check_dense_term, normalize_variants

__all__ = ["TorchStorage", "from_numpy", "is_tensor", "numpy_call", "to_numpy"]

_HALF = (torch.float16, torch.bfloat16)
# Scores held at once by the explicit path (float32 elements per chunk of queries).
_CHUNK_ELEMENTS = 1 << 24


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor."""
    return isinstance(x, torch.Tensor)


# ----------------------------------------------------------------- conversions


def _bf16_numpy() -> Any:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return np.dtype(ml_dtypes.bfloat16)


def to_numpy(t: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (a copy for other devices), without gradients.

    bfloat16 becomes ``ml_dtypes.bfloat16`` through an int16 view (still no copy); without
    ml_dtypes it is widened to float32.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        bf16 = _bf16_numpy()
        if bf16 is None:
            return t.float().numpy()
        return t.view(torch.int16).numpy().view(bf16)
    return t.numpy()


def _tensor_of(a: np.ndarray) -> Any:
    """``torch.from_numpy``, copying only what torch cannot view (negative strides)."""
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        # A read-only array (a broadcast mask, say) is only ever read here.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(a)


def from_numpy(a: np.ndarray, device: Any = None) -> Any:
    """A tensor sharing ``a``'s memory (on ``device``: a copy there when it is not the CPU)."""
    if a.dtype.name == "bfloat16" and a.dtype.kind == "V":
        t = _tensor_of(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = _tensor_of(a)
    if device is not None and torch.device(device).type != "cpu":
        t = t.to(device)
    return t


def as_numpy(x: Any) -> Any:
    """An argument for the NumPy functions: tensors (also a :class:`ferroattn.T5Bias` table)
    as NumPy (see :func:`to_numpy`), anything else as it is."""
    if isinstance(x, torch.Tensor):
        return to_numpy(x)
    if isinstance(x, T5Bias) and isinstance(x.table, torch.Tensor):
        return T5Bias(to_numpy(x.table), x.bidirectional, x.max_distance)
    return x


def _aux_tensor(x: Any, device: Any, dtype: Any = None) -> Any:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        if a.dtype.name == "bfloat16" or a.dtype.kind == "V":
            a = a.astype(np.float32)
        t = _tensor_of(a)
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


# ------------------------------------------------------- running the other side


def numpy_call(method: Any, *arrays: Any, copy_from_device: bool = True, **kwargs: Any) -> Any:
    """Call a NumPy function or method on NumPy views of tensors and hand tensors back.

    Tensors among ``arrays`` and the keyword arguments are read as NumPy (:func:`to_numpy`:
    CPU tensors in place); a result comes back as a tensor on the inputs' device (a tuple
    result: each part). A tensor ``out`` (a keyword) is written in place: through a view when
    it lives in CPU memory and needs no gradient, else by a copy of the result. Tensors on
    another device are copied to the CPU and the result copied back when
    ``copy_from_device``; otherwise that is a ``ValueError``.
    """
    tensors = [a for a in (*arrays, kwargs.get("out")) if isinstance(a, torch.Tensor)]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors on different devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cpu" and not copy_from_device:
        raise ValueError(
            f"this KVCache keeps its keys and values in CPU memory but got tensors on {device}; "
            f"create it with KVCache(..., device={str(device)!r}) to keep them there"
        )
    return on_views(method, arrays, kwargs, device)


def on_views(method: Any, arrays: Any, kwargs: dict[str, Any], device: Any) -> Any:
    """:func:`numpy_call` once the tensors are known to share ``device``."""
    np_arrays = [to_numpy(a) if isinstance(a, torch.Tensor) else a for a in arrays]
    out = kwargs.pop("out", None)
    out_view = None
    if isinstance(out, torch.Tensor) and out.device.type == "cpu" and not out.requires_grad:
        out_view = to_numpy(out)
        if out.dtype == torch.bfloat16 and out_view.dtype.kind == "f":
            out_view = None  # no ml_dtypes: a widened copy, written back below
    kwargs = {n: as_numpy(x) for n, x in kwargs.items()}
    if out_view is not None:
        kwargs["out"] = out_view
    elif out is not None and not isinstance(out, torch.Tensor):
        kwargs["out"] = out
    result = method(*np_arrays, **kwargs)
    if result is None:
        return None
    first, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if isinstance(out, torch.Tensor):
        if out_view is None:
            with torch.no_grad():
                out.copy_(from_numpy(first))
        first = out
    else:
        first = from_numpy(first, device)
    if not isinstance(result, tuple):
        return first
    return (first, *(from_numpy(r, device) for r in rest))


def compute(name: str, data: dict[str, Any], aux: dict[str, Any], tensors: bool) -> Any:
    """``name`` (``"attention"``, ``"attention_varlen"``, ``"attention_weights"``) computed by
    torch. ``data`` holds ``q``, ``k`` (, ``v``, ``out``): tensors, or (``tensors`` false)
    NumPy arrays, computed on tensors sharing their memory and answered in NumPy."""
    torch_func = _TORCH_FUNCS[name]
    if tensors:
        return torch_func(**data, **aux)
    shared = {n: None if a is None else from_numpy(as_array(n, a)) for n, a in data.items()}
    result = torch_func(**shared, **aux)
    first, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    first = data["out"] if data.get("out") is not None else to_numpy(first)
    return (first, *(to_numpy(r) for r in rest)) if rest else first


# ------------------------------------------------------------ the torch path


def _prepare(q: Any, k: Any, v: Any | None, layout: str) -> tuple[list[Any], Any, int]:
    """The checks of the NumPy path (one set, one set of messages) on tensors:
    ``(head-major views, dtype, rank)``."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    _, views, dtype, ndim = prepare(named, layout, lambda _, t: t, lambda _, t: t.detach())
    return views, dtype, ndim


def _check_out(out: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch tensor like q, got {type(out).__name__}")
    check_out_fits(out, shape, dtype)
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")


def _validate_variants(shape4: tuple[int, int, int, int], ndim: int, aux: dict[str, Any]) -> None:
    """The NumPy path's checks of the score terms, so both paths raise the same errors; the
    dense ones (mask, bias) are judged by shape and dtype where they are, not copied over."""
    small = {n: aux[n] for n in ("alibi_slopes", "sinks", "rel_bias", "block_layout")}
    normalize_variants(
        shape4=shape4,
        ndim=ndim,
        block_size=aux["block_size"],
        **{n: as_numpy(x) for n, x in small.items()},
    )
    for name in ("mask", "bias"):
        x = aux[name]
        if x is None:
            continue
        t = x if isinstance(x, torch.Tensor) else _tensor_of(np.asarray(x))
        if name == "mask":
            dtype_ok = t.dtype == torch.bool
        else:
            dtype_ok = not (t.dtype == torch.bool or t.is_complex())
        check_dense_term(name, tuple(t.shape), t.dtype, dtype_ok, shape4, ndim)


def _t5_bucket(rel: Any, buckets: int, max_distance: int, bidirectional: bool) -> Any:
    """T5's ``_relative_position_bucket`` of key − query, as the kernels compute it."""
    nb = buckets
    bucket = torch.zeros_like(rel)
    if bidirectional:
        nb //= 2
        bucket = bucket + (rel > 0).long() * nb
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    max_exact = nb // 2
    ratio = torch.log(dist.clamp(min=1).double() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (ratio * (nb - max_exact)).long()).clamp(max=nb - 1)
    return bucket + torch.where(dist < max_exact, dist, large)


class _Scoring:
    """How the explicit path turns ``scale·q·k`` into logits: every mask and score term beyond
    ``q·k``, as tensors on the inputs' device."""

    def __init__(self, shape4, device, opts, lens, aux, sink_keys: int = 0) -> None:
        b, hq, nq, nk = shape4
        self.sink_keys = sink_keys
        self.opts, self.shape4, self.device = opts, shape4, device
        f32 = torch.float32
        self.lens = torch.as_tensor(
            [nk] * b if lens is None else lens, dtype=torch.long, device=device
        )
        self.mask = None if aux["mask"] is None else _aux_tensor(aux["mask"], device)
        self.bias = None if aux["bias"] is None else _aux_tensor(aux["bias"], device, f32)
        for name in ("mask", "bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)))
        self.slopes = _aux_tensor(aux["alibi_slopes"], device, f32)
        self.sinks = _aux_tensor(aux["sinks"], device, f32)
        rb = aux["rel_bias"]
        self.rel = None
        if rb is not None:
            table = _aux_tensor(rb.table, device, f32)
            self.rel = (table, table.shape[0], int(rb.max_distance), bool(rb.bidirectional))
        self.blocks = None
        if aux["block_layout"] is not None:
            lay = _aux_tensor(aux["block_layout"], device, torch.bool)
            self.blocks = (lay if lay.dim() == 3 else lay[None], int(aux["block_size"]))

    def plain(self) -> bool:
        o = self.opts
        return (
            self.mask is None
            and self.bias is None
            and self.slopes is None
            and self.sinks is None
            and self.rel is None
            and self.blocks is None
            and o.softcap is None
            and o.window_left is None
            and o.window_right is None
        )

    def scores(self, s: Any, i0: int, i1: int) -> Any:
        """Turn raw ``scale·q·k`` scores ``(B, Hq, c, Nk)`` of queries ``i0:i1`` into logits,
        −inf where a query may not look."""
        o = self.opts
        b, hq, nq, nk = self.shape4
        dev = self.device
        if o.softcap is not None:
            s = o.softcap * torch.tanh(s / o.softcap)
        i = torch.arange(i0, i1, device=dev)
        j = torch.arange(nk, device=dev)
        if o.top_left:
            pos = i[None, :].expand(b, -1)
        else:
            pos = i[None, :] + (self.lens - nq)[:, None]  # (B, c)
        rel = j[None, None, :] - pos[:, :, None]  # (B, c, Nk): key − position
        if self.slopes is not None:
            s = s - self.slopes[None, :, None, None] * rel.abs()[:, None].to(s.dtype)
        if self.rel is not None:
            table, buckets, max_distance, bidir = self.rel
            bucket = _t5_bucket(rel, buckets, max_distance, bidir)
            s = s + table[bucket].permute(0, 3, 1, 2)
        if self.bias is not None:
            s = s + (self.bias[:, :, i0:i1] if self.bias.shape[2] > 1 else self.bias)
        seen = (j[None, None, :] < self.lens[:, None, None]).expand(b, i1 - i0, nk)
        if o.causal:
            seen = seen & (rel <= 0)
        if o.window_left is not None or o.window_right is not None:
            inside = torch.ones_like(seen)
            if o.window_left is not None:
                inside = inside & (rel >= -o.window_left)
            if o.window_right is not None:
                inside = inside & (rel <= o.window_right)
            if self.sink_keys:  # StreamingLLM sink keys (KVCache) ignore the window
                inside = inside | (j < self.sink_keys)
            seen = seen & inside
        seen = seen[:, None]  # (B, 1, c, Nk)
        if self.mask is not None:
            m = self.mask[:, :, i0:i1] if self.mask.shape[2] > 1 else self.mask
            seen = seen & m
        if self.blocks is not None:
            lay, bs = self.blocks
            live = lay[:, (i // bs)][:, :, (j // bs)]  # (H or 1, c, Nk)
            seen = seen & live[None]
        return s.masked_fill(~seen, float("-inf"))

    def lse(self, s: Any) -> Any:
        if self.sinks is None:
            return torch.logsumexp(s, dim=-1)
        b, hq, c, _ = s.shape
        sink = self.sinks[None, :, None, None].expand(b, hq, c, 1)
        return torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)


def _probabilities(q4: Any, k4: Any, scoring: _Scoring, i0: int, i1: int) -> tuple[Any, Any]:
    """float32 probabilities ``(B, Hq, c, Nk)`` of queries ``i0:i1`` and their lse."""
    b, hq, _, d = q4.shape
    hkv, nk = k4.shape[1], k4.shape[2]
    g = hq // hkv
    qc = q4[:, :, i0:i1].float().reshape(b, hkv, g, i1 - i0, d)
    s = torch.matmul(qc, k4.float().transpose(-1, -2)[:, :, None]) * scoring.opts.scale
    s = scoring.scores(s.reshape(b, hq, i1 - i0, nk), i0, i1)
    lse = scoring.lse(s)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - safe[..., None]), lse


def _chunks(shape4: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    b, hq, nq, nk = shape4
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * max(nk, 1)))
    return [(i, min(nq, i + step)) for i in range(0, nq, step)] or [(0, 0)]


def _sdpa(q4: Any, k4: Any, v4: Any, scoring: _Scoring) -> Any | None:
    """SDPA where it expresses the call exactly (and no row is left without keys), else None."""
    o = scoring.opts
    b, hq, nq, nk = scoring.shape4
    if not scoring.plain() or scoring.sink_keys or nk == 0 or nq == 0:
        return None
    if bool((scoring.lens != nk).any()):
        return None
    attn_mask, is_causal = None, False
    if o.causal:
        if o.top_left or nq == nk:
            is_causal = True  # SDPA's is_causal is top-left
        elif nq < nk:  # bottom-right: every query still sees a key
            i = torch.arange(nq, device=q4.device)[:, None]
            attn_mask = torch.arange(nk, device=q4.device)[None, :] <= i + (nk - nq)
        else:
            return None  # the first Nq − Nk queries see nothing: SDPA would give NaN
    if q4.device.type == "cpu" and q4.dtype in _HALF:
        q4, k4, v4 = (t.float() for t in (q4, k4, v4))  # accumulate in float32
    kwargs: dict[str, Any] = {"enable_gqa": True} if hq != k4.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(
        q4, k4, v4, attn_mask=attn_mask, is_causal=is_causal, scale=o.scale, **kwargs
    )


def _dense(q4, k4, v4, opts, lens, aux, want_lse: bool, sink_keys: int = 0) -> tuple[Any, Any]:
    """``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq) or None)``, out in float32 or q's dtype."""
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]
    scoring = _Scoring((b, hq, nq, nk), q4.device, opts, lens, aux, sink_keys)
    if not want_lse:
        fast = _sdpa(q4, k4, v4, scoring)
        if fast is not None:
            return fast, None
    hkv, dv = v4.shape[1], v4.shape[3]
    out = torch.empty((b, hq, nq, dv), dtype=torch.float32, device=q4.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q4.device)
    vf = v4.float()[:, :, None]
    for i0, i1 in _chunks((b, hq, nq, nk)):
        p, lse[:, :, i0:i1] = _probabilities(q4, k4, scoring, i0, i1)
        p = p.reshape(b, hkv, hq // hkv, i1 - i0, nk)
        out[:, :, i0:i1] = torch.matmul(p, vf).reshape(b, hq, i1 - i0, dv)
    return out, lse


def _finish(out4: Any, user_shape, ndim, layout, dtype, out) -> Any:
    """The float32/dtype head-major result in the caller's layout, rank, dtype, ``out``."""
    if ndim == 4:
        res = out4 if layout == "bhsd" else out4.permute(0, 2, 1, 3)
    elif ndim == 3:
        res = out4[0] if layout == "bhsd" else out4[0].permute(1, 0, 2)
    else:
        res = out4[0, 0]
    if out is not None:
        with torch.no_grad():
            out.copy_(res)
        return out
    return res.to(dtype).contiguous() if res.dtype != dtype else res.contiguous()


_VARIANT_NAMES = ("mask", "bias", "alibi_slopes", "rel_bias", "sinks", "block_layout", "block_size")


def _score_options(
    q4: Any, k4: Any, ndim: int, mask_kw: dict[str, Any], kv_lengths: Any, variants: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """The checked mask options, key lengths and score terms of a dense call over
    ``(B, H, N, D)`` tensors (what :func:`attention` and :func:`attention_weights` share);
    ``variants`` holds the score terms given (mask, bias, alibi_slopes, ...), by name."""
    unknown = sorted(set(variants) - set(_VARIANT_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    aux = {name: variants.get(name) for name in _VARIANT_NAMES}
    opts = mask_options(head_dim=q4.shape[3], **mask_kw)
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]
    lens = check_kv_lengths(as_numpy(kv_lengths), b, nk)
    _validate_variants((b, hq, nq, nk), ndim, aux)
    return opts, lens, aux


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    softcap=None,
    layout="bhsd",
    return_lse=False,
    out=None,
    **variants,
):
    """:func:`ferroattn.attention` computed by torch on the tensors' device."""
    (q4, k4, v4), dtype, ndim = _prepare(q, k, v, layout)
    opts, lens, aux = _score_options(
        q4, k4, ndim, dict(causal=causal, window=window, scale=scale, softcap=softcap),
        kv_lengths, variants
    )  # fmt: skip
    b, hq, nq, _ = q4.shape
    user_shape = from_bhsd_shape((b, hq, nq, v4.shape[3]), ndim, layout)
    if out is not None:
        _check_out(out, user_shape, dtype, q.device)
    out4, lse = _dense(q4, k4, v4, opts, lens, aux, return_lse)
    result = _finish(out4, user_shape, ndim, layout, dtype, out)
    if not return_lse:
        return result
    return result, lse.reshape((b, hq, nq)[4 - ndim :])


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    causal=False,
    window=None,
    scale=None,
    softcap=None,
    return_lse=False,
    out=None,
):
    """:func:`ferroattn.attention_varlen` computed by torch: one dense call per sequence."""
    check_packed({"q": q, "k": k, "v": v})
    (q4, k4, v4), dtype, _ = _prepare(q, k, v, "bshd")
    opts = mask_options(
        head_dim=q4.shape[3], causal=causal, window=window, scale=scale, softcap=softcap
    )
    cq, ck = check_cu_seqlens(
        as_numpy(cu_seqlens_q), as_numpy(cu_seqlens_k), q4.shape[2], k4.shape[2]
    )
    _, hq, total_q, _ = q4.shape
    dv = v4.shape[3]
    user_shape = (total_q, hq, dv)
    if out is not None:
        _check_out(out, user_shape, dtype, q.device)
    out4 = torch.zeros((1, hq, total_q, dv), dtype=torch.float32, device=q.device)
    lse = torch.full((hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    aux = dict.fromkeys(_VARIANT_NAMES)
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        o, l_ = _dense(
            q4[:, :, q0:q1], k4[:, :, k0:k1], v4[:, :, k0:k1], opts, None, aux, return_lse
        )
        out4[:, :, q0:q1] = o.float()
        if l_ is not None:
            lse[:, q0:q1] = l_[0]
    result = _finish(out4, user_shape, 3, "bshd", dtype, out)
    return (result, lse) if return_lse else result


def attention_weights(
    q,
    k,
    *,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    softcap=None,
    layout="bhsd",
    **variants,
):
    """:func:`ferroattn.attention_weights` computed by torch (float32, cast to q's dtype)."""
    (q4, k4), dtype, ndim = _prepare(q, k, None, layout)
    opts, lens, aux = _score_options(
        q4, k4, ndim, dict(causal=causal, window=window, scale=scale, softcap=softcap),
        kv_lengths, variants
    )  # fmt: skip
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]
    scoring = _Scoring((b, hq, nq, nk), q4.device, opts, lens, aux)
    w = torch.empty((b, hq, nq, nk), dtype=torch.float32, device=q4.device)
    for i0, i1 in _chunks((b, hq, nq, nk)):
        w[:, :, i0:i1] = _probabilities(q4, k4, scoring, i0, i1)[0]
    w = w.reshape(w.shape[4 - ndim :])
    return w.to(dtype)


_TORCH_FUNCS: dict[str, Callable[..., Any]] = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_weights": attention_weights,
}


# ------------------------------------------------------------ KVCache storage


def _torch_dtype(code: str) -> Any:
    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int8": torch.int8,
    }[code]


class TorchStorage:
    """The storage of a :class:`ferroattn.KVCache` in torch tensors on one device, computed by
    torch there (the cache keeps the same logic over either storage; see
    ``ferroattn._cache_storage.CacheStorage`` for what each operation means).

    Inputs of any kind are accepted: NumPy arrays become tensors and tensors move to the
    device; results are tensors on it.
    """

    def __init__(self, device: Any = None) -> None:
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {device!r}: {e}") from e

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        code = "bfloat16" if dtype.name == "bfloat16" else dtype.name
        try:
            return torch.zeros(shape, dtype=_torch_dtype(code), device=self.device)
        except RuntimeError as e:  # torch reports both a full and an absent device this way
            if "memory" in str(e).lower():
                raise MemoryError(str(e)) from e
            raise ValueError(f"device {self.device} cannot hold the cache: {e}") from e

    def index(self, positions: np.ndarray) -> Any:
        return torch.as_tensor(np.asarray(positions), device=self.device)

    def cat(self, parts: list[Any]) -> Any:
        return torch.cat(parts, dim=1)

    def foreign(self, *xs: Any) -> bool:
        return False  # `convert` takes every kind

    def convert(self, name: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            x = from_numpy(as_array(name, x))
        return x.detach().to(self.device)

    def check_out(self, out: Any, shape: tuple[int, ...], q: Any, held: tuple[Any, ...]) -> None:
        _check_out(out, shape, q.dtype, q.device)

    def check_terms(self, shape4: tuple[int, int, int, int], terms: dict[str, Any]) -> None:
        aux = {"mask": None, "bias": None, "block_layout": None, "block_size": None, **terms}
        _validate_variants(shape4, 4, aux)

    def encode(self, x: Any, code: str, dtype: np.dtype) -> tuple[Any, Any]:
        if code != "int8":
            return x.to(_torch_dtype(code)), None
        x = x.float()
        scale = x.abs().amax(dim=-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe[..., None]), -127, 127).to(torch.int8)
        return q, scale

    def decode(self, data: Any, scales: Any) -> Any:
        if scales is None:
            return data
        return data.float() * scales[..., None]

    def run(
        self, query: Any, q: Any, k: Any, v: Any, scales: tuple[Any, Any] | None, out: Any
    ) -> Any:
        if out is None:
            result = torch.zeros(query.shape, dtype=q.dtype, device=q.device)
        else:  # checked by the cache (`check_out`) before anything was stored
            result = out
            result.zero_()
        aux = {"mask": None, "bias": None, "block_layout": None, "block_size": None}
        aux.update(query.terms)
        _validate_variants((query.shape[0], q.shape[1], q.shape[2], k.shape[2]), 4, aux)
        for b, q0, q1, k0, k1 in query.seqs:
            kb, vb = k[b : b + 1, :, k0:k1], v[b : b + 1, :, k0:k1]
            if scales is not None:
                kb = self.decode(kb, scales[0][b : b + 1, :, k0:k1])
                vb = self.decode(vb, scales[1][b : b + 1, :, k0:k1])
            qb = q[b : b + 1, :, q0:q1]
            o, _ = _dense(qb, kb, vb, query.opts, None, aux, False, sink_keys=query.sink_keys)
            with torch.no_grad():
                result[b : b + 1, :, q0:q1] = o.to(result.dtype)
        return result
