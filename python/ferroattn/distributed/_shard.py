"""One shard of a :class:`ferroattn.distributed.ShardedKVCache`: the Ray actor that keeps a
contiguous range of token positions of every sequence in a :class:`ferroattn.KVCache`.

The caller keeps the lengths. Every call carries what the caller counts in this shard, and the
shard first drops anything past it (:meth:`ShardWorker._align`): a rollback or reset is then
only a change of those counts, and tokens a failed call wrote on some shards but not on others
are undone by the next call that reaches them.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from ..kv_cache import KVCache
from ._workers import use_assigned_cpus

__all__ = ["ShardWorker", "pack", "unpack"]

# (window, [(b, q0, q_len, k0, k_len), ...]): one kernel call, by KVCache.attend_slots.
Group = tuple[tuple[int | None, int | None], list[tuple[int, int, int, int, int]]]


def pack(message: Any) -> bytes:
    """A small call or result as one pickled message (arrays inside it, copied)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(message: bytes) -> Any:
    """What :func:`pack` packed (between a cache and its own shards only)."""
    return pickle.loads(message)


class ShardWorker:
    """Keys and values of positions ``[start, start + capacity)`` of every sequence (slot ``i``
    holds position ``start + i``); the caller knows ``start``, the shard needs not."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: str):
        use_assigned_cpus()
        self._cache = KVCache(batch, kv_heads, head_dim, capacity, dtype=dtype)
        self._calls = 0

    def nbytes(self) -> int:
        """Bytes of this shard's storage."""
        return self._cache.nbytes

    def calls(self) -> int:
        """How many :meth:`run` calls reached this shard (to see that bad input sends none)."""
        return self._calls

    def run(
        self,
        held: np.ndarray,
        new: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        q: np.ndarray | None,
        groups: list[Group],
        options: dict[str, Any],
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Store new tokens and/or attend over what the shard holds.

        Args:
            held: ``(batch,)`` tokens the caller counts in this shard before the call.
            new: ``(k, v, counts)``: ``counts[b]`` new tokens of sequence ``b``, appended.
            q: float32 queries ``(batch, heads, T, head_dim)``, or None: no attention (an
                argument of its own, so Ray hands the shard the array behind the caller's
                object reference).
            groups: one kernel call each: a window and the query rows and slots it pairs.
            options: ``scale``, ``softcap``, ``precision``.

        Returns:
            ``(out, lse)`` float32 over this shard's keys (rows no group names: 0 and
            ``-inf``), or None without ``q``.
        """
        self._calls += 1
        self._align(held)
        if new is not None:
            k, v, counts = new
            self._cache.append(k, v, lengths=counts)
        if q is None or not groups:
            return None
        parts = [
            self._cache.attend_slots(
                q, seqs, causal=False, window=window, return_lse=True, **options
            )
            for window, seqs in groups
        ]
        out, lse = parts[0]
        for o, part_lse in parts[1:]:  # each row is named by one group at most: 0 and -inf
            out += o
            np.maximum(lse, part_lse, out=lse)
        return out, lse

    def run_packed(self, message: bytes) -> bytes:
        """:meth:`run` with its arguments and result as single :func:`pack` messages."""
        return pack(self.run(*unpack(message)))

    def _align(self, held: np.ndarray) -> None:
        """Drop tokens past what the caller counts (rolled back, reset, or written by a call
        that failed elsewhere)."""
        have = self._cache.lengths
        if np.any(have < held):
            raise RuntimeError(
                f"the shard holds {have.tolist()} tokens per sequence but the cache counts "
                f"{np.asarray(held).tolist()}: its keys were lost (a restarted actor?)"
            )
        for b in np.flatnonzero(have > held).tolist():
            self._cache.rollback(int(have[b] - held[b]), seq=b)
