"""Soak test of ferroattn: many mixed calls and cache lifecycles (does memory grow?), then
threads calling at once (do results change?). Not part of CI; minutes long.

    PYTHONPATH=python python scripts/soak.py            # 100k calls, 20k caches, 8 x 20 s
    PYTHONPATH=python python scripts/soak.py --quick    # 10k calls, 2k caches, 8 x 3 s

1. Mixed calls: every public function on small random problems, refused calls included (error
   paths must not leak either), with the resident set size (``VmRSS`` of /proc/self/status)
   after a warm-up and then at each quarter.
2. Cache lifecycles: a KVCache made (plain, window with sinks, int8, float16), filled, rolled
   back, reset, read and dropped, over and over; RSS before and after.
3. Threads: a fixed set of calls (attention with options, weights, varlen, linear attention,
   per-thread cache decoding) computed once on one thread, then ``--threads`` threads repeat
   them at random for ``--seconds`` seconds; any result that differs is a mismatch.

Prints a short summary; exits 1 on a mismatch, an unexpected exception or RSS growth beyond
``--max-growth-mib``.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import ferroattn

F32 = np.float32


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------


def _qkv(rng: np.random.Generator, b=1, hq=4, hk=2, nq=24, nk=24, d=32, dv=32, dtype=F32):
    return (
        rng.standard_normal((b, hq, nq, d)).astype(dtype),
        rng.standard_normal((b, hk, nk, d)).astype(dtype),
        rng.standard_normal((b, hk, nk, dv)).astype(dtype),
    )


def make_calls(seed: int) -> list[tuple[str, Callable[[], Any]]]:
    """Zero-argument calls with fixed inputs: each returns an array (or a tuple of them)."""
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b=2, nq=33, nk=47)
    h16 = [x.astype(np.float16) for x in _qkv(rng, nq=17, nk=17, d=64, dv=64)]
    tq, tk = q[0].transpose(1, 0, 2).copy(), k[0].transpose(1, 0, 2).copy()
    tv = v[0].transpose(1, 0, 2).copy()
    cu_q, cu_k = [0, 10, 10, 33], [0, 20, 30, 47]
    mask = rng.random((33, 47)) < 0.7
    bias = rng.standard_normal((4, 33, 47)).astype(F32)
    t5 = ferroattn.T5Bias(rng.standard_normal((16, 4)).astype(F32), max_distance=32)
    lin = _qkv(rng, nq=40, nk=40)
    parts = [
        ferroattn.attention(q, k[:, :, s], v[:, :, s], return_lse=True)
        for s in (slice(0, 20), slice(20, 47))
    ]
    return [
        ("attention causal", lambda: ferroattn.attention(q, k, v, causal=True)),
        (
            "attention options",
            lambda: ferroattn.attention(
                q, k, v, window=(8, 2), softcap=5.0, kv_lengths=[47, 30], return_lse=True
            ),
        ),
        (
            "attention terms",
            lambda: ferroattn.attention(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                alibi_slopes=ferroattn.alibi_slopes(4),
                sinks=[0.5, -1.0, 0.0, 2.0],
                rel_bias=t5,
            ),
        ),
        ("attention float16", lambda: ferroattn.attention(*h16, causal="top_left")),
        ("attention_weights", lambda: ferroattn.attention_weights(q, k, causal=True)),
        (
            "attention_varlen",
            lambda: ferroattn.attention_varlen(
                tq, tk, tv, cu_q, cu_k, causal=True, return_lse=True
            ),
        ),
        ("linear_attention", lambda: ferroattn.linear_attention(*lin, causal=True)),
        ("rope", lambda: ferroattn.rope(q, np.arange(33) + 1000, theta=500000.0)),
        (
            "merge_partials",
            lambda: ferroattn.merge_partials([p[0] for p in parts], [p[1] for p in parts]),
        ),
    ]


def refused_calls() -> list[Callable[[], Any]]:
    """Calls that must raise ValueError or TypeError."""
    q = np.zeros((1, 2, 4, 8), F32)
    return [
        lambda: ferroattn.attention(q, q, q[..., :3, :]),
        lambda: ferroattn.attention(q, q, q, window=-3),
        lambda: ferroattn.attention(q.astype(np.int32), q, q),
        lambda: ferroattn.attention_weights(q, q, sinks=[np.nan, 0.0]),
        lambda: ferroattn.KVCache(1, 1, 8, capacity=0),
        lambda: ferroattn.rope(q[..., :7], np.arange(4)),
    ]


def mixed_calls(n: int, seed: int) -> dict[str, Any]:
    calls = [fn for _, fn in make_calls(seed)] + [_refusing(fn) for fn in refused_calls()]
    rng = random.Random(seed)
    warm = min(1000, n // 10)
    for _ in range(warm):
        rng.choice(calls)()
    marks = [rss_mib()]
    errors = 0
    for i in range(n):
        try:
            rng.choice(calls)()
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors += 1
            print(f"  unexpected {type(e).__name__}: {e}", file=sys.stderr)
        if (i + 1) % (n // 4) == 0:
            marks.append(rss_mib())
    return {"calls": n + warm, "rss_mib": marks, "errors": errors}


def _refusing(fn: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except (ValueError, TypeError):
            return
        raise AssertionError("a bad call was accepted")

    return call


# --------------------------------------------------------------------------
# Cache lifecycles
# --------------------------------------------------------------------------


def cache_lifecycle(rng: np.random.Generator, kind: int) -> None:
    batch, heads, d = 2, 2, 16
    if kind == 0:
        cache = ferroattn.KVCache(batch, heads, d, capacity=64)
    elif kind == 1:
        cache = ferroattn.KVCache(batch, heads, d, window=8, sinks=2, max_rollback=2)
    elif kind == 2:
        cache = ferroattn.KVCache(batch, heads, d, capacity=64, dtype="int8")
    else:
        cache = ferroattn.KVCache(batch, heads, d, capacity=64, dtype="float16", value_dim=8)
    x = rng.standard_normal((batch, heads, 12, d)).astype(F32)
    v = x[..., : cache.value_dim]
    cache.step(x[:, :, :5].repeat(2, axis=1), x[:, :, :5], v[:, :, :5])
    for t in range(5, 9):
        cache.step(x[:, :, t : t + 1], x[:, :, t : t + 1], v[:, :, t : t + 1])
    cache.rollback(2)
    cache.append(x[:, :, 9:11], v[:, :, 9:11], lengths=[2, 1])
    cache.keys(0)
    cache.values(1)
    cache.reset(1)
    cache.step(x[:, :, 11:12], x[:, :, 11:12], v[:, :, 11:12], lengths=[1, 0])


def lifecycles(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    for i in range(min(200, n)):
        cache_lifecycle(rng, i % 4)
    before = rss_mib()
    for i in range(n):
        cache_lifecycle(rng, i % 4)
    return {"lifecycles": n, "rss_mib": [before, rss_mib()]}


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------


def decode_run(seed: int) -> np.ndarray:
    """One sequence decoded token by token through a cache of this thread's own."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 24, 32)).astype(F32)
    cache = ferroattn.KVCache(1, 2, 32, capacity=24, dtype="int8" if seed % 2 else "float32")
    outs = [
        cache.step(x[:, :, t : t + 1], x[:, :, t : t + 1], x[:, :, t : t + 1]) for t in range(24)
    ]
    return np.concatenate(outs, axis=2)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return np.array_equal(a, b, equal_nan=True)


def threads_run(n_threads: int, seconds: float, seed: int) -> dict[str, Any]:
    calls = make_calls(seed) + [(f"decode {s}", lambda s=s: decode_run(s)) for s in range(4)]
    expected = [fn() for _, fn in calls]
    counts = [0] * n_threads
    mismatches: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        rng = random.Random(seed + i)
        while time.monotonic() < stop:
            j = rng.randrange(len(calls))
            try:
                got = calls[j][1]()
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{calls[j][0]}: {type(e).__name__}: {e}")
                continue
            counts[i] += 1
            if not _same(got, expected[j]):
                with lock:
                    mismatches.append(calls[j][0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"calls": sum(counts), "mismatches": mismatches, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10k calls, 2k caches, 8 x 3 s")
    p.add_argument("--calls", type=int, help="mixed calls (default 100000; quick 10000)")
    p.add_argument("--caches", type=int, help="cache lifecycles (default 20000; quick 2000)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, help="threads phase (default 20; quick 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-growth-mib", type=float, default=64.0)
    args = p.parse_args(argv)
    n_calls = args.calls or (10_000 if args.quick else 100_000)
    n_caches = args.caches or (2_000 if args.quick else 20_000)
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    print(
        f"ferroattn {ferroattn.__version__}, isa {ferroattn.info()['isa']}, "
        f"{ferroattn.get_num_threads()} kernel threads"
    )

    t0 = time.perf_counter()
    mixed = mixed_calls(n_calls, args.seed)
    marks = ", ".join(f"{m:.1f}" for m in mixed["rss_mib"])
    growth_calls = mixed["rss_mib"][-1] - mixed["rss_mib"][0]
    print(
        f"mixed calls: {mixed['calls']} in {time.perf_counter() - t0:.1f} s, RSS MiB after "
        f"warm-up and each quarter: {marks} (delta {growth_calls:+.1f}), "
        f"unexpected exceptions: {mixed['errors']}"
    )

    t0 = time.perf_counter()
    life = lifecycles(n_caches, args.seed)
    growth_life = life["rss_mib"][1] - life["rss_mib"][0]
    print(
        f"cache lifecycles: {life['lifecycles']} in {time.perf_counter() - t0:.1f} s, RSS MiB "
        f"{life['rss_mib'][0]:.1f} -> {life['rss_mib'][1]:.1f} (delta {growth_life:+.1f})"
    )

    thr = threads_run(args.threads, seconds, args.seed)
    print(
        f"threads: {args.threads} x {seconds:g} s, {thr['calls']} calls, "
        f"{len(thr['mismatches'])} mismatches, {len(thr['failures'])} exceptions"
    )
    for what in sorted(set(thr["mismatches"])):
        print(f"  mismatch: {what} x{thr['mismatches'].count(what)}")
    for what in sorted(set(thr["failures"]))[:10]:
        print(f"  exception: {what}")

    bad = (
        mixed["errors"]
        or thr["mismatches"]
        or thr["failures"]
        or max(growth_calls, growth_life) > args.max_growth_mib
    )
    print("FAIL" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
