"""How every candidate is checked and timed.

Accuracy first: each candidate runs once and its output is compared with its reference
(ferroattn's output, or a float64 reference) by the relative Frobenius error; one that fails is
reported and never timed. Then all the candidates that passed are warmed up and run
round-robin in one process, each repeat starting with a different one, so that slow drifts of
the machine (clock, other load) hit all of them alike; garbage collection is off while timing,
and the time is ``perf_counter`` around one call, allocation of the result included.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .env import BenchError, short

FA = "ferroattn"
# Relative Frobenius error allowed, by the narrowest dtype a candidate stores or computes in.
RTOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2, "int8": 5e-2}


@dataclass
class Cand:
    """One thing to time.

    ``fn`` returns an output comparable with ``refs[ref]`` within ``tol`` (after ``convert``);
    a ``ref`` missing from the references makes this candidate's output that reference.
    ``setup`` runs untimed before every call. ``fn`` None: not runnable, ``status`` says why.
    A ``required`` candidate that raises stops the run instead of being reported.
    """

    name: str
    fn: Callable[[], Any] | None = None
    status: str = "ok"
    ref: str | None = FA
    tol: float = RTOL["float32"]
    setup: Callable[[], None] | None = None
    convert: Callable[[Any], np.ndarray] | None = None
    required: bool = False


def to_numpy(x: Any) -> np.ndarray:
    """A result as a float32/float64 NumPy array: (out, lse) tuples, torch tensors, low
    precision dtypes."""
    if isinstance(x, tuple):  # (out, lse)
        x = x[0]
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype != np.float64 and x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def rel_frobenius(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref||_F / ||ref||_F, in float64."""
    x64 = x.astype(np.float64, copy=False)
    r64 = ref.astype(np.float64, copy=False)
    denom = float(np.linalg.norm(r64))
    num = float(np.linalg.norm(x64 - r64))
    return num / denom if denom > 0 else num


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def check(
    cands: list[Cand], refs: dict[str, np.ndarray]
) -> tuple[dict[str, dict[str, Any]], list[Cand], list[str]]:
    """Runs each candidate once against its reference. Returns the per-candidate results
    (``status``, ``rel_err``), the candidates to time, and the names of those whose output
    disagreed with their reference (a peer that raised is reported, not counted there)."""
    res: dict[str, dict[str, Any]] = {}
    live: list[Cand] = []
    failed: list[str] = []
    for c in cands:
        if c.fn is None:
            res[c.name] = {"status": c.status}
            continue
        if c.setup:
            c.setup()
        try:
            out = c.fn()
            arr = to_numpy(c.convert(out) if c.convert else out)
        except Exception as exc:  # noqa: BLE001 (a peer that fails is reported, not fatal)
            if c.required:
                raise
            res[c.name] = {"status": f"failed: {short(exc)}"}
            continue
        del out
        if c.ref is None or c.ref not in refs:
            refs[c.ref or c.name] = arr
            if not np.all(np.isfinite(arr)):
                raise BenchError(f"{c.name} output has non-finite values", 1)
            res[c.name] = {"status": "ok", "rel_err": None}
        else:
            ref = refs[c.ref]
            if arr.shape != ref.shape:
                res[c.name] = {"status": f"failed: shape {arr.shape} != {ref.shape}"}
                failed.append(c.name)
                continue
            err = rel_frobenius(arr, ref)
            if not err < c.tol:
                res[c.name] = {
                    "status": f"ACCURACY CHECK FAILED: rel err {err:.2e} >= {c.tol:g}",
                    "rel_err": err,
                }
                failed.append(c.name)
                continue
            res[c.name] = {"status": "ok", "rel_err": err}
        live.append(c)
    return res, live, failed


def round_robin(
    live: list[Cand],
    *,
    repeats: int,
    warmup: int,
    before: Callable[[], None] | None = None,
    after: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Times ``repeats`` calls of each candidate (ms), interleaved with a rotating start, after
    ``warmup`` untimed calls each. ``before`` runs untimed before every timed call (a cache
    flush), ``after(name)`` after it (the pause that lets spinning worker threads stop)."""
    for _ in range(warmup):
        for c in live:
            if c.setup:
                c.setup()
            c.fn()  # type: ignore[misc]
    samples: dict[str, list[float]] = {c.name: [] for c in live}
    with gc_off():
        for r in range(repeats):
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for c in order:
                if c.setup:
                    c.setup()
                if before:
                    before()
                t0 = time.perf_counter()
                result = c.fn()  # type: ignore[misc]
                dt = time.perf_counter() - t0
                del result
                samples[c.name].append(dt * 1e3)
                if after:
                    after(c.name)
    return samples


def summary(ms: list[float]) -> dict[str, Any]:
    """Median, min, max, spread ((max - min) / median) and the samples, in ms."""
    med = statistics.median(ms)
    return {
        "median_ms": med,
        "min_ms": min(ms),
        "max_ms": max(ms),
        "spread": (max(ms) - min(ms)) / med if med > 0 else None,
        "samples_ms": ms,
    }


def sleeper(gap_ms: float) -> Callable[[str], None] | None:
    """An ``after`` for :func:`round_robin` that sleeps ``gap_ms`` (None for no pause)."""
    if gap_ms <= 0:
        return None
    return lambda _name: time.sleep(gap_ms / 1e3)


def check_and_time(
    cands: list[Cand],
    refs: dict[str, np.ndarray],
    *,
    repeats: int,
    warmup: int,
    gap_ms: float,
    flush: Callable[[], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """:func:`check`, then :func:`round_robin` with an idle ``gap_ms`` pause after each call.
    Returns per-candidate results and whether every check passed."""
    res, live, failed = check(cands, refs)
    samples = round_robin(live, repeats=repeats, warmup=warmup, before=flush, after=sleeper(gap_ms))
    for name, ms in samples.items():
        res[name].update(summary(ms))
    return res, not failed


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    """Mean µs per call over ``calls`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


class Flusher:
    """Evicts the CPU caches by reading a buffer larger than them (untimed), on ``threads``
    Python threads (NumPy releases the GIL), or on the case's thread count when ``threads``
    is 0.

    A real decode step reads each layer's cache from memory (the other layers have evicted
    it); without a flush a cache of tens of MiB would be served partly from the last-level
    cache, above memory speed. With one thread the other cores idle through the flush (and
    through an idle gap); on a virtual machine an idle CPU can take milliseconds to run a
    woken thread again (measured: 0.7 to 4.8 ms), which every multi-threaded candidate pays.
    Reading on all of them keeps the cores busy up to the call, as the multi-threaded rest of
    a model would.
    """

    def __init__(self, mib: int, threads: int = 1) -> None:
        self.buf = np.ones((mib << 20) // 4, dtype=np.float32) if mib > 0 else None
        self.threads = threads

    def __call__(self, case_threads: int = 1) -> None:
        if self.buf is not None:
            self._read(self.buf, self.threads or case_threads, 0.0)

    def busy(self, ms: float, case_threads: int) -> float:
        """Reads memory on ``case_threads`` threads for ``ms`` milliseconds (at least one pass)
        and returns the read rate in GB/s: the machine's bandwidth right after a timed call.

        A decode step follows the rest of a model's layer, which keeps the cores busy; an
        idle pause instead lets the virtual CPUs of a VM go idle, and an idle one came back to
        ferroattn's helper thread milliseconds late, or not within the call at all
        (``docs/performance.md``, "Benchmark protocol"). The peers' worker threads, which spin
        after a call (torch ~9 ms, ORT ~49 ms), have stopped by the end of a 100 ms gap either
        way. Without a flush buffer (cache-warm runs) a 256 KiB one is read, which leaves the
        last-level cache mostly as it was (and its rate is not a memory bandwidth).
        """
        buf = self.buf if self.buf is not None else np.ones(1 << 16, dtype=np.float32)
        return self._read(buf, case_threads, ms)

    @staticmethod
    def _read(buf: np.ndarray, threads: int, ms: float) -> float:
        """Reads ``buf`` split over ``threads`` threads (the caller's one of them), each its
        part once and then again until ``ms`` milliseconds have passed; returns the sum of
        the threads' read rates (GB/s)."""
        end = time.perf_counter() + ms / 1e3
        rates: list[float] = []

        def read(part: np.ndarray) -> None:
            t0 = time.perf_counter()
            np.maximum.reduce(part)
            passes = 1
            while time.perf_counter() < end:
                np.maximum.reduce(part)
                passes += 1
            rates.append(passes * part.nbytes / (time.perf_counter() - t0) / 1e9)

        parts = np.array_split(buf, max(threads, 1))
        workers = [threading.Thread(target=read, args=(part,)) for part in parts[1:]]
        for w in workers:
            w.start()
        read(parts[0])
        for w in workers:
            w.join()
        return sum(rates)
