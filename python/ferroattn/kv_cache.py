"""A key/value cache for autoregressive decoding.

Keys and values live in preallocated ``(batch, kv_heads, slots, dim)`` arrays in float32,
float16, bfloat16 or int8 (with a float32 scale per token and head); attention reads them in
place, converting inside the kernel. Each sequence of the batch has its own length, so one cache
serves a ragged batch (continuous batching), and a slot can be reset and reused.

A sliding-window cache (``window=w``) keeps only the last ``w`` tokens (plus ``max_rollback``
spare ones) in a ring buffer, and optionally the first ``sinks`` tokens for good (StreamingLLM):
memory ``O(w)``, results identical to sliding-window attention over the whole history with the
sink tokens kept as keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _ferroattn
from ._args import (
    NATIVE_CODES,
    MaskOptions,
    Sequences,
    check_dtypes,
    mask_options,
    valid_counts,
)
from ._cache_storage import (
    CacheQuery,
    CacheStorage,
    KVEncoding,
    NumpyStorage,
    attend_sequences,
    encode_numpy,
)
from ._dispatch import cache_storage, on_tensor_views
from ._memory import allocating, nbytes, zeros
from .precision import Precision, check_precision

__all__ = ["KVCache"]

_STORAGE = ("float32", "float16", "bfloat16", "int8")


def _count(name: str, value: Any, lo: int = 0) -> int:
    """A size argument of the constructor: an int of at least ``lo``, refused by name."""
    if not isinstance(value, (int, np.integer)) or value < lo:
        kind = "a positive int" if lo == 1 else f"an int >= {lo}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _storage_dtype(dtype: Any) -> tuple[str, np.dtype]:
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError as e:
        raise TypeError(f"dtype must be one of {', '.join(_STORAGE)}, got {dtype!r}") from e
    if name not in _STORAGE:
        raise TypeError(f"dtype must be one of {', '.join(_STORAGE)}, got {dtype!r}")
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TypeError("a bfloat16 cache needs the ml_dtypes package") from e
        return name, np.dtype(ml_dtypes.bfloat16)
    return name, np.dtype(name)


@dataclass(frozen=True)
class _ScoreTerms:
    """Score terms a cache call may add (see :func:`ferroattn.attention`)."""

    alibi_slopes: Any = None
    sinks: Any = None
    rel_bias: Any = None

    def positional(self) -> bool:
        return self.alibi_slopes is not None or self.rel_bias is not None

    def kwargs(self) -> dict[str, Any]:
        return {"alibi_slopes": self.alibi_slopes, "sinks": self.sinks, "rel_bias": self.rel_bias}


_NUMPY_STORAGE = NumpyStorage()


class KVCache:
    """Preallocated keys and values of one attention layer, for a batch of sequences.

    Args:
        batch: number of sequences (slots).
        kv_heads: key/value heads.
        head_dim: dimension of keys (and of values unless ``value_dim`` is given).
        capacity: tokens each sequence can hold (not needed with ``window``).
        dtype: storage: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"int8"`` (symmetric,
            one float32 scale per token and head, quantized on append; on AVX-512 CPUs with
            VNNI the kernel takes integer dot products of int8 keys with queries rounded to
            16 bits, and of int8 values with attention probabilities rounded to 16 bits, each
            adding ~1e-5 to ~1e-4 relative error to the ~1e-2 of the int8 storage).
        value_dim: dimension of values, default ``head_dim``.
        window: keep only what a sliding window of ``window`` tokens sees (the token itself and
            the ``window - 1`` before it), in a ring buffer.
        sinks: with ``window``: also keep the first ``sinks`` tokens of each sequence as keys.
        max_rollback: with ``window``: spare ring slots, so :meth:`rollback` can undo that many
            tokens (speculative decoding).
        device: ``None`` or ``"cpu"`` (default): NumPy storage read by the Rust kernels; the
            methods take NumPy arrays or CPU torch tensors (read in place) and return the kind
            they were given. A torch device (``"cuda"``, ``torch.device("cuda:1")``, ...): the
            storage is torch tensors on that device and attention runs there through torch;
            inputs are tensors (moved to the device if needed) and results are tensors on it.
        backend: ``"auto"`` (default): the storage follows ``device`` as above. ``"torch"``:
            torch tensors computed by torch, on ``device`` (the CPU when it is left out), as
            :func:`ferroattn.attention`'s ``backend="torch"``. ``"cpu"``: NumPy storage read by
            the Rust kernels (``device`` must then be the CPU). :attr:`backend` says which the
            cache has.

    Appending past ``capacity`` raises ``ValueError``. Every call is all or nothing: all its
    arguments are checked before anything is stored, and a call that fails (out of memory
    included) leaves lengths, keys and values as they were. Sizes are ints (``batch``,
    ``kv_heads``, ``head_dim``, ``value_dim``, ``capacity``, ``window`` at least 1; ``sinks``,
    ``max_rollback`` at least 0); storage too large to allocate raises ``MemoryError`` naming
    them. Queries with zero heads give an empty result (``step`` still stores its keys and
    values: it is an append and an attend). Misaligned inputs are copied.

    Example:
        >>> import numpy as np, ferroattn
        >>> cache = ferroattn.KVCache(1, 2, 16, capacity=64)
        >>> rng = np.random.default_rng(0)
        >>> k, v = rng.standard_normal((2, 1, 2, 5, 16), dtype=np.float32)
        >>> q = rng.standard_normal((1, 4, 5, 16), dtype=np.float32)
        >>> cache.step(q, k, v).shape      # prefill 5 tokens, 4 query heads over 2 KV heads
        (1, 4, 5, 16)
        >>> int(cache.lengths[0])
        5
    """

    _store: CacheStorage

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int | None = None,
        *,
        dtype: Any = "float32",
        value_dim: int | None = None,
        window: int | None = None,
        sinks: int = 0,
        max_rollback: int = 0,
        device: Any = None,
        backend: Literal["auto", "cpu", "torch"] = "auto",
    ) -> None:
        # Every argument is checked before anything is allocated.
        self.batch, self.kv_heads = _count("batch", batch, 1), _count("kv_heads", kv_heads, 1)
        self.head_dim = _count("head_dim", head_dim, 1)
        self.value_dim = self.head_dim if value_dim is None else _count("value_dim", value_dim, 1)
        self.sinks, self.max_rollback = _count("sinks", sinks), _count("max_rollback", max_rollback)
        if window is not None:
            _count("window", window, 1)
            ring = int(window) + self.max_rollback
            slots = self.sinks + ring
            sizes = f"window={window}, sinks={sinks}, max_rollback={max_rollback}"
        else:
            if self.sinks or self.max_rollback:
                raise ValueError("sinks and max_rollback only apply to a window cache")
            slots = _count("capacity", capacity, 1)
            ring = 0
            sizes = f"capacity={capacity}"
        self.window = window
        self._ring = ring
        self._code, self._dtype = _storage_dtype(dtype)
        on_device = cache_storage(device, backend)
        self._store = _NUMPY_STORAGE if on_device is None else on_device
        self.capacity = slots if window is None else None
        self.device = device
        shape_k = (self.batch, self.kv_heads, slots, self.head_dim)
        shape_v = (self.batch, self.kv_heads, slots, self.value_dim)
        scales = self._code == "int8"
        total = nbytes(shape_k, self._dtype) + nbytes(shape_v, self._dtype)
        total += 2 * nbytes(shape_k[:3], np.float32) if scales else 0
        what = (
            f"the storage of KVCache(batch={batch}, kv_heads={kv_heads}, head_dim={head_dim}, "
            f"value_dim={self.value_dim}, {sizes}, dtype={self._code!r})"
        )
        with allocating(what, total):
            store = self._store
            self._k = store.zeros(shape_k, self._dtype)
            self._v = store.zeros(shape_v, self._dtype)
            if scales:
                self._ks = store.zeros(shape_k[:3], np.dtype(np.float32))
                self._vs = store.zeros(shape_v[:3], np.dtype(np.float32))
            self._len = np.zeros(self.batch, dtype=np.int64)
            # Window caches: per sequence, the oldest position the ring still holds (rolled-back
            # tokens stay in the slots of older positions, which are then gone): see `_stored`.
            self._oldest = np.zeros(self.batch, dtype=np.int64)
        # Decoding calls the same few options every step: see `_plain_call`. The kernels read
        # NumPy storage directly, so only it has that path.
        self._plain = isinstance(self._store, NumpyStorage) and window is None
        self._plain_opts: dict[tuple[Any, Any, str], tuple[MaskOptions, KVEncoding]] = {}

    # ----------------------------------------------------------------- facts

    @property
    def lengths(self) -> np.ndarray:
        """Tokens seen by each sequence (the position of its next token); a copy."""
        return self._len.copy()

    @property
    def backend(self) -> str:
        """``"cpu"`` (NumPy storage, the Rust kernels) or ``"torch"`` (torch tensors, torch)."""
        return "cpu" if isinstance(self._store, NumpyStorage) else "torch"

    @property
    def dtype(self) -> str:
        """Storage type name."""
        return self._code

    @property
    def nbytes(self) -> int:
        """Bytes of storage (keys, values and int8 scales)."""
        total = self._k.nbytes + self._v.nbytes
        if self._code == "int8":
            total += self._ks.nbytes + self._vs.nbytes
        return int(total)

    def __repr__(self) -> str:
        extra = f", window={self.window}, sinks={self.sinks}" if self.window else ""
        return (
            f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"capacity={self.capacity}, dtype={self._code!r}{extra}, lengths={self._len.tolist()})"
        )

    # ------------------------------------------------------------- positions

    def _slot(self, pos: np.ndarray) -> np.ndarray:
        """Storage slot of each position (ring buffer past the sinks for window caches)."""
        if self.window is None:
            return pos
        s = self.sinks
        return np.where(pos < s, pos, s + (pos - s) % self._ring)

    def _stored(self, b: int) -> np.ndarray:
        """Positions of sequence ``b`` still in storage, in order."""
        n = int(self._len[b])
        if self.window is None:
            return np.arange(n)
        s = self.sinks
        return np.concatenate([np.arange(min(n, s)), np.arange(self._first_held(b), n)])

    def _first_held(self, b: int) -> int:
        """The oldest position past the sinks that sequence ``b``'s ring still holds: the
        ring keeps the last ``ring`` positions, less those whose slots a rolled-back token
        took (``_oldest``); every position from it up to the length is held."""
        return max(self.sinks, int(self._len[b]) - self._ring, int(self._oldest[b]))

    def _valid_counts(self, lengths: Any, t: int) -> np.ndarray:
        return valid_counts(lengths, self.batch, t)

    # ---------------------------------------------------------------- writes

    def _check_kv(self, k: Any, v: Any) -> tuple[Any, Any]:
        k, v = self._store.convert("k", k), self._store.convert("v", v)
        check_dtypes({"k": k, "v": v})
        for name, arr, dim in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            shape = tuple(arr.shape)
            if len(shape) != 4 or shape[:2] != (self.batch, self.kv_heads) or shape[3] != dim:
                raise ValueError(
                    f"{name} must have shape (batch={self.batch}, kv_heads={self.kv_heads}, "
                    f"tokens, {dim}), got {shape}"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(
                f"k and v hold different numbers of tokens: {tuple(k.shape)} vs {tuple(v.shape)}"
            )
        return k, v

    def _encode(self, x: Any) -> tuple[Any, Any]:
        """New tokens in the storage representation (a converted copy, refused by name when
        it cannot be allocated)."""
        with allocating("k and v (converted to the cache's dtype)"):
            return self._store.encode(x, self._code, self._dtype)

    def _check_room(self, counts: np.ndarray) -> None:
        if self.window is None:
            over = self._len + counts > self.capacity
            if over.any():
                b = int(np.argmax(over))
                raise ValueError(
                    f"appending {int(counts[b])} tokens to sequence {b} (length "
                    f"{int(self._len[b])}) exceeds capacity {self.capacity}"
                )

    def _write(self, enc_k, enc_v, counts: np.ndarray | int) -> None:
        """Stores encoded tokens: ``counts`` per sequence (one int: as many in each)."""
        (qk, sk), (qv, sv) = enc_k, enc_v
        stored: tuple[tuple[np.ndarray, np.ndarray], ...] = ((self._k, qk), (self._v, qv))
        if sk is not None:
            stored += ((self._ks, sk), (self._vs, sv))
        each = counts.tolist() if isinstance(counts, np.ndarray) else [counts] * self.batch
        for b, (start, t) in enumerate(zip(self._len.tolist(), each, strict=True)):
            if t == 0:
                continue
            if self.window is None:
                # Consecutive slots: basic slices, no index arrays built.
                for dst, src in stored:
                    dst[b, :, start : start + t] = src[b, :, :t]
                continue
            pos = np.arange(start, start + t)
            # In a ring only sinks and the last `ring` positions survive; writing just those
            # keeps every slot written once (fancy assignment has no defined order).
            keep = (pos < self.sinks) | (pos >= pos[-1] + 1 - self._ring)
            slots, keep = self._store.index(self._slot(pos[keep])), self._store.index(keep)
            for dst, src in stored:
                dst[b][:, slots] = src[b][:, :t][:, keep]
        self._len += counts

    def append(self, k: Any, v: Any, *, lengths: Any = None) -> None:
        """Append new keys and values.

        Args:
            k: ``(batch, kv_heads, T, head_dim)``.
            v: ``(batch, kv_heads, T, value_dim)``.
            lengths: ``(batch,)`` number of valid new tokens per sequence (right padding of
                ``k``/``v``); default ``T`` for all.
        """
        if lengths is None and self._append_plain(k, v, None):
            return
        if self._store.foreign(k, v):
            return self._on_views(self.append, k, v, lengths=lengths)
        k, v = self._check_kv(k, v)
        counts = self._valid_counts(lengths, k.shape[2])
        self._check_room(counts)
        self._write(self._encode(k), self._encode(v), counts)

    def reset(self, seq: int | None = None) -> None:
        """Empty one sequence slot (or all), to reuse it for a new sequence."""
        if seq is None:
            self._len[:] = 0
            self._oldest[:] = 0
        else:
            b = self._seq_index(seq)
            self._len[b] = 0
            self._oldest[b] = 0

    def rollback(self, n: int, seq: int | None = None) -> None:
        """Drop the last ``n`` tokens of one sequence (or of all), e.g. rejected draft tokens.

        A window cache can roll back only while the tokens the window then needs are still
        stored (``max_rollback + 1`` tokens after a decode step). The rolled-back tokens keep
        their ring slots until overwritten, so the positions those slots held before are gone:
        :meth:`keys`, :meth:`values` and attention never read them.
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        seqs = range(self.batch) if seq is None else [self._seq_index(seq)]
        for b in seqs:
            length = int(self._len[b])
            if n > length:
                raise ValueError(f"cannot roll back n={n} tokens: sequence {b} has {length}")
            if self.window is not None:
                new = length - n
                # The next query (position `new`) needs the window - 1 positions before it.
                oldest_needed = max(self.sinks, new - (self.window - 1))
                if oldest_needed < new and oldest_needed < self._first_held(b):
                    raise ValueError(
                        f"cannot roll back n={n} tokens of sequence {b}: the window would need "
                        f"evicted tokens (create the cache with a larger max_rollback)"
                    )
        for b in seqs:
            if self.window is not None:
                # The dropped tokens keep the slots of positions before them: what the ring
                # holds now starts where it started before the rollback (or at the new
                # length, when that is all gone), not `ring` positions before the new length.
                self._oldest[b] = min(self._first_held(b), int(self._len[b]) - n)
            self._len[b] -= n

    def _seq_index(self, seq: Any) -> int:
        if not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.batch:
            raise ValueError(f"seq must be an int in [0, {self.batch}), got {seq!r}")
        return int(seq)

    # ----------------------------------------------------------------- reads

    def keys(self, seq: int) -> np.ndarray:
        """Keys of sequence ``seq`` still stored, ``(kv_heads, n, head_dim)`` in position order.

        A view into the cache for a float cache without window; a copy otherwise (int8 caches
        return dequantized float32).
        """
        return self._read(self._k, self._ks if self._code == "int8" else None, seq)

    def values(self, seq: int) -> np.ndarray:
        """Values of sequence ``seq``; see :meth:`keys`."""
        return self._read(self._v, self._vs if self._code == "int8" else None, seq)

    def _read(self, data: np.ndarray, scales: np.ndarray | None, seq: int) -> np.ndarray:
        b = self._seq_index(seq)
        if self.window is None:
            n = int(self._len[b])
            return self._store.decode(data[b, :, :n], None if scales is None else scales[b, :, :n])
        slots = self._store.index(self._slot(self._stored(b)))
        return self._store.decode(
            data[b][:, slots], None if scales is None else scales[b][:, slots]
        )

    # ------------------------------------------------------- storage in place
    # For callers that keep positions themselves (the transformers cache of
    # ferroattn.integrations): they read the storage slot by slot, a ring buffer included,
    # rather than through a gathered copy in position order.

    def slot(self, position: int) -> int:
        """The storage slot of ``position`` (past the sinks, a window cache wraps around)."""
        return int(self._slot(np.int64(position)))

    def span(self, start: int, stop: int) -> tuple[Any, Any]:
        """Keys and values of positions ``start:stop`` of every sequence, each
        ``(batch, kv_heads, stop - start, dim)`` in position order.

        Views into the cache for a float cache without window; copies otherwise (int8
        dequantized to float32). Every sequence must still hold those positions.
        """
        if not 0 <= start <= stop <= int(self._len.min()):
            raise ValueError(
                f"positions {start}:{stop} are not stored for every sequence "
                f"(lengths {self._len.tolist()})"
            )
        int8 = self._code == "int8"
        if self.window is None:
            pick: Any = slice(start, stop)
        else:
            evicted = [
                b
                for b in range(self.batch)
                if stop > self.sinks and max(start, self.sinks) < self._first_held(b)
            ]
            if evicted:
                raise ValueError(
                    f"positions {start}:{stop} left the window of sequence {evicted[0]}"
                )
            pick = self._store.index(self._slot(np.arange(start, stop)))
        k, v = self._k[:, :, pick], self._v[:, :, pick]
        if not int8:
            return k, v
        return (
            self._store.decode(k, self._ks[:, :, pick]),
            self._store.decode(v, self._vs[:, :, pick]),
        )

    def attend_slots(
        self, q: np.ndarray, seqs: list[tuple[int, int, int, int, int]], **options: Any
    ) -> Any:
        """Attention of ``q`` ``(batch, heads, T, head_dim)`` over the storage as it lies, by
        slot: ``seqs`` lists ``(b, q0, q_len, k0, k_len)``, queries ``q0 : q0 + q_len`` of
        sequence ``b`` over slots ``k0 : k0 + k_len`` (see :meth:`slot`). ``options``
        (``causal``, ``window``, ``scale``, ``softcap``, ``sinks``, ``out``, ``precision``,
        ``return_lse``) as in ``_cache_storage.attend_sequences``: causal and window count
        positions inside each slot range; ``return_lse=True`` returns ``(out, lse)``. The
        stored lengths are not consulted: the caller says which slots hold what. NumPy arrays,
        a cache with NumPy storage only.
        """
        if not isinstance(self._store, NumpyStorage):
            raise ValueError("attend_slots reads NumPy storage (a cache with backend 'cpu')")
        return attend_sequences(q, self._k, self._v, seqs, scales=self._scales(), **options)

    def reorder(self, index: Any) -> None:
        """Put sequence ``index[i]`` in slot ``i`` for every ``i`` (beam search keeps its best
        beams this way); ``index`` holds ``batch`` ints in ``[0, batch)``, repeats allowed."""
        idx = np.asarray(index)
        if idx.shape != (self.batch,) or idx.dtype.kind not in "iu":
            raise ValueError(f"index must be {self.batch} ints, got {idx.shape} {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.batch):
            raise ValueError(f"index must lie in [0, {self.batch}), got {idx.tolist()}")
        pick = self._store.index(idx.astype(np.int64))
        for a in self._storage():
            a[...] = a[pick]
        self._len = self._len[idx]
        self._oldest = self._oldest[idx]

    # ------------------------------------------------------------- attention

    def attend(
        self,
        q: Any,
        *,
        lengths: Any = None,
        scale: float | None = None,
        softcap: float | None = None,
        out: np.ndarray | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        rel_bias: Any = None,
        precision: Precision | None = None,
    ) -> np.ndarray:
        """Attention of the queries of the last appended tokens over everything cached.

        Args:
            q: ``(batch, heads, T, head_dim)``, ``heads`` a multiple of ``kv_heads``: query
                ``i`` of sequence ``b`` belongs to position ``length_b − t_b + i``
                (bottom-right causal, as for decoding).
            lengths: ``(batch,)`` valid queries per sequence (``t_b``; default ``T``); rows past
                it come back as zeros. A window cache answers at most ``max_rollback + 1``
                queries per sequence, and only while it holds every key they see.
            scale, softcap: as in :func:`ferroattn.attention`.
            alibi_slopes, sinks, rel_bias: as in :func:`ferroattn.attention`, with positions
                counted over the whole history (not available with ``sinks`` tokens of a
                window cache, whose positions are not contiguous in storage).
            out: optional output array ``(batch, heads, T, value_dim)`` of q's dtype.
            precision: as in :func:`ferroattn.attention` (bfloat16 products on prefill
                chunks; decode steps of a few query rows compute in float32).

        Returns:
            ``(batch, heads, T, value_dim)`` in q's dtype.
        """
        if lengths is alibi_slopes is sinks is rel_bias is None:
            plain = self._plain_call(q, scale, softcap, check_precision(precision))
            if plain is not None and self._plain_out(out, q):
                return self._attend_plain(q, *plain, out)
        if self._store.foreign(q, out):
            return self._on_views(
                self.attend,
                q,
                out=out,
                lengths=lengths,
                scale=scale,
                softcap=softcap,
                alibi_slopes=alibi_slopes,
                sinks=sinks,
                rel_bias=rel_bias,
                precision=precision,
            )
        q = self._check_q(q)
        self._check_out(out, q)
        counts = self._valid_counts(lengths, q.shape[2])
        terms = _ScoreTerms(alibi_slopes, sinks, rel_bias)
        opts = self._options(q, scale, softcap, terms, check_precision(precision))
        if self.window is not None:
            self._check_window_queries(counts)
            gathered = [self._gather(b, int(counts[b]), None) for b in range(self.batch)]
            return self._attend_gathered(q, counts, gathered, opts, out, terms)
        return self._attend_stored(q, counts, opts, out, terms)

    def _attend_stored(self, q: Any, counts: np.ndarray, opts: Any, out: Any, terms: Any) -> Any:
        """Attention of a cache without window: the last ``counts[b]`` positions of each
        sequence over everything it holds."""
        seqs = [
            (b, 0, int(counts[b]), 0, int(self._len[b])) for b in range(self.batch) if counts[b] > 0
        ]
        return self._run(q, self._k, self._v, self._scales(), seqs, 0, opts, out, terms)

    def _options(
        self, q: Any, scale: Any, softcap: Any, terms: _ScoreTerms, precision: str = "highest"
    ) -> MaskOptions:
        """Checks ``scale``, ``softcap`` and the score terms for queries ``q`` (before a step
        stores anything); returns the kernels' mask options."""
        window = None if self.window is None else (self.window - 1, 0)
        opts = mask_options(
            head_dim=self.head_dim,
            causal=True,
            window=window,
            scale=scale,
            softcap=softcap,
            precision=precision,
        )
        if self.sinks and terms.positional():
            raise ValueError(
                "alibi_slopes and rel_bias need contiguous positions: not available with the "
                "sinks of a window cache"
            )
        self._store.check_terms((self.batch, q.shape[1], q.shape[2], 1), terms.kwargs())
        return opts

    def _check_window_queries(self, counts: np.ndarray) -> None:
        """A window cache answers the queries of the last tokens only while the ring holds
        every key their windows reach: at most ``max_rollback + 1`` of them, and none whose
        window reaches a position a rollback gave away."""
        assert self.window is not None
        slack = self._ring - (self.window - 1)
        if np.any(counts > slack):
            raise ValueError(
                f"a window cache can attend at most {slack} queries after append(); "
                "use step(q, k, v) to process longer chunks"
            )
        for b, (c, n) in enumerate(zip(counts.tolist(), self._len.tolist(), strict=True)):
            needed = max(self.sinks, n - c - (self.window - 1))
            if needed < n and needed < self._first_held(b):
                raise ValueError(
                    f"q: the {c} last queries of sequence {b} would see position {needed}, "
                    "which a rollback gave away; attend fewer queries or use step(q, k, v)"
                )

    def step(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        lengths: Any = None,
        scale: float | None = None,
        softcap: float | None = None,
        out: np.ndarray | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        rel_bias: Any = None,
        precision: Precision | None = None,
    ) -> np.ndarray:
        """Append ``k``/``v`` and attend with ``q`` (flash-attn's ``flash_attn_with_kvcache``).

        Shapes as in :meth:`append` and :meth:`attend`; ``T`` may be one token (decoding) or a
        chunk (prefill). Returns ``(batch, heads, T, value_dim)`` in q's dtype (a torch tensor
        for tensor inputs). ``precision``: as in :meth:`attend`.
        """
        if lengths is alibi_slopes is sinks is rel_bias is None:
            plain = self._plain_call(q, scale, softcap, check_precision(precision))
            if (
                plain is not None
                and self._plain_out(out, q)
                and self._append_plain(k, v, q.shape[2])
            ):
                try:
                    return self._attend_plain(q, *plain, out)
                except BaseException:
                    self._len -= q.shape[2]  # all or nothing, as on the general path
                    raise
        if self._store.foreign(q, k, v, out):
            return self._on_views(
                self.step,
                q,
                k,
                v,
                out=out,
                lengths=lengths,
                scale=scale,
                softcap=softcap,
                alibi_slopes=alibi_slopes,
                sinks=sinks,
                rel_bias=rel_bias,
                precision=precision,
            )
        k, v = self._check_kv(k, v)
        q = self._check_q(q)
        # Checked before anything is stored: a call that fails leaves the cache as it was.
        self._check_out(out, q)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q and k hold different numbers of tokens: {q.shape} vs {k.shape}")
        counts = self._valid_counts(lengths, k.shape[2])
        self._check_room(counts)
        terms = _ScoreTerms(alibi_slopes, sinks, rel_bias)
        opts = self._options(q, scale, softcap, terms, check_precision(precision))
        # Every argument is checked: from here on the call stores its tokens and attends, and
        # a failure (out of memory) leaves the cache as it was.
        enc_k, enc_v = self._encode(k), self._encode(v)
        if self.window is None:
            self._write(enc_k, enc_v, counts)
            try:
                return self._attend_stored(q, counts, opts, out, terms)
            except BaseException:
                self._len -= counts  # what was written lies past the lengths again: unseen
                raise
        # The ring may not hold a whole chunk: attend over old ring + new tokens, then store.
        with allocating("k and v (the keys the window of their queries sees)"):
            gathered = [
                self._gather(b, 0, (enc_k, enc_v, int(counts[b]))) for b in range(self.batch)
            ]
        result = self._attend_gathered(q, counts, gathered, opts, out, terms)
        self._write(enc_k, enc_v, counts)
        return result

    # -------------------------------------------------------- decoding path
    # A decode step calls attend/step with the same plain arguments every token. After the
    # rest of a model has run, little of the general path's Python is still in the CPU
    # caches, and its cost then rivals the kernel's on a 4k-token step. These methods take
    # only the common case (NumPy inputs in a native float dtype, no window, lengths or score
    # terms, no out or one ready to write) with a handful of checks, and say "not mine"
    # (None/False, nothing changed) for everything else, which the general path then
    # validates and runs.

    def _plain_call(
        self, q: Any, scale: Any, softcap: Any, precision: str = "highest"
    ) -> tuple[str, tuple[MaskOptions, KVEncoding]] | None:
        """q's kernel dtype and the binding's options when the plain path takes this call."""
        if not self._plain or type(q) is not np.ndarray or q.ndim != 4:
            return None
        code = NATIVE_CODES.get(q.dtype)
        b, h, t, d = q.shape
        if (
            code is None
            or b != self.batch
            or d != self.head_dim
            or h % self.kv_heads
            or t == 0
            or q.strides[3] != q.itemsize
            or not q.flags.aligned
        ):
            return None
        numbers = (float, np.floating, type(None))
        if not isinstance(scale, numbers) or not isinstance(softcap, numbers):
            return None  # the general path converts (and reports) other kinds
        key = (scale, softcap, precision)
        opts = self._plain_opts.get(key)
        if opts is None:
            mask = mask_options(
                head_dim=self.head_dim,
                causal=True,
                window=None,
                scale=scale,
                softcap=softcap,
                precision=precision,
            )
            if self._code == "int8":
                encoding = KVEncoding(self._code, self._ks[..., None], self._vs[..., None])
            else:
                encoding = KVEncoding(self._code)
            opts = (mask, encoding)
            if len(self._plain_opts) >= 8:  # a caller that varies the scale every call
                self._plain_opts.clear()
            self._plain_opts[key] = opts
        return code, opts

    def _plain_out(self, out: Any, q: np.ndarray) -> bool:
        """Whether the plain path can write into ``out`` as it is (None: it makes its own);
        anything else goes to the general path, which validates and reports."""
        return out is None or (
            type(out) is np.ndarray
            and out.dtype == q.dtype
            and out.shape == self._result_shape(q)
            and out.flags.c_contiguous
            and out.flags.aligned
            and out.flags.writeable
            and not any(np.may_share_memory(out, a) for a in (q, *self._storage()))
        )

    def _attend_plain(
        self,
        q: np.ndarray,
        code: str,
        opts: tuple[MaskOptions, KVEncoding],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        if out is None:
            try:
                result = np.zeros(self._result_shape(q), dtype=q.dtype)
            except (MemoryError, ValueError):  # q is a huge broadcast: report it by name
                result = zeros("the output of q", self._result_shape(q), q.dtype)
        else:
            result = out
            result.fill(0)
        # Every query of sequence b sees its first lengths[b] keys: right padding.
        sequences = Sequences(self._len.tolist())  # kv_lengths, its first field
        mask, encoding = opts
        _ferroattn.attention(
            q, self._k, self._v, result, code, mask, sequences=sequences, kv_encoding=encoding
        )
        return result

    def _append_plain(self, k: Any, v: Any, t: int | None) -> bool:
        """Appends ``t`` tokens (any number when None) to every sequence when the plain path
        takes these inputs and they fit; False, with nothing written, otherwise."""
        if not self._plain or type(k) is not np.ndarray or type(v) is not np.ndarray:
            return False
        if k.dtype not in NATIVE_CODES or v.dtype != k.dtype or k.ndim != 4:
            return False
        n = k.shape[2]
        if (
            (t is not None and n != t)
            or k.shape != (self.batch, self.kv_heads, n, self.head_dim)
            or v.shape != (self.batch, self.kv_heads, n, self.value_dim)
        ):
            return False
        if int(self._len.max()) + n > self.capacity:
            return False
        # Straight to the NumPy encoding (the storage is NumPy here): no call in between.
        self._write(
            encode_numpy(k, self._code, self._dtype), encode_numpy(v, self._code, self._dtype), n
        )
        return True

    # --------------------------------------------------------------- helpers

    def _on_views(self, method: Any, *arrays: Any, **kwargs: Any) -> Any:
        """Run ``method`` on NumPy views of CPU tensors; return tensors (writing ``out``)."""
        return on_tensor_views(method, *arrays, copy_from_device=False, **kwargs)

    def _check_out(self, out: Any, q: Any) -> None:
        """Raises, before anything is written, when ``out`` cannot take the result for ``q``:
        wrong kind, dtype (q's) or shape, read-only, or sharing memory with q or the cache."""
        if out is not None:
            self._store.check_out(out, self._result_shape(q), q, self._storage())

    def _result_shape(self, q: Any) -> tuple[int, int, int, int]:
        """``(batch, heads, T, value_dim)``: the result of attending with ``q``."""
        return (self.batch, q.shape[1], q.shape[2], self.value_dim)

    def _storage(self) -> tuple[Any, ...]:
        """The arrays the cache keeps: keys, values and, for int8, their scales."""
        return (self._k, self._v) + ((self._ks, self._vs) if self._code == "int8" else ())

    def _check_q(self, q: Any) -> Any:
        q = self._store.convert("q", q)
        check_dtypes({"q": q})
        shape = tuple(q.shape)
        if (
            len(shape) != 4
            or shape[0] != self.batch
            or shape[3] != self.head_dim
            or shape[1] % self.kv_heads
        ):
            raise ValueError(
                f"q must have shape (batch={self.batch}, heads (a multiple of "
                f"{self.kv_heads}), tokens, {self.head_dim}), got {shape}"
            )
        return q

    def _scales(self) -> tuple[Any, Any] | None:
        if self._code != "int8":
            return None
        return self._ks, self._vs

    def _gather(self, b: int, t: int, new: Any) -> tuple:
        """Keys/values sequence ``b``'s last queries need, as contiguous arrays in position
        order: ``[sinks | window part | new tokens]``, with their int8 scales (or None).

        Indices ``< sinks`` are the sink tokens and the rest are consecutive positions, so the
        kernel's causal + window mask with ``sink_keys = sinks`` is exactly the cache's rule.
        """
        length = int(self._len[b])
        if new is not None:
            (qk, sk), (qv, sv), t = new[0], new[1], new[2]
            first_query = length
        else:
            first_query = length - t
        end = length  # stored positions end here; new tokens (if any) follow
        sinks = min(end, self.sinks)
        assert self.window is not None  # only window caches gather
        lo = max(self.sinks, first_query - (self.window - 1))
        pos = np.concatenate([np.arange(sinks), np.arange(lo, end)]).astype(np.int64)
        slots = self._store.index(self._slot(pos))
        parts_k, parts_v = [self._k[b][:, slots]], [self._v[b][:, slots]]
        int8 = self._code == "int8"
        parts_sk = [self._ks[b][:, slots]] if int8 else []
        parts_sv = [self._vs[b][:, slots]] if int8 else []
        if new is not None and t:
            parts_k.append(qk[b][:, :t])
            parts_v.append(qv[b][:, :t])
            if int8:
                parts_sk.append(sk[b][:, :t])
                parts_sv.append(sv[b][:, :t])
        cat = self._store.cat
        gk, gv = cat(parts_k), cat(parts_v)
        if not int8:
            return gk, gv, None, None
        return gk, gv, cat(parts_sk), cat(parts_sv)

    def _attend_gathered(self, q, counts, gathered, opts, out, terms) -> Any:
        """One kernel call over the per-sequence gathered keys, padded into one array."""
        n = max((g[0].shape[1] for g in gathered), default=0)
        shape_k = (self.batch, self.kv_heads, n, self.head_dim)
        shape_v = (self.batch, self.kv_heads, n, self.value_dim)
        with allocating("q, k and v (the keys their window sees)"):
            k = self._store.zeros(shape_k, self._dtype)
            v = self._store.zeros(shape_v, self._dtype)
            scales = None
            if self._code == "int8":
                f32 = np.dtype(np.float32)
                scales = (self._store.zeros(shape_k[:3], f32), self._store.zeros(shape_v[:3], f32))
        seqs = []
        for b, (gk, gv, sk, sv) in enumerate(gathered):
            m = gk.shape[1]
            k[b, :, :m], v[b, :, :m] = gk, gv
            if scales is not None:
                scales[0][b, :, :m], scales[1][b, :, :m] = sk, sv
            if counts[b] > 0:
                seqs.append((b, 0, int(counts[b]), 0, m))
        return self._run(q, k, v, scales, seqs, self.sinks, opts, out, terms)

    def _run(self, q, k, v, scales, seqs, sink_keys, opts, out, terms):
        """Attention over ``k``/``v`` as ``seqs`` pair them with ``q`` (see
        ``CacheStorage.run``) with the mask options ``opts`` (from :meth:`_options`)."""
        query = CacheQuery(seqs, sink_keys, opts, terms.kwargs(), self._result_shape(q), self._code)
        return self._store.run(query, q, k, v, scales, out)
