"""Decode cells: ferroattn's KV cache vs torch SDPA vs ONNX Runtime GQA (``bench_decode.py``).

One new query token attends over a cache of L tokens: B=1, 32 query heads, 8 and 32 KV
heads, head_dim 128, L = 4096 and 32768, at 2 threads, for each cache dtype. Decode is
memory-bound, so next to the times the sweep measures the machine's memory-read bandwidth in
the same run (before the first cell and after every cell; the best is the reference) and
reports every candidate's K/V read rate (bytes of its K/V storage / time) as GB/s and as a % of
it; the project's target is >= 80% for ferroattn's cache rows. Each call is also set against
the bandwidth read right after it (``% adj``), since this kind of machine's bandwidth moves
from one minute to the next.

Candidates are interleaved round-robin, warmed up, the CPU caches are flushed before each
timed call, the cores are kept busy between calls (as the rest of a model would), and the
median of the repeats is reported. Every output is checked first against a float64 reference;
a candidate that disagrees stops the run (exit status 1). Each ferroattn cache row also gets
an in-cache time: the call over caches small enough to stay in the last-level cache, scaled to
L, which tells a memory-bound miss from an arithmetic-bound one. Results go to
``benches/results/decode-<date>.{md,json}`` (``decode-<date>-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import statistics
import time
from functools import partial
from typing import Any

import numpy as np

from ..argtypes import add_run_options, new_parser, non_negative, positive, positive_list
from ..ceilings import Bandwidth
from ..env import (
    BenchError,
    Peers,
    run_main,
    short,
    start,
    thread_limits,
)
from ..peers import ORT_GQA, TORCH, kv_bytes, ort_gqa_decode_cand, reference64, torch_cand
from ..tables import write_results
from ..timing import RTOL, Cand, Flusher, check, round_robin, summary
from . import decode_report as report

PROG = "bench_decode"
SCHEMA = "ferroattn-bench-decode/1"
CACHE_DTYPES = ("float32", "float16", "int8")
BW_REPEATS = 8  # reads of the array per kernel and measurement; the fastest counts
FA_CACHE = report.FA_CACHE
FA_PLAIN = report.FA_PLAIN


def _parse_dtypes(text: str) -> list[str]:
    values = [t for t in text.replace(" ", "").split(",") if t]
    bad = [t for t in values if t not in CACHE_DTYPES]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"dtypes must be a comma-separated subset of {','.join(CACHE_DTYPES)}, got {text!r}"
        )
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        PROG,
        "Decode attention: ferroattn KVCache vs torch SDPA vs ONNX Runtime GQA.",
        "H=8 D=32, L=256, KV heads 2,8, 64 MiB bandwidth array, 1 repeat "
        "(explicit options still win)",
    )
    p.add_argument("--heads", type=positive, default=None, help="query heads H [32]")
    p.add_argument("--dim", type=positive, default=None, help="head dim D [128]")
    p.add_argument(
        "--kv-heads",
        type=positive_list("KV head counts"),
        default=None,
        help="KV head counts, e.g. 8,32 [8,32]",
    )
    p.add_argument(
        "--lengths",
        type=positive_list("cache lengths"),
        default=None,
        help="cache lengths L [4096,32768]",
    )
    p.add_argument(
        "--dtypes",
        type=_parse_dtypes,
        default=list(CACHE_DTYPES),
        help="ferroattn cache dtypes (float16 also adds torch's float16 row)",
    )
    p.add_argument(
        "--threads", type=positive_list("thread counts"), default=[2], help="thread counts"
    )
    add_run_options(p, repeats="9; quick 1", files="decode-<date>.{md,json}")
    p.add_argument(
        "--gap-mode",
        choices=("busy", "idle"),
        default="busy",
        help="busy: the pause is spent reading memory on as many threads as the case, as "
        "the rest of a model would run between decode steps; idle: the threads sleep "
        "(the protocol of results before 2026-11-24 noon) [busy]",
    )
    p.add_argument(
        "--flush-mib",
        type=non_negative,
        default=None,
        help="MiB read (untimed) before each timed call to evict the CPU caches; "
        "0 = no flush (cache-warm timings) [256; 0 with --quick]",
    )
    p.add_argument(
        "--flush-threads",
        type=non_negative,
        default=None,
        help="threads that read the flush buffer; 0 = as many as the case uses "
        "[0 with --gap-mode busy, 1 with idle]",
    )
    p.add_argument(
        "--resident-mib",
        type=non_negative,
        default=None,
        help="K/V MiB of the cache-resident runs that estimate each ferroattn cache row's "
        "in-cache time (its speed when memory is not the limit); 0 = skip [8]",
    )
    p.add_argument(
        "--bw-mib",
        type=positive,
        default=None,
        help="size of the array of the bandwidth measurement [1024; 64 with --quick]",
    )
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The options with the defaults ``--quick`` and ``--gap-mode`` change resolved."""
    small = args.quick

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    cfg: dict[str, Any] = {
        "quick": small,
        "heads": pick(args.heads, 8 if small else 32),
        "kv_heads": pick(args.kv_heads, [2, 8] if small else [8, 32]),
        "lengths": pick(args.lengths, [256] if small else [4096, 32768]),
        "dim": pick(args.dim, 32 if small else 128),
        "dtypes": args.dtypes,
        "threads": args.threads,
        "repeats": pick(args.repeats, 1 if small else 9),
        "warmup": pick(args.warmup, 1),
        "gap_ms": pick(args.gap_ms, 0.0 if small else 100.0),
        "gap_mode": args.gap_mode,
        "flush_mib": pick(args.flush_mib, 0 if small else 256),
        "flush_threads": pick(args.flush_threads, 0 if args.gap_mode == "busy" else 1),
        "bw_mib": pick(args.bw_mib, 64 if small else 1024),
        "resident_mib": pick(args.resident_mib, 8),
        "seed": args.seed,
        "rtol": {k: RTOL[k] for k in CACHE_DTYPES},
        "target_pct": report.TARGET_PCT,
    }
    bad = [h for h in cfg["kv_heads"] if cfg["heads"] % h]
    if bad:
        raise BenchError(f"--kv-heads {bad} do not divide --heads {cfg['heads']}")
    return cfg


def cache_kv_bytes(cache: Any, dtype: str, hkv: int, length: int, d: int) -> tuple[int, str]:
    """The cache's own account of its K/V bytes when it gives one, else the contract's."""
    for attr in ("kv_nbytes", "nbytes"):
        value = getattr(cache, attr, None)
        if callable(value):
            with contextlib.suppress(Exception):
                value = value()
        if isinstance(value, int | np.integer) and value > 0:
            capacity = getattr(cache, "capacity", length)
            if isinstance(capacity, int) and capacity > length:  # scale to the filled part
                value = value * length // capacity
            return int(value), f"cache.{attr}"
    return kv_bytes(dtype, hkv, length, d), "computed"


def make_cache(fa: Any, dtype: str, k: np.ndarray, v: np.ndarray) -> Any:
    """A ``KVCache`` of ``dtype`` holding exactly ``k`` and ``v``."""
    _, hkv, length, d = k.shape
    cache = fa.KVCache(1, hkv, d, length, dtype=dtype)
    cache.append(k, v)
    return cache


def in_cache_ms(
    fa: Any, dt: str, h: int, hkv: int, d: int, length: int, mib: int, rng: np.random.Generator
) -> dict[str, Any] | None:
    """The ferroattn cache's time per call at ``length`` tokens when memory is not the limit.

    Two caches small enough to stay in the last-level cache (``l2`` tokens, at most ``mib``
    MiB of K/V, and ``l2 / 2``) are timed back to back, alternated, without flushes or gaps;
    the slope between their medians (per token, so fixed per-call costs cancel) times
    ``length`` is the estimate. None when ``mib`` is 0 or too small for 32 tokens.
    """
    l2 = min(length, (mib << 20) // kv_bytes(dt, hkv, 1, d)) // 32 * 32
    if l2 < 32:
        return None
    l1 = l2 // 2
    q = rng.standard_normal((1, h, 1, d), dtype=np.float32)
    calls_of = []
    for n in (l1, l2):
        k, v = (rng.standard_normal((1, hkv, n, d), dtype=np.float32) for _ in "kv")
        calls_of.append(partial(make_cache(fa, dt, k, v).attend, q))
    samples: list[list[float]] = [[], []]
    calls = 0
    start = time.perf_counter()
    # At least 31 calls each; more while under ~0.3 s, so short calls get many samples.
    while calls < 31 or (calls < 401 and time.perf_counter() - start < 0.3):
        for i, fn in enumerate(calls_of):
            t0 = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - t0) * 1e3)
        calls += 1
    m1, m2 = (statistics.median(x[len(x) // 10 :]) for x in samples)  # first tenth: warm-up
    per_token = max(m2 - m1, 0.0) / (l2 - l1)
    return {"in_cache_ms": per_token * length, "resident_tokens": [l1, l2], "calls": calls}


def _candidates(
    fa: Any,
    peers: Peers,
    cfg: dict[str, Any],
    threads: int,
    qkv: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
    notes: list[str],
) -> tuple[list[Cand], dict[str, dict[str, Any]], dict[str, np.ndarray], list[Any]]:
    """The cell's candidates (named ``<kind>/<dtype>``), each one's kind, dtype and K/V bytes,
    the references, and the caches to keep alive while they run."""
    q, k, v = qkv
    _, hkv, length, d = k.shape
    cands: list[Cand] = []
    meta: dict[str, dict[str, Any]] = {}
    caches: list[Any] = []

    def add(cand: Cand, kind: str, dtype: str, nbytes: int | None = None) -> None:
        cand.name = f"{kind}/{dtype}"
        cands.append(cand)
        meta[cand.name] = {"kind": kind, "dtype": dtype, "kv_bytes": nbytes}

    for dt in cfg["dtypes"]:
        try:
            cache = make_cache(fa, dt, k, v)
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            add(Cand("", status=f"failed: {short(exc)}"), FA_CACHE, dt)
            continue
        caches.append(cache)
        nbytes, how = cache_kv_bytes(cache, dt, hkv, length, d)
        add(Cand("", partial(cache.attend, q), ref="past", tol=RTOL[dt]), FA_CACHE, dt, nbytes)
        meta[f"{FA_CACHE}/{dt}"]["kv_bytes_source"] = how
    plain = Cand("", partial(fa.attention, q, k, v), ref="past", required=True)
    add(plain, FA_PLAIN, "float32", kv_bytes("float32", hkv, length, d))
    for dt in ["float32"] + (["float16"] if "float16" in cfg["dtypes"] else []):
        cand = torch_cand(peers, q, k, v, gqa=True, dtype=dt)
        cand.ref, cand.tol = "past", RTOL[dt]
        add(cand, TORCH, dt, kv_bytes(dt, hkv, length, d))
    refs = {"past": reference64(q, k, v)}
    why = peers.ort()[2]
    if why:
        add(Cand("", status=why), ORT_GQA, "float32")
    else:
        k_new, v_new = (rng.standard_normal((1, hkv, 1, d), dtype=np.float32) for _ in "kv")
        cand = ort_gqa_decode_cand(peers, threads, q, k, v, k_new, v_new, notes)
        add(cand, ORT_GQA, "float32", kv_bytes("float32", hkv, length + 1, d))
        refs["past+new"] = reference64(
            q, np.concatenate([k, k_new], axis=2), np.concatenate([v, v_new], axis=2)
        )
    return cands, meta, refs, caches


def run_cell(
    fa: Any,
    peers: Peers,
    cfg: dict[str, Any],
    hkv: int,
    length: int,
    threads: int,
    flush: Flusher,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One (KV heads, L, threads) cell: every candidate checked, then timed with a flush
    before each call and the gap (busy or idle) after it."""
    h, d = cfg["heads"], cfg["dim"]
    q = rng.standard_normal((1, h, 1, d), dtype=np.float32)
    k, v = (rng.standard_normal((1, hkv, length, d), dtype=np.float32) for _ in range(2))
    cell: dict[str, Any] = {
        "threads": threads,
        "B": 1,
        "H": h,
        "Hkv": hkv,
        "L": length,
        "D": d,
        "notes": [],
        "candidates": {},
    }
    # The busy gap's read rate after each call: the bandwidth the machine had then.
    gaps: dict[str, list[float]] = {}

    def after(name: str) -> None:
        if cfg["gap_ms"] <= 0:
            return
        if cfg["gap_mode"] == "busy":
            gaps.setdefault(name, []).append(flush.busy(cfg["gap_ms"], threads))
        else:
            time.sleep(cfg["gap_ms"] / 1e3)

    with thread_limits(threads, fa, peers, cell["notes"]):
        qkv = (q, k, v)
        cands, meta, refs, caches = _candidates(fa, peers, cfg, threads, qkv, rng, cell["notes"])
        res, live, failed = check(cands, refs)
        if failed:
            bad = failed[0]
            raise BenchError(
                f"accuracy check failed: {bad} vs float64 reference: {res[bad]['status']} "
                f"(threads={threads}, H={h} Hkv={hkv} L={length} D={d})",
                1,
            )
        del refs
        samples = round_robin(
            live,
            repeats=cfg["repeats"],
            warmup=cfg["warmup"],
            before=partial(flush, threads),
            after=after,
        )
        caches.clear()
        live.clear()
        if cfg["resident_mib"]:
            for name, m in meta.items():
                if m["kind"] == FA_CACHE and name in samples:
                    est = in_cache_ms(fa, m["dtype"], h, hkv, d, length, cfg["resident_mib"], rng)
                    if est is not None:
                        res[name].update(est)
    for name, m in meta.items():
        res[name] = {"kind": m["kind"], "dtype": m["dtype"], **res[name]}
        if "kv_bytes_source" in m:
            res[name]["kv_bytes_source"] = m["kv_bytes_source"]
    medians = {name: statistics.median(ms) for name, ms in samples.items()}
    torch_ms = medians.get(f"{TORCH}/float32")
    ort_ms = medians.get(f"{ORT_GQA}/float32")
    for name, ms in samples.items():
        med, nbytes = medians[name], meta[name]["kv_bytes"]
        is_fa = meta[name]["kind"] in (FA_CACHE, FA_PLAIN)
        # Each call's rate over the bandwidth read right after it, so that the machine's
        # swings hit both sides of the ratio alike. Only with a busy gap over a buffer
        # larger than the caches.
        adjacent = None
        got = gaps.get(name, [])
        if len(got) == len(ms) and cfg["flush_mib"] > 0 and all(ms):
            adjacent = [nbytes / (t * 1e-3) / 1e9 / g for t, g in zip(ms, got, strict=True)]
        res[name].update(summary(ms))
        res[name].update(
            {
                "kv_bytes": nbytes,
                "gbs": nbytes / (med * 1e-3) / 1e9 if med > 0 else None,
                "torch_over_fa": torch_ms / med if is_fa and torch_ms and med > 0 else None,
                "ort_over_fa": ort_ms / med if is_fa and ort_ms and med > 0 else None,
                "adjacent_gbs": statistics.median(got) if adjacent else None,
                "pct_adjacent": 100.0 * statistics.median(adjacent) if adjacent else None,
            }
        )
    cell["candidates"] = res
    return cell


def main(argv: list[str] | None = None) -> int:
    hint = " (try smaller --lengths)"
    return run_main(PROG, lambda: run(build_parser().parse_args(argv)), oom_hint=hint)


def run(args: argparse.Namespace) -> int:
    cfg = config(args)
    fa, peers, env = start(("torch", "onnxruntime", "onnx", "threadpoolctl"))
    cpus = os.cpu_count() or 1
    print("measuring memory-read bandwidth ...", flush=True)
    bandwidth = Bandwidth(cfg["bw_mib"], BW_REPEATS)
    for n in cfg["threads"]:
        bandwidth.measure(n)
    cfg["bandwidth"] = bandwidth.data
    print()
    print("\n".join(report.header(env, cfg)))
    if max(cfg["threads"]) > cpus:
        print(f"warning: more threads requested than the {cpus} logical CPUs")
    print(flush=True)
    flush = Flusher(cfg["flush_mib"], cfg["flush_threads"])
    rng = np.random.default_rng(cfg["seed"])
    results = []
    for hkv in cfg["kv_heads"]:
        for length in cfg["lengths"]:
            for threads in cfg["threads"]:
                cell = run_cell(fa, peers, cfg, hkv, length, threads, flush, rng)
                results.append(cell)
                print(f"  done Hkv={hkv} L={length} threads={threads}: " + report.done(cell))
                for note in cell["notes"]:
                    print(f"  note: {note}")
                bandwidth.measure(threads)
    del flush
    for cell in results:
        report.apply_bandwidth(cell, bandwidth.gbs(cell["threads"]))

    header = report.header(env, cfg)
    rows = report.table_rows(results)
    summary_lines = report.target_summary(results)
    print()
    print("\n".join(line for line in header if line.startswith("memory-read bandwidth")))
    print()
    print("\n".join(report.text_table(rows)), end="\n\n")
    print("\n".join(report.footnotes(cfg["flush_mib"] > 0) + summary_lines))
    if args.quick:
        print("--quick: a smoke test of the script; these timings are not a measurement.")
    if not args.no_save:
        cfg["bandwidth"] = bandwidth.as_json()
        payload = {
            "schema": SCHEMA,
            "config": cfg,
            "env": env,
            "target_summary": summary_lines,
            "results": results,
        }
        md = report.markdown(header, rows) + "\n" + "\n".join(summary_lines) + "\n"
        stem = f"decode-{_dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
        json_path, md_path = write_results(args.out_dir, stem, md, payload)
        print(f"\nwrote {md_path}\nwrote {json_path}")
    return 0
