"""A key/value cache split by token position over Ray actors.

Sequence ``b`` fills shard 0's ``shard_capacity`` positions first, then shard 1's, and so on;
each shard is an actor (:class:`._shard.ShardWorker`) that keeps its range in a
:class:`ferroattn.KVCache`, possibly on another machine. Attention runs where the keys are:
every shard that holds keys the queries see returns its partial output and log-sum-exp, and
the caller merges them exactly with :func:`ferroattn.merge_partials`. Only the queries (once,
through the object store), the new tokens and the partial results travel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import ray

from ..kv_cache import KVCache, _count, _ScoreTerms
from ..merge import merge_partials
from ..precision import Precision, check_precision
from ._ranges import visible_part
from ._shard import Group, ShardWorker, pack, unpack
from ._workers import connect
from .errors import gather, started

__all__ = ["ShardedKVCache"]

_Worker = ray.remote(ShardWorker)

# Queries smaller than this travel inside each shard's call rather than through the object
# store: Ray inlines such arguments (its own limit is 100 KiB), while a put and the shards'
# fetches of it cost ~1.3 ms more per step on one node for a decode step's 16 KiB of q
# (benches/bench_distributed.py).
_PUT_FROM = 100 * 1024

# A call whose arrays hold less than this goes to its shard as one pickled message (see
# `_shard.pack`): Ray serializes each argument and array on its own, which costs ~0.35 ms
# more per decode step on one node. Larger ones go as they are, read in place from Ray's
# buffers.
_PACK_BELOW = 64 * 1024


def _payload(args: tuple[Any, ...]) -> int:
    """Bytes of the arrays a shard call carries."""
    held, new, q, _, _ = args
    total = held.nbytes + (0 if q is None else q.nbytes)
    return total + (0 if new is None else sum(a.nbytes for a in new))


class ShardedKVCache:
    """A :class:`ferroattn.KVCache` whose token positions are split over Ray actors.

    Args:
        num_shards: actors, each holding ``shard_capacity`` positions of every sequence:
            shard ``s`` holds positions ``[s · shard_capacity, (s + 1) · shard_capacity)``.
        batch, kv_heads, head_dim: as for :class:`ferroattn.KVCache`.
        shard_capacity: positions per shard; the cache holds ``num_shards · shard_capacity``
            tokens per sequence (:attr:`capacity`).
        dtype: storage of every shard: ``"float32"``, ``"float16"``, ``"bfloat16"`` or
            ``"int8"``, as for :class:`ferroattn.KVCache`.
        window: sliding-window attention: a query sees the last ``window`` keys, its own
            included, as ``KVCache(window=...)`` computes. Only the shards that hold keys in
            some query's window are asked; every position is still stored (no ring buffer
            across shards), so capacity and memory are those of the whole history.
        actor_options: passed to Ray's ``.options()`` of every shard actor (``num_cpus``,
            ``resources``, ``scheduling_strategy`` to place shards on nodes, ...). A shard
            that Ray reserves ``num_cpus=n`` for runs its kernels on ``n`` threads; by default
            (no CPU reserved) on all of its machine's cores.
        start_timeout: seconds to wait for every shard's actor to start (see below).

    Works on whatever cluster ``ray.init()`` connected this process to, and starts a local
    one when there is none (call ``ray.init(address="auto")`` first to join a cluster). The
    constructor returns once every shard's actor has started. On a cluster without room for
    what ``actor_options`` reserve, Ray would wait for room indefinitely: after
    ``start_timeout`` seconds (default 60; None waits as long as Ray does) the constructor
    stops the actors and raises :class:`ferroattn.distributed.ShardError` naming the first
    shard that has not started.

    Methods follow :class:`ferroattn.KVCache`: bottom-right causal attention over the whole
    history, GQA, ``scale``, ``softcap``, ``precision``, ragged batches through ``lengths``.
    Inputs are NumPy arrays (or what converts to them); results are NumPy arrays in q's
    dtype. Every argument is checked here before anything is sent, so bad input raises the
    :class:`ferroattn.KVCache` error and no shard hears of it. A shard whose actor died or
    failed raises :class:`ferroattn.distributed.ShardError` naming it; :attr:`lengths` are
    then as before the call (shards that stored part of it drop that part on their next call),
    and :meth:`close` still works.

    Example:
        >>> import numpy as np
        >>> from ferroattn.distributed import ShardedKVCache
        >>> rng = np.random.default_rng(0)
        >>> with ShardedKVCache(2, 1, 8, 64, shard_capacity=1024, dtype="float16") as cache:
        ...     k, v = rng.standard_normal((2, 1, 8, 1500, 64), dtype=np.float32)
        ...     cache.append(k, v)                          # fills shard 0, then part of 1
        ...     q = rng.standard_normal((1, 32, 1, 64), dtype=np.float32)
        ...     out = cache.attend(q)                       # both shards, merged
        >>> out.shape
        (1, 32, 1, 64)
    """

    def __init__(
        self,
        num_shards: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        shard_capacity: int,
        *,
        dtype: Any = "float32",
        window: int | None = None,
        actor_options: Mapping[str, Any] | None = None,
        start_timeout: float | None = 60.0,
    ) -> None:
        self.num_shards = _count("num_shards", num_shards, 1)
        # A KVCache of one position per sequence checks the arguments of every call locally,
        # with the same messages as a KVCache of this shape.
        self._shape = KVCache(batch, kv_heads, head_dim, 1, dtype=dtype)
        self.shard_capacity = _count("shard_capacity", shard_capacity, 1)
        self.window = None if window is None else _count("window", window, 1)
        if actor_options is not None and not isinstance(actor_options, Mapping):
            raise TypeError(f"actor_options must be a dict, got {type(actor_options).__name__}")
        if start_timeout is not None and (
            isinstance(start_timeout, bool)
            or not isinstance(start_timeout, (int, float))
            or not start_timeout > 0
        ):
            raise ValueError(
                f"start_timeout must be a positive number or None, got {start_timeout!r}"
            )
        shape = self._shape
        self.batch, self.kv_heads, self.head_dim = shape.batch, shape.kv_heads, shape.head_dim
        self._len = np.zeros(self.batch, dtype=np.int64)
        self._starts = np.arange(self.num_shards, dtype=np.int64) * self.shard_capacity
        connect()
        worker = _Worker.options(**dict(actor_options or {}))
        args = (self.batch, self.kv_heads, self.head_dim, self.shard_capacity, self.dtype)
        self._actors: tuple[Any, ...] = tuple(worker.remote(*args) for _ in self._starts)
        try:
            refs = [(s, a.nbytes.remote()) for s, a in enumerate(self._actors)]
            started(refs, start_timeout)
            sizes = gather(refs, "a cache")
        except BaseException:
            self.close()
            raise
        self._nbytes = int(sum(sizes))

    # ----------------------------------------------------------------- facts

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold: ``num_shards · shard_capacity``."""
        return self.num_shards * self.shard_capacity

    @property
    def dtype(self) -> str:
        """Storage type name of every shard."""
        return self._shape.dtype

    @property
    def lengths(self) -> np.ndarray:
        """Tokens seen by each sequence (the position of its next token); a copy."""
        return self._len.copy()

    @property
    def nbytes(self) -> int:
        """Bytes of storage over all shards (keys, values and int8 scales)."""
        return self._nbytes

    @property
    def actors(self) -> tuple[Any, ...]:
        """The shards' Ray actor handles, shard 0 first (empty once closed)."""
        return self._actors

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._actors

    def __repr__(self) -> str:
        extra = f", window={self.window}" if self.window else ""
        return (
            f"ShardedKVCache(num_shards={self.num_shards}, batch={self.batch}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"shard_capacity={self.shard_capacity}, dtype={self.dtype!r}{extra}, "
            f"lengths={self._len.tolist()})"
        )

    # ------------------------------------------------------------- lifetime

    def close(self) -> None:
        """End the shard actors (their storage is freed). Safe to call more than once, and
        after a shard died."""
        actors, self._actors = self._actors, ()
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray shut down: nothing to end
                pass

    def __enter__(self) -> ShardedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._actors:
            raise RuntimeError("the ShardedKVCache is closed")

    # ---------------------------------------------------------------- writes

    def append(self, k: Any, v: Any, *, lengths: Any = None) -> None:
        """Append new keys and values, as :meth:`ferroattn.KVCache.append`: ``k``/``v``
        ``(batch, kv_heads, T, head_dim)``, ``lengths`` the valid tokens per sequence. New
        tokens that cross a shard boundary are split between the shards; the call is all or
        nothing (every shard's room is checked first)."""
        self._check_open()
        k, v = self._shape._check_kv(k, v)
        counts = self._shape._valid_counts(lengths, k.shape[2])
        self._check_room(counts)
        self._run(self._new_parts(k, v, counts), {}, None)
        self._len += counts

    def step(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        lengths: Any = None,
        scale: float | None = None,
        softcap: float | None = None,
        precision: Precision | None = None,
    ) -> np.ndarray:
        """Append ``k``/``v`` and attend with ``q``, one round trip to each shard involved,
        as :meth:`ferroattn.KVCache.step`. Returns ``(batch, heads, T, head_dim)`` in q's
        dtype."""
        self._check_open()
        k, v = self._shape._check_kv(k, v)
        q = self._shape._check_q(q)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q and k hold different numbers of tokens: {q.shape} vs {k.shape}")
        counts = self._shape._valid_counts(lengths, k.shape[2])
        self._check_room(counts)
        options = self._options(q, scale, softcap, precision)
        new = self._new_parts(k, v, counts)
        plan = self._plan(self._len, counts, self._len + counts)
        result = self._run(new, plan, (q, options))
        self._len += counts
        return result

    def rollback(self, n: Any, seq: int | None = None) -> None:
        """Drop the last ``n`` tokens of one sequence (or of all), as
        :meth:`ferroattn.KVCache.rollback`; ``n`` may also be ``(batch,)`` ints, one per
        sequence. Sends nothing: each shard drops them on its next call."""
        self._check_open()
        drop = self._drop_counts(n, seq)
        over = drop > self._len
        if over.any():
            b = int(np.argmax(over))
            raise ValueError(
                f"cannot roll back n={int(drop[b])} tokens: sequence {b} has {int(self._len[b])}"
            )
        self._len -= drop

    def reset(self, seq: int | None = None) -> None:
        """Empty one sequence slot (or all), to reuse it. Sends nothing (see :meth:`rollback`)."""
        self._check_open()
        if seq is None:
            self._len[:] = 0
        else:
            self._len[self._shape._seq_index(seq)] = 0

    def _drop_counts(self, n: Any, seq: int | None) -> np.ndarray:
        """``n`` as tokens to drop per sequence (an int for one or all, or one per sequence)."""
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
            if n < 0:
                raise ValueError(f"n must be a non-negative int, got {n!r}")
            drop = np.zeros(self.batch, dtype=np.int64)
            if seq is None:
                drop[:] = n
            else:
                drop[self._shape._seq_index(seq)] = n
            return drop
        per_seq = np.asarray(n) if isinstance(n, (list, tuple, np.ndarray)) else None
        if (
            seq is not None
            or per_seq is None
            or per_seq.shape != (self.batch,)
            or per_seq.dtype.kind not in "iu"
            or (per_seq.size and per_seq.min() < 0)
        ):
            raise ValueError(
                f"n must be a non-negative int, or {self.batch} of them (one per sequence, "
                f"without seq), got {n!r}"
            )
        return per_seq.astype(np.int64)

    def _check_room(self, counts: np.ndarray) -> None:
        over = self._len + counts > self.capacity
        if over.any():
            b = int(np.argmax(over))
            raise ValueError(
                f"appending {int(counts[b])} tokens to sequence {b} (length "
                f"{int(self._len[b])}) exceeds capacity {self.capacity} ({self.num_shards} "
                f"shards of {self.shard_capacity})"
            )

    def _fill(self, lengths: np.ndarray) -> np.ndarray:
        """``(num_shards, batch)``: tokens each shard holds of each sequence at ``lengths``."""
        return np.clip(lengths[None, :] - self._starts[:, None], 0, self.shard_capacity)

    def _new_parts(
        self, k: np.ndarray, v: np.ndarray, counts: np.ndarray
    ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The new tokens each shard stores: ``{shard: (k, v, counts)}``, ``k``/``v`` holding
        sequence ``b``'s part in its first ``counts[b]`` rows (a view when every sequence's
        part starts at the same row of the input)."""
        before, after = self._fill(self._len), self._fill(self._len + counts)
        parts = {}
        for s in range(self.num_shards):
            here = after[s] - before[s]
            if not here.any():
                continue
            # Sequence b's first token for shard s is its input row `offset[b]`.
            offset = before[s] + self._starts[s] - self._len
            rows = int(here.max())
            live = here > 0
            if np.all(offset[live] == offset[live][0]):
                o = int(offset[live][0])
                ks, vs = k[:, :, o : o + rows], v[:, :, o : o + rows]
            else:
                ks = np.zeros(k.shape[:2] + (rows, k.shape[3]), dtype=k.dtype)
                vs = np.zeros(v.shape[:2] + (rows, v.shape[3]), dtype=v.dtype)
                for b in np.flatnonzero(live).tolist():
                    o, t = int(offset[b]), int(here[b])
                    ks[b, :, :t], vs[b, :, :t] = k[b, :, o : o + t], v[b, :, o : o + t]
            parts[s] = (ks, vs, here)
        return parts

    # ------------------------------------------------------------- attention

    def attend(
        self,
        q: Any,
        *,
        lengths: Any = None,
        scale: float | None = None,
        softcap: float | None = None,
        precision: Precision | None = None,
    ) -> np.ndarray:
        """Attention of the queries of the last appended tokens over everything cached, as
        :meth:`ferroattn.KVCache.attend`: query ``i`` of sequence ``b`` sits at position
        ``length_b − t_b + i``; ``lengths`` the valid queries per sequence (default ``T``;
        rows past it are zeros). Returns ``(batch, heads, T, head_dim)`` in q's dtype."""
        self._check_open()
        q = self._shape._check_q(q)
        counts = self._shape._valid_counts(lengths, q.shape[2])
        options = self._options(q, scale, softcap, precision)
        return self._run({}, self._plan(self._len - counts, counts, self._len), (q, options))

    def _options(self, q: np.ndarray, scale: Any, softcap: Any, precision: Any) -> dict[str, Any]:
        """``scale``, ``softcap`` and ``precision``, checked as a KVCache checks them."""
        opts = self._shape._options(q, scale, softcap, _ScoreTerms(), check_precision(precision))
        return {"scale": opts.scale, "softcap": opts.softcap, "precision": opts.precision}

    def _plan(self, first: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> dict:
        """``{shard: groups}``: what each shard computes for queries ``first[b] ..
        first[b] + counts[b] - 1`` of each sequence over its keys at ``lengths``; shards whose
        keys no query sees are left out."""
        left = None if self.window is None else self.window - 1
        fill = self._fill(lengths)
        plan: dict[int, list[Group]] = {}
        for s, start in enumerate(self._starts.tolist()):
            groups: dict[tuple[int | None, int | None], list] = {}
            for b in range(self.batch):
                stop = start + int(fill[s, b])
                part = visible_part(int(first[b]), int(counts[b]), start, stop, left, 0)
                if part is not None:
                    seq = (b, part.q0, part.q_len, part.k0 - start, part.k_len)
                    groups.setdefault(part.window, []).append(seq)
            if groups:
                plan[s] = list(groups.items())
        return plan

    def _run(self, new: dict, plan: dict, query: tuple[np.ndarray, dict] | None) -> Any:
        """One call to each shard that stores or attends; the merged result of the attending
        ones (None without a query)."""
        q_arg: Any = None  # float32 queries, or a reference to them in the object store
        if query is not None and plan:
            q = query[0]
            # Partial results are merged in float32: the shards compute them from float32 q.
            q_arg = q if q.dtype == np.float32 else q.astype(np.float32)
            if len(plan) > 1 and q_arg.nbytes >= _PUT_FROM:
                q_arg = ray.put(q_arg)  # once for all shards, not serialized into each call
        options = {} if query is None else query[1]
        held = self._fill(self._len)
        calls, packed = [], []
        for s in sorted(set(new) | set(plan)):
            q_here = q_arg if s in plan else None
            args = (held[s], new.get(s), q_here, plan.get(s, []), options)
            # A reference must be an argument of its own for Ray to resolve it.
            small = not isinstance(q_here, ray.ObjectRef) and _payload(args) < _PACK_BELOW
            actor = self._actors[s]
            ref = actor.run_packed.remote(pack(args)) if small else actor.run.remote(*args)
            calls.append((s, ref))
            packed.append(small)
        results = [
            unpack(r) if small else r
            for r, small in zip(gather(calls, "a ShardedKVCache"), packed, strict=True)
        ]
        if query is None:
            return None
        q = query[0]
        parts = [r for r in results if r is not None]
        shape = (self.batch, q.shape[1], q.shape[2], self.head_dim)
        if not parts:  # no query sees a key: zeros, as KVCache gives
            return np.zeros(shape, dtype=q.dtype)
        if len(parts) == 1:  # one shard saw every key (rows it did not name are zeros)
            out = parts[0][0]
        else:
            out, _ = merge_partials([o for o, _ in parts], [lse for _, lse in parts])
        result = out.astype(q.dtype, copy=False)
        # An array Ray handed back may be a read-only view of its buffer; results are the
        # caller's to write, as KVCache's are.
        return result if result.flags.writeable else result.copy()
