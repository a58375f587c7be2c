"""Where a :class:`ferroattn.KVCache` keeps its keys and values, and what computes over them.

The cache's logic (positions, the ring buffer, sinks, rollback, writes, gathers, checks that
make a call all-or-nothing) is written once, in :mod:`ferroattn.kv_cache`, over a storage
object that does the few things that differ between array libraries. Two exist:
:class:`NumpyStorage` here (NumPy arrays, read in place by the Rust kernels) and
``ferroattn.torch.TorchStorage`` (torch tensors on a device, computed by torch there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import numpy as np

from . import _ferroattn
from ._args import (
    MaskOptions,
    Sequences,
    aligned_copy,
    as_array,
    check_out,
    dtype_code,
    kernel_ready,
    mask_options,
)
from ._dispatch import tensor_among
from ._memory import zeros
from .precision import Precision, check_precision
from .variants import normalize_variants

__all__ = [
    "CacheQuery",
    "CacheStorage",
    "KVEncoding",
    "NumpyStorage",
    "attend_sequences",
    "encode_numpy",
    "quantize_rows",
]


class KVEncoding(NamedTuple):
    """The type the keys and values are stored in, as the binding takes it (its
    ``kv_encoding``): ``kv_dtype`` a kernel dtype name; int8 comes with per-row float32 scales
    of shape ``(B, Hkv, N, 1)``."""

    kv_dtype: str
    k_scales: np.ndarray | None = None
    v_scales: np.ndarray | None = None


class CacheQuery(NamedTuple):
    """What one attention call over a cache's keys asks of its storage (a tuple: made on
    every general call, so cheap to build).

    Attributes:
        seqs: ``(b, q0, q_len, k0, k_len)``: queries ``q0 : q0 + q_len`` of sequence ``b``
            see keys ``k0 : k0 + k_len``; rows no entry names are zeros.
        sink_keys: the first keys, which the window does not hide (StreamingLLM sinks).
        opts: scale, softcap, causal alignment and window.
        terms: ``alibi_slopes``, ``sinks``, ``rel_bias`` (None where not given).
        shape: the result's ``(batch, heads, T, value_dim)``.
        code: the storage type of the keys and values (``"int8"``: with scales).
    """

    seqs: list[tuple[int, int, int, int, int]]
    sink_keys: int
    opts: MaskOptions
    terms: dict[str, Any]
    shape: tuple[int, int, int, int]
    code: str


class CacheStorage(Protocol):
    """The operations a cache's storage supplies (arrays: NumPy arrays or torch tensors)."""

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """Zeros of ``shape``, stored as ``dtype`` (a NumPy dtype names the storage type)."""

    def index(self, positions: np.ndarray) -> Any:
        """An integer or boolean NumPy index, as this storage indexes with it."""

    def cat(self, parts: list[Any]) -> Any:
        """``parts`` ``(heads, n_i, dim)`` joined along the tokens."""

    def foreign(self, *xs: Any) -> bool:
        """Whether inputs among ``xs`` are of a kind this storage does not take directly (the
        cache then runs the call on NumPy views of them)."""

    def convert(self, name: str, x: Any) -> Any:
        """A caller's input as this storage's array kind (raising ``TypeError`` for what is not
        an array)."""

    def check_out(self, out: Any, shape: tuple[int, ...], q: Any, held: tuple[Any, ...]) -> None:
        """Raise unless ``out`` can take a result of ``shape`` for ``q``; ``held`` are the
        cache's own arrays, which ``out`` must not overlap."""

    def check_terms(self, shape4: tuple[int, int, int, int], terms: dict[str, Any]) -> None:
        """Raise unless the score terms (``alibi_slopes``, ``sinks``, ``rel_bias``) fit
        queries of ``shape4`` ``(B, Hq, T, ·)``: what :meth:`run` will be given, checked
        before a step stores anything."""

    def encode(self, x: Any, code: str, dtype: np.dtype) -> tuple[Any, Any | None]:
        """New tokens in the storage type ``code``/``dtype``: ``(data, int8 scales or None)``."""

    def decode(self, data: Any, scales: Any | None) -> Any:
        """Stored tokens as floats (int8 times its scales; anything else as it is)."""

    def run(
        self, query: CacheQuery, q: Any, k: Any, v: Any, scales: tuple[Any, Any] | None, out: Any
    ) -> Any:
        """Attention of ``q`` over ``k``/``v`` (int8 with ``scales``) as ``query`` says.
        Returns the result (``out`` when given, already checked)."""


# Where a cache array starts: on a huge-page boundary once it is large enough for NumPy to
# ask the kernel for huge pages (4 MiB), on a page boundary otherwise. NumPy's own arrays
# start 16 bytes past a page, so every 64-byte vector load of a row spans two cache lines;
# decoding over such rows measured 2-5% slower than over aligned ones
# (docs/performance.md, "Page-aligned cache arrays").
_HUGE_ALIGN, _PAGE_ALIGN, _HUGE_FROM = 2 << 20, 4096, 4 << 20


def _aligned_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros of ``shape`` and ``dtype``, their first byte on a page or huge-page boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    align = _HUGE_ALIGN if nbytes >= _HUGE_FROM else _PAGE_ALIGN
    # The pages of the unused head are never written, so they are never given memory.
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (last axis): ``x ≈ q · scale``, ``scale = max |x| / 127``,
    rounded half to even."""
    if x.dtype != np.float32 or not (x.flags.c_contiguous and x.flags.aligned):
        x = aligned_copy("k and v (as float32, for int8 storage)", x, np.float32)
    q, scale = _ferroattn.quantize_int8(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def encode_numpy(x: np.ndarray, code: str, dtype: np.dtype) -> tuple[np.ndarray, Any]:
    """New tokens in the NumPy storage type (a function: the cache's decoding path calls it
    directly, without a storage object in between)."""
    if code == "int8":
        return quantize_rows(x)
    return np.asarray(x).astype(dtype, copy=False), None


class NumpyStorage:
    """NumPy arrays on page boundaries, read in place by the Rust kernels.

    Takes NumPy arrays (and what converts to them); torch tensors given to such a cache are
    :meth:`foreign`: the cache runs the call on NumPy views of their memory.
    """

    zeros = staticmethod(_aligned_zeros)

    @staticmethod
    def index(positions: np.ndarray) -> np.ndarray:
        return positions

    @staticmethod
    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=1)

    foreign = staticmethod(tensor_among)
    convert = staticmethod(as_array)

    @staticmethod
    def check_out(
        out: Any, shape: tuple[int, ...], q: np.ndarray, held: tuple[np.ndarray, ...]
    ) -> None:
        check_out(out, shape, q.dtype, [q])
        if any(np.may_share_memory(out, a) for a in held):
            raise ValueError("out must not share memory with the cache's storage")

    @staticmethod
    def check_terms(shape4: tuple[int, int, int, int], terms: dict[str, Any]) -> None:
        normalize_variants(shape4=shape4, ndim=4, **terms)

    encode = staticmethod(encode_numpy)

    @staticmethod
    def decode(data: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        if scales is None:
            return data
        return data.astype(np.float32) * scales[..., None]

    @staticmethod
    def run(
        query: CacheQuery,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        scales: tuple[np.ndarray, np.ndarray] | None,
        out: np.ndarray | None,
        return_lse: bool = False,
    ) -> Any:
        """Attention as ``query`` says (see :meth:`CacheStorage.run`); with ``return_lse``,
        ``(result, lse)``, the lse float32 ``(B, H, T)`` and ``-inf`` on the rows no sequence
        names (they saw no key, as their zero output says)."""
        shape = query.shape
        result_dtype = q.dtype
        qk = kernel_ready("q", q)
        if out is None:
            result = zeros("the output of q", shape, result_dtype)
        else:  # checked by the cache (`check_out`) before anything was stored
            result = out
            result[...] = 0
        direct = (
            dtype_code(result) == dtype_code(qk)
            and result.flags.c_contiguous
            and result.flags.aligned
        )
        target = result if direct else zeros("out (a float32 buffer for it)", shape, qk.dtype)
        shape4 = (shape[0], q.shape[1], q.shape[2], k.shape[2])
        variants = normalize_variants(shape4=shape4, ndim=4, **query.terms)
        if scales is None:
            encoding = KVEncoding(query.code)
        else:
            encoding = KVEncoding(query.code, scales[0][..., None], scales[1][..., None])
        opts = query.opts
        if query.sink_keys:
            opts = dataclasses.replace(opts, sink_keys=query.sink_keys)
        lse = _ferroattn.attention(
            qk,
            k,
            v,
            target,
            qk.dtype.name,
            opts,
            sequences=Sequences(explicit=query.seqs),
            variants=variants,
            kv_encoding=encoding,
            return_lse=return_lse,
        )
        if not direct:
            result[...] = target
        if lse is None:
            return result
        # The kernel leaves the lse of rows no sequence names at 0; they saw no key.
        named = np.zeros((shape[0], shape[2]), dtype=bool)
        for b, q0, q_len, _, _ in query.seqs:
            named[b, q0 : q0 + q_len] = True
        lse = lse.reshape(shape[:3])
        return result, np.where(named[:, None, :], lse, np.float32(-np.inf))


def attend_sequences(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    seqs: list[tuple[int, int, int, int, int]],
    *,
    scales: tuple[np.ndarray, np.ndarray] | None = None,
    causal: bool = False,
    window: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Any = None,
    out: np.ndarray | None = None,
    precision: Precision | None = None,
    return_lse: bool = False,
) -> Any:
    """Attention over ``(B, H, N, D)`` NumPy arrays as explicit sequences pair their rows.

    For callers that keep positions themselves (a cache of another library, a ring buffer read
    in place, a shard of a longer cache): ``seqs`` lists ``(b, q0, q_len, k0, k_len)``, queries
    ``q0 : q0 + q_len`` of batch ``b`` over keys ``k0 : k0 + k_len``, causal (bottom-right) and
    ``window`` (an int or a ``(left, right)`` pair, as :func:`ferroattn.attention` takes it)
    counted inside that range; rows no entry names are zeros. ``k``/``v`` are float arrays the
    kernels read (float32, float16, bfloat16) or int8 with ``scales`` ``(B, Hkv, N)``; ``out``
    ``(B, H, Nq, Dv)`` of q's dtype; ``precision`` as in :func:`ferroattn.attention`, but
    ``"highest"`` when not given (the process-wide setting does not apply here). With
    ``return_lse``: ``(out, lse)``, the lse float32 ``(B, H, Nq)``, ``-inf`` on rows that saw
    no key (those no entry names included), ready for :func:`ferroattn.merge_partials`.
    """
    shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    opts = mask_options(
        head_dim=q.shape[3],
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        # Float32 products unless asked, as before it took `precision`: the process-wide
        # setting is for the public functions, and the transformers integration calls this.
        precision="highest" if precision is None else check_precision(precision),
    )
    if out is not None:
        check_out(out, shape, q.dtype, [q, k, v])
    code = "int8" if scales is not None else dtype_code(k)
    if code is None:
        raise TypeError(f"k must be float32, float16, bfloat16 or int8, got {k.dtype}")
    terms = {} if sinks is None else {"sinks": sinks}
    query = CacheQuery(list(seqs), 0, opts, terms, shape, code)
    return NumpyStorage.run(query, q, k, v, scales, out, return_lse=return_lse)
