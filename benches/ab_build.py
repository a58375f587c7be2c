"""Compare two builds of the ferroattn extension, case by case, in alternating processes.

    python benches/ab_build.py A_DIR B_DIR [--rounds N] [--seconds S] [--cases a,b,...]

A_DIR and B_DIR are directories that hold an importable ``ferroattn`` with its compiled
extension, such as the ``python/`` directory of two checkouts each built in place (one at the
base commit, from ``git worktree add``). Both builds should use the same Cargo profile.

Each round runs every case once per build, each in a fresh process, alternating which build
goes first (AB, BA, AB, ...), so slow drifts of the machine fall on both builds alike. A
process builds the case's inputs (the same seeds for both builds), calls it a few times to warm
up, then calls it for ``--seconds`` and reports its best and its median call. The table gives,
per build, the median over processes of each, and their ratio B/A. On a shared machine the best
call is the steadier figure. Two builds loaded into one process were tried and disturb each
other (an A/A comparison of one build against a copy of itself came out 4-5% apart on a
memory-bound decode), which separate processes do not.

Before timing, each process hashes its case's output; the last column says whether the two
builds gave bit-identical results (expected of a change that keeps the arithmetic order).

With ``--clock cpu`` and ``FERROATTN_NUM_THREADS=1`` calls are timed in the process's CPU
time, which leaves out the time the process waits for a core: the figure to compare on a
machine that other work keeps busy.

Cases (2 threads unless FERROATTN_NUM_THREADS says otherwise): prefill B=1 H=16 N=2048 fp32,
D=64 dense and causal, D=128; decode of one token through ``ferroattn.KVCache`` with 32768
cached tokens, D=128, 32 query / 8 KV heads in fp32, fp16, int8 and 32 / 32 heads in fp32;
``attention_weights`` H=16 N=1024 D=64; a tiny call (B=1 H=1 N=16 D=32 fp32), its cost
the per-call overhead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

CASES = [
    "prefill_d64",
    "prefill_d64_causal",
    "prefill_d128",
    "decode_fp32",
    "decode_fp16",
    "decode_int8",
    "decode_mha_fp32",
    "weights_n1024",
    "tiny_fp32",
]


def make(case: str, fa: Any, np: Any) -> Callable[[], Any]:
    """The call of ``case`` on the ``ferroattn`` module ``fa``, inputs made (seeded)."""
    rng = np.random.default_rng(0)

    def rnd(*shape: int) -> Any:
        return rng.standard_normal(shape, dtype=np.float32)

    if case.startswith("prefill"):
        d = 128 if "d128" in case else 64
        q, k, v = rnd(1, 16, 2048, d), rnd(1, 16, 2048, d), rnd(1, 16, 2048, d)
        causal = "causal" in case
        return lambda: fa.attention(q, k, v, causal=causal)
    if case.startswith("decode"):
        hq, hkv = (32, 32) if "mha" in case else (32, 8)
        dtype = case.rsplit("_", 1)[1].replace("fp", "float")
        length, d, step = 32768, 128, 4096
        cache = fa.KVCache(1, hkv, d, length + 1, dtype=dtype)
        for _ in range(0, length, step):
            cache.append(rnd(1, hkv, step, d), rnd(1, hkv, step, d))
        cache.append(rnd(1, hkv, 1, d), rnd(1, hkv, 1, d))
        q = rnd(1, hq, 1, d)
        return lambda: cache.attend(q)
    if case == "tiny_fp32":  # a call whose cost is the per-call overhead
        q, k, v = rnd(1, 1, 16, 32), rnd(1, 1, 16, 32), rnd(1, 1, 16, 32)
        return lambda: fa.attention(q, k, v)
    if case == "weights_n1024":
        q, k = rnd(1, 16, 1024, 64), rnd(1, 16, 1024, 64)
        return lambda: fa.attention_weights(q, k)
    raise SystemExit(f"unknown case {case!r}; known: {', '.join(CASES)}")


def child(pydir: str, case: str, reps: int, seconds: float, clock: str) -> None:
    """Times ``case`` on the build in ``pydir``; prints one JSON line."""
    sys.path.insert(0, pydir)
    import numpy as np

    import ferroattn as fa

    if "FERROATTN_NUM_THREADS" not in os.environ:
        fa.set_num_threads(2)
    run = make(case, fa, np)
    digest = hashlib.sha256(np.ascontiguousarray(run()).tobytes()).hexdigest()
    for _ in range(2):
        run()
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < seconds and len(times) < 1000):
        t = now()
        run()
        times.append(now() - t)
    best, median = min(times), statistics.median(times)
    print(json.dumps({"best": best, "median": median, "calls": len(times), "digest": digest}))


def main() -> None:
    p = argparse.ArgumentParser(description="Compare two builds of ferroattn, case by case.")
    p.add_argument("a", nargs="?", help="directory holding build A's ferroattn package")
    p.add_argument("b", nargs="?", help="directory holding build B's ferroattn package")
    p.add_argument("--rounds", type=int, default=5, help="processes per build and case")
    p.add_argument("--reps", type=int, default=5, help="calls per process, at least")
    p.add_argument("--seconds", type=float, default=2.0, help="time per process to keep calling")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, default all")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or the process's CPU time (with FERROATTN_NUM_THREADS=1: unaffected "
        "by time the process waits for a core on a busy machine)",
    )
    p.add_argument("--child", nargs=2, metavar=("DIR", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.reps, args.seconds, args.clock)
        return
    if not (args.a and args.b):
        p.error("give the directories of both builds")
    cases = args.cases.split(",")
    got: dict[tuple[str, str], list[dict[str, Any]]] = {(c, w): [] for c in cases for w in "AB"}
    for r in range(args.rounds):
        for c in cases:
            builds = [("A", args.a), ("B", args.b)]
            for which, pydir in builds if r % 2 == 0 else builds[::-1]:
                cmd = [sys.executable, __file__, "--child", pydir, c]
                cmd += ["--reps", str(args.reps), "--seconds", str(args.seconds)]
                cmd += ["--clock", args.clock]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                got[(c, which)].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def med(c: str, w: str, key: str) -> float:
        return statistics.median(x[key] for x in got[(c, w)])

    head = f"{'case':20} {'A best':>9} {'B best':>9} {'B/A':>6}  {'A median':>9} {'B median':>9}"
    print(f"{head} {'B/A':>6}  same output   (ms)")
    for c in cases:
        a, b, am, bm = (
            med(c, "A", "best"),
            med(c, "B", "best"),
            med(c, "A", "median"),
            med(c, "B", "median"),
        )
        same = {x["digest"] for x in got[(c, "A")] + got[(c, "B")]}
        row = f"{c:20} {a * 1e3:9.2f} {b * 1e3:9.2f} {b / a:6.3f}  {am * 1e3:9.2f} {bm * 1e3:9.2f}"
        print(f"{row} {bm / am:6.3f}  {'yes' if len(same) == 1 else 'NO'}")
    print("best call of each process (ms):")
    for c in cases:
        for w in "AB":
            print(f"  {c:20} {w}: " + " ".join(f"{x['best'] * 1e3:.2f}" for x in got[(c, w)]))


if __name__ == "__main__":
    main()
