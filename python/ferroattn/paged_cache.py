"""A paged key/value cache: fixed-size blocks from one pool, shared between sequences.

Where :class:`ferroattn.KVCache` gives every sequence a slot of ``capacity`` tokens, a
:class:`PagedKVCache` hands out blocks of ``block_size`` tokens as sequences grow (a free
list), so memory follows the tokens actually held and any number of sequences of any lengths
share one pool (continuous batching, as vLLM's block manager). Blocks are read in place by
:func:`ferroattn.paged.paged_attention` through each sequence's block table. By default they
are head-major, ``(num_blocks, kv_heads, block_size, dim)`` (``kv_layout="hnd"``): each head's
rows of a block are one contiguous run, which a decode task (one per sequence and KV head)
streams, where flash-attn's token-major blocks ``(num_blocks, block_size, kv_heads, dim)``
(``kv_layout="nhd"``, for sharing the arrays with code that expects them) make it read ``dim``
elements out of every ``kv_heads * dim``.

Forked sequences (parallel sampling, beam search, a shared prompt) share their parent's blocks
by reference count. A block is written only where its tokens lie past every sharer's length,
and a shared block is never written: the first sequence that appends into a shared, partly
filled last block copies it (copy on write, at that append, not at the fork), so a fork costs
no memory until the two sides diverge.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from ._args import as_array, check_dtypes, check_out, mask_options, valid_counts
from ._cache_storage import NumpyStorage, encode_numpy
from ._memory import allocating, nbytes
from .kv_cache import _count, _storage_dtype
from .paged import KVLayout, check_kv_layout, paged_attention, paged_attention_varlen, paged_write
from .variants import normalize_variants

__all__ = ["PagedKVCache"]


@dataclass
class _Sequence:
    """One sequence: its tokens are the first ``length`` rows of ``blocks``, in order."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    # ``blocks`` as the int32 row of a block table, made when first read after a change (a
    # decode step changes the blocks once every block_size tokens, and reads them each time).
    _row: np.ndarray | None = None

    def row(self) -> np.ndarray:
        if self._row is None:
            self._row = np.array(self.blocks, dtype=np.int32)
        return self._row

    def changed(self) -> None:
        self._row = None


@dataclass(frozen=True)
class _Plan:
    """Where an append's tokens go, worked out before anything changes: the block each
    sequence copies first (copy on write), the blocks it gains, its slots."""

    taken: list[int]  # from the free list, in the order handed out
    copies: list[tuple[Hashable, int, int, int]]  # (sequence, index in its blocks, new, old)
    grown: list[tuple[Hashable, list[int]]]
    slots: np.ndarray  # (tokens,) int64 block * block_size + offset, packed in call order


class PagedKVCache:
    """Keys and values of one attention layer in blocks of ``block_size`` tokens.

    Args:
        num_blocks: blocks in the pool (the cache holds at most ``num_blocks * block_size``
            tokens over all its sequences, fewer where partly filled blocks end sequences).
        block_size: tokens per block.
        kv_heads: key/value heads.
        head_dim: dimension of keys (and of values unless ``value_dim`` is given).
        dtype: storage, as :class:`ferroattn.KVCache`'s: ``"float32"``, ``"float16"``,
            ``"bfloat16"`` or ``"int8"`` (symmetric, one float32 scale per token and head).
        value_dim: dimension of values, default ``head_dim``.
        kv_layout: ``"hnd"`` (default): blocks ``(num_blocks, kv_heads, block_size, dim)``,
            the faster to decode from; ``"nhd"``: ``(num_blocks, block_size, kv_heads, dim)``
            as flash-attn's and vLLM's paged caches (see :mod:`ferroattn.paged`).

    Sequences are named by any hashable id: :meth:`add` one, :meth:`append` its keys and
    values, :meth:`attend` (or :meth:`step`: both at once) with its queries, :meth:`fork` it,
    :meth:`truncate` it, :meth:`free` it. Inputs are NumPy arrays. Every call is all or
    nothing: all its arguments are checked, and the blocks it needs counted, before anything is
    stored; a call that fails leaves sequences, blocks and storage as they were. Running out of
    blocks raises ``ValueError`` (``"out of blocks: need N, M free"``); an unknown id
    ``KeyError``, an id added twice ``ValueError``.

    Example:
        >>> import numpy as np, ferroattn
        >>> cache = ferroattn.PagedKVCache(64, 16, 2, 32)
        >>> rng = np.random.default_rng(0)
        >>> cache.add("a")
        >>> k, v = rng.standard_normal((2, 1, 2, 20, 32), dtype=np.float32)
        >>> q = rng.standard_normal((1, 4, 20, 32), dtype=np.float32)
        >>> cache.step(["a"], q, k, v).shape    # prefill 20 tokens: two blocks
        (1, 4, 20, 32)
        >>> cache.fork("a", "b")                # "b" shares both blocks
        >>> cache.num_free_blocks
        62
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: Any = "float32",
        value_dim: int | None = None,
        kv_layout: KVLayout = "hnd",
    ) -> None:
        self.num_blocks = _count("num_blocks", num_blocks, 1)
        self.block_size = _count("block_size", block_size, 1)
        self.kv_heads = _count("kv_heads", kv_heads, 1)
        self.head_dim = _count("head_dim", head_dim, 1)
        self.value_dim = self.head_dim if value_dim is None else _count("value_dim", value_dim, 1)
        self._code, self._dtype = _storage_dtype(dtype)
        self._layout = check_kv_layout(kv_layout)
        rows = (self.num_blocks, self.block_size, self.kv_heads)
        if self._layout == "hnd":
            rows = (self.num_blocks, self.kv_heads, self.block_size)
        int8 = self._code == "int8"
        total = nbytes((*rows, self.head_dim), self._dtype)
        total += nbytes((*rows, self.value_dim), self._dtype)
        total += 2 * nbytes(rows, np.float32) if int8 else 0
        what = (
            f"the storage of PagedKVCache(num_blocks={num_blocks}, block_size={block_size}, "
            f"kv_heads={kv_heads}, head_dim={head_dim}, value_dim={self.value_dim}, "
            f"dtype={self._code!r})"
        )
        with allocating(what, total):
            zeros = NumpyStorage.zeros
            self._k = zeros((*rows, self.head_dim), self._dtype)
            self._v = zeros((*rows, self.value_dim), self._dtype)
            f32 = np.dtype(np.float32)
            self._ks = zeros(rows, f32) if int8 else None
            self._vs = zeros(rows, f32) if int8 else None
            self._refs = np.zeros(self.num_blocks, dtype=np.int64)
        # Popped from the end: the lowest-numbered free block is handed out first.
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._seqs: dict[Hashable, _Sequence] = {}

    # ----------------------------------------------------------------- facts

    @property
    def dtype(self) -> str:
        """Storage type name."""
        return self._code

    @property
    def kv_layout(self) -> KVLayout:
        """Block layout of :attr:`k_cache`, :attr:`v_cache` and the scales: ``"hnd"`` or
        ``"nhd"``; pass it to the :mod:`ferroattn.paged` functions with them."""
        return self._layout

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds."""
        return len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes of storage (keys, values and int8 scales), every block counted."""
        return int(sum(a.nbytes for a in self._storage()))

    @property
    def seq_ids(self) -> list[Hashable]:
        """The ids of the sequences held, in the order they were added."""
        return list(self._seqs)

    @property
    def k_cache(self) -> np.ndarray:
        """Keys, a read-only view: ``(num_blocks, kv_heads, block_size, head_dim)``
        (:attr:`kv_layout` ``"hnd"``) or ``(num_blocks, block_size, kv_heads, head_dim)``
        (``"nhd"``)."""
        return _read_only(self._k)

    @property
    def v_cache(self) -> np.ndarray:
        """Values, a read-only view: ``(num_blocks, kv_heads, block_size, value_dim)``
        (``"hnd"``) or ``(num_blocks, block_size, kv_heads, value_dim)`` (``"nhd"``)."""
        return _read_only(self._v)

    @property
    def k_scale(self) -> np.ndarray | None:
        """int8 keys' float32 scales (read-only) ``(num_blocks, kv_heads, block_size)``
        (``"hnd"``) or ``(num_blocks, block_size, kv_heads)`` (``"nhd"``), or None for a
        float cache."""
        return None if self._ks is None else _read_only(self._ks)

    @property
    def v_scale(self) -> np.ndarray | None:
        """int8 values' scales; see :attr:`k_scale`."""
        return None if self._vs is None else _read_only(self._vs)

    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError:  # unhashable: never an id
            return False

    def __len__(self) -> int:
        return len(self._seqs)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, dtype={self._code!r}, "
            f"sequences={len(self._seqs)}, free_blocks={len(self._free)})"
        )

    def length(self, seq_id: Hashable) -> int:
        """Tokens sequence ``seq_id`` holds (the position of its next token)."""
        return self._seq(seq_id).length

    def lengths(self, seq_ids: Iterable[Hashable] | None = None) -> np.ndarray:
        """Tokens each of ``seq_ids`` (default: every sequence, in :attr:`seq_ids` order)
        holds, int64."""
        ids = self.seq_ids if seq_ids is None else self._ids(seq_ids, unique=False)
        return np.array([self._seqs[s].length for s in ids], dtype=np.int64)

    def block_table(self, seq_ids: Iterable[Hashable]) -> tuple[np.ndarray, np.ndarray]:
        """``(block_table (B, max_blocks) int32, seq_lens (B,) int32)`` of ``seq_ids``, as
        :func:`ferroattn.paged.paged_attention` takes them (with :attr:`k_cache`,
        :attr:`v_cache` and ``kv_layout=`` :attr:`kv_layout`); unused entries are -1."""
        table, lens = self._tables(self._ids(seq_ids, unique=False))
        return table.copy(), lens

    # ------------------------------------------------------------- sequences

    def add(self, seq_id: Hashable) -> None:
        """Start an empty sequence named ``seq_id`` (it holds no block until it has tokens)."""
        if self._known(seq_id):
            raise ValueError(f"seq_id {seq_id!r} is already in the cache")
        self._seqs[seq_id] = _Sequence()

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start ``child_id`` as a copy of ``parent_id`` that shares all of its blocks (none is
        copied now: a shared block is copied by the first of them to append into it)."""
        parent = self._seq(parent_id)
        if self._known(child_id):
            raise ValueError(f"child_id {child_id!r} is already in the cache")
        self._refs[parent.blocks] += 1
        self._seqs[child_id] = _Sequence(list(parent.blocks), parent.length)

    def truncate(self, seq_id: Hashable, n: int) -> None:
        """Keep the first ``n`` tokens of ``seq_id`` (rejected draft tokens, a rewind), giving
        back the blocks it no longer uses (each freed once no sequence shares it)."""
        seq = self._seq(seq_id)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if n > seq.length:
            raise ValueError(f"cannot keep n={n} tokens of {seq_id!r}: it holds {seq.length}")
        keep = -(-int(n) // self.block_size)
        self._release(seq.blocks[keep:])
        del seq.blocks[keep:]
        seq.changed()
        seq.length = int(n)

    def free(self, seq_id: Hashable) -> None:
        """Drop sequence ``seq_id``, giving back the blocks no other sequence shares."""
        seq = self._seq(seq_id)
        self._release(seq.blocks)
        del self._seqs[seq_id]

    # ---------------------------------------------------------------- writes

    def append(self, seq_ids: Iterable[Hashable], k: Any, v: Any, *, lengths: Any = None) -> None:
        """Append new keys and values to each of ``seq_ids``.

        Args:
            seq_ids: the sequences, each once.
            k: ``(len(seq_ids), kv_heads, T, head_dim)``.
            v: ``(len(seq_ids), kv_heads, T, value_dim)``.
            lengths: ``(len(seq_ids),)`` valid new tokens per sequence (right padding of
                ``k``/``v``); default ``T`` for all.
        """
        ids = self._ids(seq_ids)
        k, v = self._check_kv(ids, k, v)
        counts = valid_counts(lengths, len(ids), k.shape[2])
        self._store(ids, *_packed(k, v, counts), counts)

    def step(
        self,
        seq_ids: Iterable[Hashable],
        q: Any,
        k: Any,
        v: Any,
        *,
        scale: float | None = None,
        softcap: float | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Append ``k``/``v`` to each of ``seq_ids`` and attend with ``q`` (a decode step for
        ``T = 1``, a prefill chunk otherwise): :meth:`append` then :meth:`attend`, all or
        nothing. ``q (len(seq_ids), heads, T, head_dim)``, ``T`` as in ``k``."""
        ids = self._ids(seq_ids)
        k, v = self._check_kv(ids, k, v)
        q = self._check_q(ids, q)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"q and k hold different numbers of tokens: {q.shape} vs {tuple(k.shape)}"
            )
        counts = np.full(len(ids), k.shape[2], dtype=np.int64)
        shape = (len(ids), q.shape[1], q.shape[2], self.value_dim)
        options = self._options(q, shape, out, scale, softcap, alibi_slopes, sinks)
        packed_k, packed_v = _packed(k, v, counts)
        return self._store_then(
            ids, packed_k, packed_v, counts, lambda: self._attend(ids, q, out, options)
        )

    def step_varlen(
        self,
        seq_ids: Iterable[Hashable],
        q: Any,
        k: Any,
        v: Any,
        q_lens: Any,
        *,
        scale: float | None = None,
        softcap: float | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """One continuous-batching step: each of ``seq_ids`` brings its own number of new
        tokens (a prefill chunk, one decoded token, or none), appended and attended in one
        kernel call.

        Args:
            seq_ids: the sequences, each once.
            q: ``(T, heads, head_dim)``: the new tokens' queries, packed in ``seq_ids`` order.
            k: ``(T, kv_heads, head_dim)``, packed likewise.
            v: ``(T, kv_heads, value_dim)``.
            q_lens: ``(len(seq_ids),)`` new tokens per sequence, summing to ``T``.
            scale, softcap, alibi_slopes, sinks, out: as in :meth:`attend` (``out`` is
                ``(T, heads, value_dim)``).

        Returns:
            ``(T, heads, value_dim)`` in q's dtype.
        """
        ids = self._ids(seq_ids)
        q, k, v = (as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
        check_dtypes({"q": q})
        check_dtypes({"k": k, "v": v})
        self._check_packed(q, k, v)
        counts = _q_lens(q_lens, len(ids), q.shape[0])
        shape = (q.shape[0], q.shape[1], self.value_dim)
        options = self._options(
            q[None].swapaxes(1, 2), shape, out, scale, softcap, alibi_slopes, sinks
        )
        return self._store_then(
            ids, k, v, counts, lambda: self._attend_varlen(ids, q, counts, out, options)
        )

    # ------------------------------------------------------------- attention

    def attend(
        self,
        seq_ids: Iterable[Hashable],
        q: Any,
        *,
        scale: float | None = None,
        softcap: float | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Attention of the last tokens' queries of each of ``seq_ids`` over its tokens.

        Args:
            seq_ids: the sequences (an id may repeat).
            q: ``(len(seq_ids), heads, T, head_dim)``, ``heads`` a multiple of ``kv_heads``:
                query ``i`` of a sequence of length ``n`` belongs to position ``n - T + i``
                (bottom-right causal, as for decoding); every sequence holds at least ``T``
                tokens.
            scale, softcap, alibi_slopes, sinks: as in :func:`ferroattn.attention`.
            out: optional output array ``(len(seq_ids), heads, T, value_dim)`` of q's dtype.

        Returns:
            ``(len(seq_ids), heads, T, value_dim)`` in q's dtype.
        """
        ids = self._ids(seq_ids, unique=False)
        q = self._check_q(ids, q)
        shape = (len(ids), q.shape[1], q.shape[2], self.value_dim)
        options = self._options(q, shape, out, scale, softcap, alibi_slopes, sinks)
        self._check_seen(ids, np.full(len(ids), q.shape[2]))
        return self._attend(ids, q, out, options)

    def attend_varlen(
        self,
        seq_ids: Iterable[Hashable],
        q: Any,
        q_lens: Any,
        *,
        scale: float | None = None,
        softcap: float | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`attend` with a different number of queries per sequence: ``q (T, heads,
        head_dim)`` packed in ``seq_ids`` order, ``q_lens`` queries per sequence (the last
        tokens of each; 0 for a sequence idle this step). Returns ``(T, heads, value_dim)``."""
        ids = self._ids(seq_ids, unique=False)
        q = as_array("q", q)
        check_dtypes({"q": q})
        self._check_packed(q, None, None)
        counts = _q_lens(q_lens, len(ids), q.shape[0])
        shape = (q.shape[0], q.shape[1], self.value_dim)
        options = self._options(
            q[None].swapaxes(1, 2), shape, out, scale, softcap, alibi_slopes, sinks
        )
        self._check_seen(ids, counts)
        return self._attend_varlen(ids, q, counts, out, options)

    # ------------------------------------------------------------- internals

    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown seq_id {seq_id!r}") from None
        except TypeError as e:
            raise TypeError(f"seq_id must be hashable, got {type(seq_id).__name__}") from e

    def _known(self, seq_id: Hashable) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError as e:
            raise TypeError(f"seq_id must be hashable, got {type(seq_id).__name__}") from e

    def _ids(self, seq_ids: Iterable[Hashable], unique: bool = True) -> list[Hashable]:
        """``seq_ids`` as a list of known ids (each once when ``unique``: they are written)."""
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Iterable):
            raise TypeError(f"seq_ids must be a sequence of ids, got {type(seq_ids).__name__}")
        ids = list(seq_ids)
        for s in ids:
            self._seq(s)
        if unique and len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must not repeat an id, got {ids!r}")
        return ids

    def _tables(self, ids: list[Hashable]) -> tuple[np.ndarray, np.ndarray]:
        """The block table and lengths of ``ids``; one sequence's table is its cached row (not
        to be written)."""
        seqs = [self._seqs[s] for s in ids]
        lens = np.array([s.length for s in seqs], dtype=np.int32)
        if len(seqs) == 1 and seqs[0].blocks:
            return seqs[0].row()[None], lens
        width = max([1] + [len(s.blocks) for s in seqs])
        table = np.full((len(ids), width), -1, dtype=np.int32)
        for line, s in zip(table, seqs, strict=True):
            line[: len(s.blocks)] = s.row()
        return table, lens

    def _storage(self) -> tuple[np.ndarray, ...]:
        if self._ks is None or self._vs is None:
            return (self._k, self._v)
        return (self._k, self._v, self._ks, self._vs)

    def _scales(self) -> dict[str, Any]:
        return {"k_scale": self._ks, "v_scale": self._vs}

    def _check_kv(self, ids: list[Hashable], k: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = as_array("k", k), as_array("v", v)
        check_dtypes({"k": k, "v": v})
        for name, arr, dim in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if arr.ndim != 4 or arr.shape[:2] != (len(ids), self.kv_heads) or arr.shape[3] != dim:
                raise ValueError(
                    f"{name} must have shape (len(seq_ids)={len(ids)}, kv_heads={self.kv_heads}"
                    f", tokens, {dim}), got {arr.shape}"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v hold different numbers of tokens: {k.shape} vs {v.shape}")
        return k, v

    def _check_q(self, ids: list[Hashable], q: Any) -> np.ndarray:
        q = as_array("q", q)
        check_dtypes({"q": q})
        if (
            q.ndim != 4
            or q.shape[0] != len(ids)
            or q.shape[3] != self.head_dim
            or q.shape[1] % self.kv_heads
        ):
            raise ValueError(
                f"q must have shape (len(seq_ids)={len(ids)}, heads (a multiple of "
                f"{self.kv_heads}), tokens, {self.head_dim}), got {q.shape}"
            )
        return q

    def _check_packed(self, q: np.ndarray, k: np.ndarray | None, v: np.ndarray | None) -> None:
        """Packed ``(T, heads, dim)`` queries (and new keys and values) of a varlen call."""
        if q.ndim != 3 or q.shape[2] != self.head_dim or q.shape[1] % self.kv_heads:
            raise ValueError(
                f"q must have shape (tokens, heads (a multiple of {self.kv_heads}), "
                f"{self.head_dim}), got {q.shape}"
            )
        if k is None or v is None:
            return
        for name, arr, dim in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if arr.shape != (q.shape[0], self.kv_heads, dim):
                raise ValueError(
                    f"{name} must have shape ({q.shape[0]}, {self.kv_heads}, {dim}), got "
                    f"{arr.shape}"
                )

    def _options(self, q4, shape, out, scale, softcap, alibi_slopes, sinks) -> dict[str, Any]:
        """The attention options of queries ``q4`` ``(B, H, T, D)`` and a result of ``shape``,
        checked (before a step stores anything), as keywords of the paged functions."""
        mask_options(head_dim=self.head_dim, causal=True, window=None, scale=scale, softcap=softcap)
        shape4 = (q4.shape[0], q4.shape[1], q4.shape[2], 1)
        normalize_variants(shape4=shape4, ndim=4, alibi_slopes=alibi_slopes, sinks=sinks)
        if out is not None:
            check_out(out, shape, q4.dtype, [q4])
            if any(np.may_share_memory(out, a) for a in self._storage()):
                raise ValueError("out must not share memory with the cache's storage")
        return {"scale": scale, "softcap": softcap, "alibi_slopes": alibi_slopes, "sinks": sinks}

    def _check_seen(self, ids: list[Hashable], counts: np.ndarray) -> None:
        for s, c in zip(ids, counts.tolist(), strict=True):
            if c > self._seqs[s].length:
                raise ValueError(
                    f"q: {c} queries for {s!r}, which holds {self._seqs[s].length} tokens"
                )

    def _plan(self, ids: list[Hashable], counts: np.ndarray) -> _Plan:
        """Where ``counts[i]`` new tokens of each sequence go; raises, changing nothing, when
        the free blocks do not suffice.

        A sequence whose partly filled last block others share copies it first, unless the
        sequences before it in this call copied theirs away, leaving it the block's last user.
        """
        bs = self.block_size
        users: dict[int, int] = {}  # users of a shared last block once earlier copies are made
        wants = []  # per sequence with new tokens: (id, copies its last block, blocks gained)
        for s, c in zip(ids, counts.tolist(), strict=True):
            if c == 0:
                continue
            seq = self._seqs[s]
            copy = False
            if seq.length % bs:
                last = seq.blocks[-1]
                left = users.get(last, int(self._refs[last]))
                copy = left > 1
                users[last] = left - copy
            wants.append((s, copy, -(-(seq.length + c) // bs) - len(seq.blocks)))
        need = sum(copy + gained for _, copy, gained in wants)
        if need > len(self._free):
            raise ValueError(f"out of blocks: need {need}, {len(self._free)} free")
        taken = self._free[len(self._free) - need :][::-1]
        given = iter(taken)
        copies, grown, slots = [], [], []
        for (s, copy, gained), c in zip(wants, counts[counts > 0].tolist(), strict=True):
            seq = self._seqs[s]
            first = seq.length // bs  # the block the first new token goes to
            tail = seq.blocks[first:]
            if copy:
                tail[-1] = next(given)
                copies.append((s, len(seq.blocks) - 1, tail[-1], seq.blocks[-1]))
            new = [next(given) for _ in range(gained)]
            grown.append((s, new))
            pos = np.arange(seq.length, seq.length + c) - first * bs
            slots.append(np.asarray(tail + new, dtype=np.int64)[pos // bs] * bs + pos % bs)
        packed = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
        return _Plan(taken, copies, grown, packed)

    def _store(self, ids, k: np.ndarray, v: np.ndarray, counts: np.ndarray) -> None:
        """Stores packed ``k (T, kv_heads, D)``/``v``, ``counts[i]`` tokens for ``ids[i]``."""
        self._store_then(ids, k, v, counts, None)

    def _store_then(self, ids, k, v, counts, then) -> Any:
        """Stores the tokens, then returns ``then()``; when either fails, every sequence and
        block is as before (what was written lies in blocks no sequence holds any more, or
        past the length of every sequence that holds it)."""
        plan = self._plan(ids, counts)
        k, v = self._float32(k), self._float32(v)
        for _, _, new, old in plan.copies:  # into free blocks: nothing to undo
            for a in self._storage():
                a[new] = a[old]
        lengths = [self._seqs[s].length for s in ids]
        self._apply(plan)
        try:
            paged_write(
                self._k, self._v, k, v, plan.slots, kv_layout=self._layout, **self._scales()
            )
            for s, c in zip(ids, counts.tolist(), strict=True):
                self._seqs[s].length += c
            return None if then is None else then()
        except BaseException:
            self._undo(plan)
            for s, n in zip(ids, lengths, strict=True):
                self._seqs[s].length = n
            raise

    def _float32(self, x: np.ndarray) -> np.ndarray:
        """New tokens as float32, the type ``paged_write`` converts from. Other inputs are
        first rounded to a float cache's type (the float32 of which is exact), so that the
        cache stores what KVCache's ``append`` stores for the same input: one rounding, not
        two (int8 quantizes from float32 in both)."""
        if x.dtype == np.float32:
            return x
        with allocating("k and v (converted to float32 for the cache)"):
            if self._code != "int8":
                x = encode_numpy(x, self._code, self._dtype)[0]
            return x.astype(np.float32)

    def _apply(self, plan: _Plan) -> None:
        """Gives the planned blocks to their sequences (a copy never frees the block it
        replaces: others still use it)."""
        if plan.taken:
            del self._free[-len(plan.taken) :]
            self._refs[plan.taken] = 1
        for s, i, new, old in plan.copies:
            self._refs[old] -= 1
            self._seqs[s].blocks[i] = new
        for s, gained in plan.grown:
            if gained:
                self._seqs[s].blocks += gained
                self._seqs[s].changed()
        for s, *_ in plan.copies:
            self._seqs[s].changed()

    def _undo(self, plan: _Plan) -> None:
        """Puts blocks, reference counts and the free list back as before :meth:`_apply`."""
        for s, gained in plan.grown:
            if gained:
                del self._seqs[s].blocks[-len(gained) :]
                self._seqs[s].changed()
        for s, i, _, old in plan.copies:
            self._refs[old] += 1
            self._seqs[s].blocks[i] = old
            self._seqs[s].changed()
        self._refs[plan.taken] = 0
        self._free += plan.taken[::-1]

    def _release(self, blocks: list[int]) -> None:
        """One user fewer for each of ``blocks``; those left without one are free again."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def _attend(self, ids, q, out, options) -> np.ndarray:
        if not q.size:  # no query rows (or heads): nothing for the kernels to do
            return _empty_result((len(ids), q.shape[1], q.shape[2], self.value_dim), q, out)
        table, lens = self._tables(ids)
        # Without return_lse the result is the output array alone.
        return cast(
            np.ndarray,
            paged_attention(
                q,
                self._k,
                self._v,
                table,
                lens,
                causal=True,
                out=out,
                kv_layout=self._layout,
                **self._scales(),
                **options,
            ),
        )

    def _attend_varlen(self, ids, q, counts, out, options) -> np.ndarray:
        if not q.size:
            return _empty_result((q.shape[0], q.shape[1], self.value_dim), q, out)
        table, lens = self._tables(ids)
        cu = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(counts, out=cu[1:])
        return cast(
            np.ndarray,
            paged_attention_varlen(
                q,
                self._k,
                self._v,
                table,
                lens,
                cu,
                causal=True,
                out=out,
                kv_layout=self._layout,
                **self._scales(),
                **options,
            ),
        )


def _empty_result(shape: tuple[int, ...], q: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """The result of a call without a query row: ``out`` (checked already) or a new array, of
    q's dtype, with no elements."""
    return np.empty(shape, dtype=q.dtype) if out is None else out


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _q_lens(q_lens: Any, n: int, total: int) -> np.ndarray:
    counts = np.asarray(q_lens)
    if counts.shape != (n,) or counts.dtype.kind not in "iu" or (n and counts.min() < 0):
        raise ValueError(
            f"q_lens must be {n} non-negative integers, got {counts.tolist()!r} ({counts.dtype})"
        )
    if int(counts.sum()) != total:
        raise ValueError(f"q_lens must sum to the {total} packed tokens, got {counts.tolist()}")
    return counts.astype(np.int64)


def _packed(k: np.ndarray, v: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(B, Hkv, T, D)`` tokens, right-padded past ``counts``, as packed ``(sum, Hkv, D)``."""
    if not counts.size:
        return k.reshape(0, k.shape[1], k.shape[3]), v.reshape(0, v.shape[1], v.shape[3])
    if counts.size and (counts == k.shape[2]).all():
        return (
            k.transpose(0, 2, 1, 3).reshape(-1, *k.shape[1:2], k.shape[3]),
            v.transpose(0, 2, 1, 3).reshape(-1, *v.shape[1:2], v.shape[3]),
        )
    parts_k = [k[i, :, :c].swapaxes(0, 1) for i, c in enumerate(counts.tolist())]
    parts_v = [v[i, :, :c].swapaxes(0, 1) for i, c in enumerate(counts.tolist())]
    return np.concatenate(parts_k), np.concatenate(parts_v)
