"""ferroattn beyond one process: attention over keys spread across Ray workers.

* :class:`ShardedKVCache`: a decoding cache split by token position over Ray actors, each
  shard computing attention over its own keys where they lie.
* :func:`context_parallel_attention`: one long prefill cut into a grid of (query block, key
  block) Ray tasks.

Both merge the partial results exactly with :func:`ferroattn.merge_partials`. They run on the
cluster ``ray.init()`` connected this process to (``ray.init(address="auto")`` on a node of a
cluster started with ``ray start``), or on a local one started on first use. Needs Ray
(``pip install ferroattn[ray]``); ``import ferroattn`` never imports it.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401 - only to say what is missing, before anything else fails
except ImportError as e:
    raise ImportError(
        "ferroattn.distributed needs Ray: pip install ferroattn[ray] (or pip install ray)"
    ) from e

from .context_parallel import context_parallel_attention
from .errors import ShardError
from .sharded_cache import ShardedKVCache

__all__ = ["ShardError", "ShardedKVCache", "context_parallel_attention"]
