"""torch tensors in, torch tensors out: the only ferroattn module that imports torch.

:func:`ferroattn.attention` and friends come here when an argument is a torch tensor or when
``backend="torch"`` is asked for. Two ways to compute:

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

from . import functional as _fn
from ._args import check_layout, from_bhsd_shape, int_vector, mask_options
from .kv_cache import KVCache
from .variants import T5Bias, extras_kwargs

__all__ = ["TorchKVCache", "from_numpy", "is_tensor", "numpy_call", "to_numpy"]

_HALF = (torch.float16, torch.bfloat16)
# Scores held at once by the explicit path (float32 elements per chunk of queries).
_CHUNK_ELEMENTS = 1 << 24


def is_tensor(x: Any) -> bool:
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


def _aux_numpy(x: Any) -> Any:
    """An auxiliary argument (mask, bias, slopes, lengths, ...) for the NumPy functions."""
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


# ------------------------------------------------------------------- dispatch

_DATA = ("q", "k", "v", "out")


def _kinds(named: dict[str, Any]) -> tuple[bool, Any]:
    """Whether the data arguments are tensors (else NumPy), and their device."""
    tensors = {n for n, x in named.items() if isinstance(x, torch.Tensor)}
    present = {n for n, x in named.items() if x is not None}
    if tensors and tensors != present:
        others = ", ".join(sorted(present - tensors))
        raise TypeError(
            f"{', '.join(sorted(tensors))} are torch tensors but {others} are not: pass "
            "q, k, v (and out) all as torch tensors or all as NumPy arrays"
        )
    if not tensors:
        return False, None
    devices = {n: named[n].device for n in tensors}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"q, k, v and out must be on one device, got {listed}")
    return True, first


def _resolve(backend: str, device: Any) -> str:
    if backend == "auto":
        return "cpu" if device is None or device.type == "cpu" else "torch"
    return backend


def _back(result: Any, device: Any) -> Any:
    """NumPy results of the kernels as tensors on ``device``."""
    if isinstance(result, tuple):
        return tuple(_back(r, device) for r in result)
    return from_numpy(result, device)


def _via_kernels(func: Any, data: dict[str, Any], aux: dict[str, Any], device: Any) -> Any:
    """Run the NumPy function on views of the tensors; write into ``out`` in place."""
    out = data.pop("out", None)
    arrays = {n: to_numpy(t) for n, t in data.items()}
    aux = {n: _aux_numpy(x) for n, x in aux.items()}
    if out is None:
        return _back(func(*arrays.values(), **aux, backend="cpu"), device)
    if out.device.type == "cpu" and not out.requires_grad and out.dtype != torch.bfloat16:
        out_view = out.numpy()
    elif out.device.type == "cpu" and out.dtype == torch.bfloat16 and _bf16_numpy() is not None:
        out_view = to_numpy(out)
    else:
        out_view = None
    result = func(*arrays.values(), **aux, out=out_view, backend="cpu")
    rest = result[1:] if isinstance(result, tuple) else ()
    if out_view is None:
        first = result[0] if isinstance(result, tuple) else result
        with torch.no_grad():
            out.copy_(from_numpy(first))
    if rest:
        return (out, *_back(rest, device))
    return out


def dispatch(name: str, data: dict[str, Any], aux: dict[str, Any], backend: str) -> Any:
    """Entry point of :mod:`ferroattn.functional` for tensors or ``backend="torch"``.

    ``name`` is ``"attention"``, ``"attention_varlen"`` or ``"attention_weights"``; ``data``
    holds ``q``, ``k`` (, ``v``, ``out``), ``aux`` every other argument.
    """
    func = getattr(_fn, name)
    tensors, device = _kinds(data)
    backend = _resolve(backend, device)
    if backend == "cpu":
        if not tensors:  # NumPy data with a tensor among the options
            aux = {n: _aux_numpy(x) for n, x in aux.items()}
            if "out" in data:
                aux["out"] = data["out"]
            return func(*(data[n] for n in data if n != "out"), **aux)
        return _via_kernels(func, dict(data), aux, device)
    torch_func = _TORCH_FUNCS[name]
    if tensors:
        return torch_func(**data, **aux)
    # NumPy in, backend="torch": compute on shared tensors, hand NumPy back.
    shared = {n: None if a is None else from_numpy(_fn.as_array(n, a)) for n, a in data.items()}
    result = torch_func(**shared, **aux)
    first, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    first = data["out"] if data.get("out") is not None else to_numpy(first)
    return (first, *(to_numpy(r) for r in rest)) if rest else first


# ------------------------------------------------------------ the torch path


def _check_dtypes(named: dict[str, Any]) -> Any:
    for n, t in named.items():
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"{n} has dtype {t.dtype}; ferroattn takes float32, float16, bfloat16 "
                "(or float64, computed in float32)"
            )
    first = next(iter(named.values())).dtype
    if any(t.dtype != first for t in named.values()):
        listed = ", ".join(f"{n}={t.dtype}" for n, t in named.items())
        raise TypeError(f"inputs must share one dtype, got {listed}")
    return first


def _bhsd(name: str, t: Any, layout: str) -> Any:
    if t.dim() == 4:
        return t if layout == "bhsd" else t.permute(0, 2, 1, 3)
    if t.dim() == 3:
        return t[None] if layout == "bhsd" else t.permute(1, 0, 2)[None]
    if t.dim() == 2:
        return t[None, None]
    raise ValueError(f"{name} must have 2, 3 or 4 dimensions, got shape {tuple(t.shape)}")


def _prepare(q: Any, k: Any, v: Any | None, layout: str) -> tuple[list[Any], Any, int]:
    layout = check_layout(layout)
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    dtype = _check_dtypes(named)
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named.items())
    if len({t.dim() for t in named.values()}) != 1:
        raise ValueError(f"q, k and v must have the same number of dimensions; got {shapes}")
    views = [_bhsd(n, t.detach(), layout) for n, t in named.items()]
    _fn._check_shapes(views[0], views[1], views[2] if v is not None else None, f"got {shapes}")
    return views, dtype, q.dim()


def _check_out(out: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch tensor like q, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device}")


def _validate_extras(shape4: tuple[int, int, int, int], ndim: int, aux: dict[str, Any]) -> None:
    """The NumPy validation of the small terms, so both paths raise the same errors."""
    small = {n: aux[n] for n in ("alibi_slopes", "sinks", "rel_bias", "block_layout")}
    extras_kwargs(
        shape4=shape4,
        ndim=ndim,
        block_size=aux["block_size"],
        **{n: _aux_numpy(x) for n, x in small.items()},
    )
    for name in ("mask", "bias"):
        x = aux[name]
        if x is None:
            continue
        t = x if isinstance(x, torch.Tensor) else _tensor_of(np.asarray(x))
        if name == "mask" and t.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean array (True = attend), got dtype {t.dtype}")
        if name == "bias" and (t.dtype == torch.bool or t.is_complex()):
            raise TypeError(f"bias must be a float array, got dtype {t.dtype}")
        if t.dim() > 4:
            raise ValueError(f"{name} must have at most 4 dimensions, got shape {tuple(t.shape)}")
        try:
            torch.broadcast_shapes(tuple(t.shape), shape4)
            ok = torch.broadcast_shapes(tuple(t.shape), shape4) == shape4
        except RuntimeError:
            ok = False
        if not ok:
            want = shape4[4 - ndim :] if ndim < 4 else shape4
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to (B, H, Nq, Nk) = "
                f"{shape4} (for {ndim}-D inputs: {want})"
            )


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


class _Terms:
    """Everything beyond ``q·k`` for the explicit path, as tensors on the inputs' device."""

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


def _probabilities(q4: Any, k4: Any, terms: _Terms, i0: int, i1: int) -> tuple[Any, Any]:
    """float32 probabilities ``(B, Hq, c, Nk)`` of queries ``i0:i1`` and their lse."""
    b, hq, _, d = q4.shape
    hkv, nk = k4.shape[1], k4.shape[2]
    g = hq // hkv
    qc = q4[:, :, i0:i1].float().reshape(b, hkv, g, i1 - i0, d)
    s = torch.matmul(qc, k4.float().transpose(-1, -2)[:, :, None]) * terms.opts.scale
    s = terms.scores(s.reshape(b, hq, i1 - i0, nk), i0, i1)
    lse = terms.lse(s)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - safe[..., None]), lse


def _chunks(shape4: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    b, hq, nq, nk = shape4
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * max(nk, 1)))
    return [(i, min(nq, i + step)) for i in range(0, nq, step)] or [(0, 0)]


def _sdpa(q4: Any, k4: Any, v4: Any, terms: _Terms) -> Any | None:
    """SDPA where it expresses the call exactly (and no row is left without keys), else None."""
    o = terms.opts
    b, hq, nq, nk = terms.shape4
    if not terms.plain() or terms.sink_keys or nk == 0 or nq == 0 or bool((terms.lens != nk).any()):
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
    terms = _Terms((b, hq, nq, nk), q4.device, opts, lens, aux, sink_keys)
    if not want_lse:
        fast = _sdpa(q4, k4, v4, terms)
        if fast is not None:
            return fast, None
    hkv, dv = v4.shape[1], v4.shape[3]
    out = torch.empty((b, hq, nq, dv), dtype=torch.float32, device=q4.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q4.device)
    vf = v4.float()[:, :, None]
    for i0, i1 in _chunks((b, hq, nq, nk)):
        p, lse[:, :, i0:i1] = _probabilities(q4, k4, terms, i0, i1)
        p = p.reshape(b, hkv, hq // hkv, i1 - i0, nk)
        out[:, :, i0:i1] = torch.matmul(p, vf).reshape(b, hq, i1 - i0, dv)
    return out, lse


def _lengths(kv_lengths: Any, b: int, nk: int) -> list[int] | None:
    if kv_lengths is None:
        return None
    lens = int_vector("kv_lengths", _aux_numpy(kv_lengths), b)
    if any(n > nk for n in lens):
        raise ValueError(f"kv_lengths must lie in [0, {nk}] (the key length), got {lens}")
    return lens


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
    mask=None,
    bias=None,
    alibi_slopes=None,
    rel_bias=None,
    sinks=None,
    block_layout=None,
    block_size=None,
):
    """:func:`ferroattn.attention` computed by torch on the tensors' device."""
    (q4, k4, v4), dtype, ndim = _prepare(q, k, v, layout)
    opts = mask_options(
        head_dim=q4.shape[3], causal=causal, window=window, scale=scale, softcap=softcap
    )
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]
    lens = _lengths(kv_lengths, b, nk)
    aux = {
        "mask": mask,
        "bias": bias,
        "alibi_slopes": alibi_slopes,
        "rel_bias": rel_bias,
        "sinks": sinks,
        "block_layout": block_layout,
        "block_size": block_size,
    }
    _validate_extras((b, hq, nq, nk), ndim, aux)
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
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D (total_tokens, heads, dim), got shape {tuple(t.shape)}"
            )
    (q4, k4, v4), dtype, _ = _prepare(q, k, v, "bshd")
    opts = mask_options(
        head_dim=q4.shape[3], causal=causal, window=window, scale=scale, softcap=softcap
    )
    cq = int_vector("cu_seqlens_q", _aux_numpy(cu_seqlens_q))
    ck = int_vector("cu_seqlens_k", _aux_numpy(cu_seqlens_k))
    for name, cu, total in (("cu_seqlens_q", cq, q4.shape[2]), ("cu_seqlens_k", ck, k4.shape[2])):
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
    _, hq, total_q, _ = q4.shape
    dv = v4.shape[3]
    user_shape = (total_q, hq, dv)
    if out is not None:
        _check_out(out, user_shape, dtype, q.device)
    out4 = torch.zeros((1, hq, total_q, dv), dtype=torch.float32, device=q.device)
    lse = torch.full((hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    none = dict.fromkeys(("mask", "bias", "alibi_slopes", "rel_bias", "sinks", "block_layout"))
    aux = {**none, "block_size": None}
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
    mask=None,
    bias=None,
    alibi_slopes=None,
    rel_bias=None,
    sinks=None,
    block_layout=None,
    block_size=None,
):
    """:func:`ferroattn.attention_weights` computed by torch (float32, cast to q's dtype)."""
    (q4, k4), dtype, ndim = _prepare(q, k, None, layout)
    opts = mask_options(
        head_dim=q4.shape[3], causal=causal, window=window, scale=scale, softcap=softcap
    )
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]
    lens = _lengths(kv_lengths, b, nk)
    aux = {
        "mask": mask,
        "bias": bias,
        "alibi_slopes": alibi_slopes,
        "rel_bias": rel_bias,
        "sinks": sinks,
        "block_layout": block_layout,
        "block_size": block_size,
    }
    _validate_extras((b, hq, nq, nk), ndim, aux)
    terms = _Terms((b, hq, nq, nk), q4.device, opts, lens, aux)
    w = torch.empty((b, hq, nq, nk), dtype=torch.float32, device=q4.device)
    for i0, i1 in _chunks((b, hq, nq, nk)):
        w[:, :, i0:i1] = _probabilities(q4, k4, terms, i0, i1)[0]
    w = w.reshape(w.shape[4 - ndim :])
    return w.to(dtype)


_TORCH_FUNCS: dict[str, Callable[..., Any]] = {
    "attention": attention,
    "attention_varlen": attention_varlen,
    "attention_weights": attention_weights,
}


# ------------------------------------------------------- KVCache, SelfAttention


def numpy_call(method: Any, *arrays: Any, copy_from_device: bool = True, **kwargs: Any) -> Any:
    """Call a NumPy method on views of CPU tensors and hand tensors back.

    ``out`` (a keyword) is written in place. Tensors on another device are copied to the CPU
    and the result copied back when ``copy_from_device``; otherwise that is a ``ValueError``.
    """
    data = [a for a in (*arrays, kwargs.get("out")) if isinstance(a, torch.Tensor)]
    devices = {t.device for t in data}
    if len(devices) > 1:
        raise ValueError(f"tensors on different devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cpu" and not copy_from_device:
        raise ValueError(
            f"this KVCache keeps its keys and values in CPU memory but got tensors on {device}; "
            f"create it with KVCache(..., device={str(device)!r}) to keep them there"
        )
    np_arrays = [to_numpy(a) if isinstance(a, torch.Tensor) else a for a in arrays]
    out = kwargs.pop("out", None)
    out_view = None
    if isinstance(out, torch.Tensor) and out.device.type == "cpu":
        out_view = to_numpy(out)
        if out.dtype == torch.bfloat16 and out_view.dtype.kind == "f":
            out_view = None  # no ml_dtypes: a widened copy, written back below
    kwargs = {n: _aux_numpy(x) for n, x in kwargs.items()}
    if out is not None and out_view is not None:
        kwargs["out"] = out_view
    elif out is not None and not isinstance(out, torch.Tensor):
        kwargs["out"] = out
    result = method(*np_arrays, **kwargs)
    if result is None:
        return None
    if isinstance(out, torch.Tensor):
        if out_view is None:
            with torch.no_grad():
                out.copy_(from_numpy(result))
        return out
    return from_numpy(result, device)


def _torch_dtype(code: str) -> Any:
    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int8": torch.int8,
    }[code]


class TorchKVCache(KVCache):
    """A :class:`ferroattn.KVCache` whose keys and values live in torch tensors on a device.

    Made by ``KVCache(..., device="cuda")`` (any torch device other than the CPU); the same
    semantics (ragged batches, windows and sinks, int8, rollback), computed by torch there.
    Inputs are tensors (moved to the cache's device if elsewhere); results are tensors on it.
    Building one directly with ``device="cpu"`` is allowed (tests use it).
    """

    _host = False

    def __init__(self, *args: Any, device: Any = None, **kwargs: Any) -> None:
        self._torch_device = torch.device("cpu" if device is None else device)
        super().__init__(*args, device=device, **kwargs)

    def _zeros(self, shape, dtype):
        code = "bfloat16" if dtype.name == "bfloat16" else dtype.name
        return torch.zeros(shape, dtype=_torch_dtype(code), device=self._torch_device)

    def _ix(self, index):
        return torch.as_tensor(np.asarray(index), device=self._torch_device)

    def _cat(self, parts):
        return torch.cat(parts, dim=1)

    @property
    def nbytes(self) -> int:
        total = self._k.nbytes + self._v.nbytes
        if self._code == "int8":
            total += self._ks.nbytes + self._vs.nbytes
        return int(total)

    def _tensor(self, name: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            x = from_numpy(_fn.as_array(name, x))
        return x.detach().to(self._torch_device)

    def _check_kv(self, k, v):
        k, v = self._tensor("k", k), self._tensor("v", v)
        _check_dtypes({"k": k, "v": v})
        for name, t, dim in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            s = tuple(t.shape)
            if len(s) != 4 or s[:2] != (self.batch, self.kv_heads) or s[3] != dim:
                raise ValueError(
                    f"{name} must have shape (batch={self.batch}, kv_heads={self.kv_heads}, "
                    f"tokens, {dim}), got {s}"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(
                f"k and v hold different numbers of tokens: {tuple(k.shape)} vs {tuple(v.shape)}"
            )
        return k, v

    def _check_q(self, q):
        q = self._tensor("q", q)
        _check_dtypes({"q": q})
        s = tuple(q.shape)
        if len(s) != 4 or s[0] != self.batch or s[3] != self.head_dim or s[1] % self.kv_heads:
            raise ValueError(
                f"q must have shape (batch={self.batch}, heads (a multiple of "
                f"{self.kv_heads}), tokens, {self.head_dim}), got {s}"
            )
        return q

    def _check_out(self, out, q):
        if out is not None:
            _check_out(out, self._result_shape(q), q.dtype, q.device)

    def _encode(self, x):
        if self._code != "int8":
            return x.to(self._k.dtype), None
        x = x.float()
        scale = x.abs().amax(dim=-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe[..., None]), -127, 127).to(torch.int8)
        return q, scale

    def _decode(self, data, scales):
        if scales is None:
            return data
        return data.float() * scales[..., None]

    @property
    def lengths(self) -> np.ndarray:
        return self._len.copy()

    def _run(self, q, k, v, scales, seqs, sink_keys, scale, softcap, out, terms, window=None):
        opts = mask_options(
            head_dim=self.head_dim,
            causal=True,
            window=None if window is None else (window, 0),
            scale=scale,
            softcap=softcap,
        )
        shape = self._result_shape(q)
        if out is None:
            result = torch.zeros(shape, dtype=q.dtype, device=q.device)
        else:  # checked by the caller (`_check_out`) before anything was stored
            result = out
            result.zero_()
        aux = {
            "mask": None,
            "bias": None,
            "alibi_slopes": terms.alibi_slopes,
            "rel_bias": terms.rel_bias,
            "sinks": terms.sinks,
            "block_layout": None,
            "block_size": None,
        }
        _validate_extras((self.batch, q.shape[1], q.shape[2], k.shape[2]), 4, aux)
        for b, q0, q1, k0, k1 in seqs:
            kb, vb = k[b : b + 1, :, k0:k1], v[b : b + 1, :, k0:k1]
            if scales is not None:
                kb = self._decode(kb, scales[0][b : b + 1, :, k0:k1])
                vb = self._decode(vb, scales[1][b : b + 1, :, k0:k1])
            qb = q[b : b + 1, :, q0:q1]
            o, _ = _dense(qb, kb, vb, opts, None, aux, False, sink_keys=sink_keys)
            with torch.no_grad():
                result[b : b + 1, :, q0:q1] = o.to(result.dtype)
        return result
