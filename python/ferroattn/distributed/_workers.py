"""What the Ray side of ferroattn shares: connecting to Ray, and the kernel threads of a worker."""

from __future__ import annotations

import ray

from .. import set_num_threads

__all__ = ["connect", "use_assigned_cpus"]


def connect() -> None:
    """Use the Ray cluster ``ray.init()`` connected this process to; start a local one (all of
    this machine's CPUs) when there is none. For a cluster, call ``ray.init(address=...)``
    first (``address="auto"`` on a node that ran ``ray start``)."""
    if not ray.is_initialized():
        ray.init()


def use_assigned_cpus() -> None:
    """Run the kernels of this Ray worker on as many threads as Ray gave it CPUs.

    Every worker process has its own kernel pool, which starts with one thread per core of
    the machine; a node running several shards or tasks at once would then run several
    threads per core. A worker Ray reserved no CPU for (an actor by default) keeps them all.
    """
    if not ray.is_initialized():  # asking the runtime context would start Ray
        return
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    except AssertionError:  # a driver, not a worker: it keeps its own setting
        return
    if cpus > 0:
        set_num_threads(max(1, int(cpus)))
