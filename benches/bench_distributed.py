"""What a decode step costs through Ray: ferroattn.distributed.ShardedKVCache next to one
process's ferroattn.KVCache at the same total length.

    python benches/bench_distributed.py              # overhead at 1K-32K tokens, then 256K fp16
    python benches/bench_distributed.py --quick      # smoke test, seconds
    python benches/bench_distributed.py --address auto --shards 4   # on a running Ray cluster

Two tables:

* **Per-step overhead**: one-token ``step()`` of a KVCache in this process, and of a
  ShardedKVCache of one shard and of ``--shards`` shards, at short lengths where the kernel
  takes little time: the difference is the Ray round trip (the actor call with q, k and v,
  the partial results back, the merge).
* **Long cache**: the same step on a ``--length``-token cache (default 256K tokens of float16,
  batch 1, 8 KV heads, 32 query heads, D = 128: 1 GiB), split over ``--shards`` local workers
  against one process using the same cores.

Each shard actor reserves ``cores / shards`` CPUs (its kernel threads); the single cache uses
all cores. With ``--address``, the cluster needs room for two caches' reservations at once.
Results are checked against the single cache before timing, the candidates run interleaved,
and each step is rolled back so every timed step sees the same length. Prints a markdown
table and writes it to ``benches/results/distributed-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ferroattn

RESULTS = Path(__file__).resolve().parent / "results"


def _fill(cache: Any, length: int, kv_heads: int, dim: int, dtype: str, chunk: int) -> None:
    """Append ``length`` tokens in chunks of one random block (generating 256K random tokens
    would take longer than the benchmark)."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((2, 1, kv_heads, chunk, dim), dtype=np.float32).astype(dtype)
    done = 0
    while done < length:
        t = min(chunk, length - done)
        cache.append(block[0][:, :, :t], block[1][:, :, :t])
        done += t


def _time(calls: dict[str, Callable[[], Any]], repeats: int, gap: float) -> dict[str, float]:
    """Median ms of each call, run round-robin (each round starting with the next one), with
    ``gap`` seconds of sleep before each: the kernel threads of the call before (in this
    process or a shard's) have gone idle, as between the decode steps of a model."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up
        calls[name]()
    gc.disable()
    try:
        for r in range(repeats):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                time.sleep(gap)
                t0 = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return {n: statistics.median(t) for n, t in times.items()}


def _stepper(cache: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Callable[[], Any]:
    """One decode step, rolled back after it so the next one sees the same length."""

    def step() -> Any:
        out = cache.step(q, k, v)
        cache.rollback(1)
        return out

    return step


def _case(
    args: argparse.Namespace, length: int, shard_counts: list[int], dim: int, heads: int
) -> dict[str, float]:
    """Times one-token steps at ``length`` for a single cache and sharded ones."""
    from ferroattn.distributed import ShardedKVCache

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, heads, 1, dim), dtype=np.float32).astype(args.dtype)
    k, v = rng.standard_normal((2, 1, args.kv_heads, 1, dim), dtype=np.float32).astype(args.dtype)
    single = ferroattn.KVCache(1, args.kv_heads, dim, length + 1, dtype=args.dtype)
    _fill(single, length, args.kv_heads, dim, args.dtype, args.chunk)
    calls: dict[str, Callable[[], Any]] = {"one process": _stepper(single, q, k, v)}
    want = single.step(q, k, v).astype(np.float32)
    single.rollback(1)
    caches = []
    cores = os.cpu_count() or 1
    try:
        for n in shard_counts:
            per_shard = -(-(length + 1) // n)
            options = {"num_cpus": max(1, cores // n)}
            cache = ShardedKVCache(
                n, 1, args.kv_heads, dim, per_shard, dtype=args.dtype, actor_options=options
            )
            caches.append(cache)
            _fill(cache, length, args.kv_heads, dim, args.dtype, args.chunk)
            got = cache.step(q, k, v).astype(np.float32)
            cache.rollback(1)
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            if err > 5e-3:
                raise SystemExit(f"{n} shards at {length} tokens: relative error {err:.2e}")
            calls[f"{n} shard{'s' if n > 1 else ''}"] = _stepper(cache, q, k, v)
        return _time(calls, args.repeats, args.gap_ms / 1e3)
    finally:
        for cache in caches:
            cache.close()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats (seconds)")
    p.add_argument("--length", type=int, default=262144, help="tokens of the long cache")
    p.add_argument("--short", default="1024,8192,32768", help="lengths of the overhead table")
    p.add_argument("--shards", type=int, default=2, help="shards of the sharded caches")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16"])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--chunk", type=int, default=8192, help="tokens per append while filling")
    p.add_argument("--gap-ms", type=float, default=20.0, help="idle time before each call")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: a local one)")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args()
    if args.quick:
        args.length, args.short, args.repeats = 4096, "256", 3
        args.kv_heads, args.heads, args.dim, args.chunk = 2, 8, 64, 1024
    return args


def main() -> int:
    args = _parse()
    import ray

    cores = os.cpu_count() or 1
    if args.address:
        ray.init(address=args.address)
    else:
        # The caches of a case live side by side (one runs at a time) and each reserves all
        # the cores: Ray's CPU count is only bookkeeping for that reservation.
        ray.init(num_cpus=2 * cores, include_dashboard=False, log_to_driver=False)
    try:
        shards = sorted({1, args.shards})
        lines = [
            f"# ShardedKVCache decode step vs one process ({datetime.date.today()})",
            "",
            f"ferroattn {ferroattn.__version__}, ISA {ferroattn.info()['isa']}, {cores} cores, "
            f"Ray {ray.__version__} ({'cluster ' + args.address if args.address else 'local'}); "
            f"batch 1, {args.heads} query / {args.kv_heads} KV heads, D={args.dim}, "
            f"{args.dtype} cache; one-token step(), median of {args.repeats} after "
            f"{args.gap_ms:g} ms idle each, ms. Shards reserve cores/shards CPUs each; the "
            f"single cache uses all {cores} cores. Load average at the start: "
            f"{os.getloadavg()[0]:.1f} (other work on the machine slows every wake-up of a "
            "round trip).",
            "",
            "## Per-step overhead of the Ray round trip",
            "",
            "| tokens | one process | "
            + " | ".join(f"{n} shard(s)" for n in shards)
            + " | overhead (1 shard − one process) |",
            "|---:|---:|" + "---:|" * len(shards) + "---:|",
        ]
        print("\n".join(lines), flush=True)
        for length in [int(x) for x in args.short.split(",") if x]:
            t = _case(args, length, shards, args.dim, args.heads)
            cells = [t["one process"]] + [t[f"{n} shard{'s' if n > 1 else ''}"] for n in shards]
            row = f"| {length} | " + " | ".join(f"{c:.3f}" for c in cells)
            row += f" | {t['1 shard'] - t['one process']:+.3f} |"
            lines.append(row)
            print(row, flush=True)
        mib = 2 * args.length * args.kv_heads * args.dim * np.dtype(args.dtype).itemsize / 2**20
        head = [
            "",
            f"## {args.length}-token cache ({mib:.0f} MiB), {args.shards} local workers",
            "",
            f"| one process | {args.shards} shards | ratio |",
            "|---:|---:|---:|",
        ]
        lines += head
        print("\n".join(head), flush=True)
        t = _case(args, args.length, [args.shards], args.dim, args.heads)
        sharded = t[f"{args.shards} shard{'s' if args.shards > 1 else ''}"]
        row = f"| {t['one process']:.3f} | {sharded:.3f} | {sharded / t['one process']:.2f} |"
        lines.append(row)
        lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
        print(row + "\n\n" + lines[-1], flush=True)
    finally:
        ray.shutdown()
    if not args.no_save and not args.quick:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"distributed-{datetime.date.today()}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
