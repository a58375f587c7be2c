"""The error a failed shard raises, and waiting on remote results in the shards' order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayError

__all__ = ["ShardError", "gather", "started"]


class ShardError(RuntimeError):
    """A shard's actor (or a task of a distributed call) died or raised.

    ``shard`` is the index of the first one that failed; Ray's exception is chained as the
    ``__cause__``. The caller's state (a :class:`ShardedKVCache`'s lengths) is as it was
    before the call, and ``close()`` still works.
    """

    def __init__(self, shard: int, message: str) -> None:
        super().__init__(message)
        self.shard = shard


def gather(refs: Sequence[tuple[int, Any]], what: str) -> list[Any]:
    """The results of ``(shard, ObjectRef)`` pairs, in order, once every one has finished.

    Every call is waited for before one failure is reported, so none is still running when
    the caller goes on. Raises :class:`ShardError` naming the first failed shard.
    """
    if not refs:
        return []
    try:
        return list(ray.get([r for _, r in refs]))  # the common case: one call into Ray
    except RayError:
        pass  # raised for one of them: wait for all, then say which failed first
    ray.wait([r for _, r in refs], num_returns=len(refs))
    results: list[Any] = []
    failed: tuple[int, RayError] | None = None
    for shard, ref in refs:
        try:
            results.append(ray.get(ref))
        except RayError as e:
            results.append(None)
            if failed is None:
                failed = (shard, e)
    if failed is not None:
        shard, cause = failed
        # Ray's messages run to a traceback: the first line names what happened.
        first = next(iter(str(cause).strip().splitlines()), "")
        message = f"shard {shard} of {what} failed: {type(cause).__name__}: {first}"
        raise ShardError(shard, message) from cause
    return results


def started(refs: Sequence[tuple[int, Any]], timeout: float | None) -> None:
    """Waits up to ``timeout`` seconds (None: as long as Ray does) for the first calls of newly
    created actors; raises :class:`ShardError` naming the first shard whose call has not
    finished (its actor is not placed: the cluster has no room for what it reserves)."""
    if timeout is None or not refs:
        return
    ready, _ = ray.wait([r for _, r in refs], num_returns=len(refs), timeout=timeout)
    done = set(ready)
    for shard, ref in refs:
        if ref not in done:
            raise ShardError(
                shard,
                f"shard {shard} did not start within {timeout:g} s: the cluster has no room "
                f"for the resources actor_options reserve (see ray.available_resources())",
            )
