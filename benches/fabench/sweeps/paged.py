"""Paged KV cache cells (``bench_paged.py``): what paging costs a decode step, and what one
packed call gains a continuous-batching step.

1. Decode: one query token over L cached tokens (B=1, 32 query / 8 KV heads, D=128, L = 4096
   and 32768), per cache dtype (float16, int8) and block size (16, 64): the contiguous
   ``KVCache.attend``, ``PagedKVCache.attend`` (its blocks interleaved with another
   sequence's, as sequences that grow together get them; head-major blocks, its default) and
   ``paged_attention`` over a shuffled block table (blocks anywhere in the pool), once per
   block layout (``kv_layout`` "nhd": flash-attn's token-major blocks, "hnd": head-major). The
   ratio paged / contiguous is the cost of paging; the project's target is <= 1.1x.
2. Continuous batching: 16 sequences of mixed lengths in one step, some prefilling a
   128-token chunk, the others decoding one token: one ``paged_attention_varlen`` call vs a
   loop of one ``paged_attention`` call per sequence. Reported as the speedup and as the
   effective K/V read rate (bytes of K/V the step reads / time) against the memory-read
   bandwidth measured in the same run.

The protocol is ``bench_decode.py``'s: every candidate checked first (decode: against a
float64 reference; the batching step: the packed call against the loop), then timed
round-robin with the CPU caches flushed before each call and the cores kept busy reading
memory between calls; medians reported. Results go to
``benches/results/paged-<date>.{md,json}`` (``paged-<date>-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
from functools import partial
from typing import Any

import numpy as np

from ..argtypes import add_run_options, new_parser, non_negative, positive, positive_list
from ..ceilings import Bandwidth
from ..env import BenchError, run_main, start, thread_limits
from ..peers import reference64
from ..tables import format_table, markdown_table, write_results
from ..timing import RTOL, Cand, Flusher, check, round_robin, summary

PROG = "bench_paged"
SCHEMA = "ferroattn-bench-paged/1"
DTYPES = ("float16", "int8")
BW_REPEATS = 8
TARGET_RATIO = 1.1  # paged / contiguous decode time
CONTIGUOUS, PAGED_CACHE, PAGED_FN = "KVCache", "PagedKVCache", "paged_attention"
KV_LAYOUTS = ("nhd", "hnd")
PACKED, LOOP = "varlen (one call)", "loop (a call per sequence)"


def _dtypes(text: str) -> list[str]:
    values = [t for t in text.replace(" ", "").split(",") if t]
    if not values or any(t not in DTYPES for t in values):
        raise argparse.ArgumentTypeError(f"dtypes must be among {','.join(DTYPES)}, got {text!r}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        PROG,
        "Paged KV cache: decode vs the contiguous KVCache; a continuous-batching step.",
        "H=8 Hkv=2 D=32, L=256, block size 16, short sequences, 1 repeat, no flush",
    )
    p.add_argument("--heads", type=positive, default=None, help="query heads [32]")
    p.add_argument("--kv-heads", type=positive, default=None, help="KV heads [8]")
    p.add_argument("--dim", type=positive, default=None, help="head dim D [128]")
    p.add_argument(
        "--lengths", type=positive_list("lengths"), default=None, help="decode L [4096,32768]"
    )
    p.add_argument("--block-sizes", type=positive_list("block sizes"), default=None, help="[16,64]")
    p.add_argument("--dtypes", type=_dtypes, default=list(DTYPES), help="cache dtypes")
    p.add_argument("--threads", type=positive, default=2, help="threads [2]")
    p.add_argument(
        "--flush-mib", type=non_negative, default=None, help="MiB read before each call [256]"
    )
    p.add_argument("--bw-mib", type=positive, default=None, help="bandwidth array MiB [1024]")
    add_run_options(p, repeats="9; quick 1", files="paged-<date>.{md,json}")
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    small = args.quick

    def pick(value: Any, default: Any, quick: Any) -> Any:
        return value if value is not None else quick if small else default

    cfg = {
        "quick": small,
        "heads": pick(args.heads, 32, 8),
        "kv_heads": pick(args.kv_heads, 8, 2),
        "dim": pick(args.dim, 128, 32),
        "lengths": pick(args.lengths, [4096, 32768], [256]),
        "block_sizes": pick(args.block_sizes, [16, 64], [16]),
        "dtypes": args.dtypes,
        "threads": args.threads,
        "repeats": pick(args.repeats, 9, 1),
        "warmup": pick(args.warmup, 1, 1),
        "gap_ms": pick(args.gap_ms, 100.0, 0.0),
        "flush_mib": pick(args.flush_mib, 256, 0),
        "bw_mib": pick(args.bw_mib, 1024, 64),
        # The batching step: (context length, new tokens) per sequence.
        "batch": _batch(np.random.default_rng(args.seed), small),
        "seed": args.seed,
        "target_ratio": TARGET_RATIO,
    }
    if cfg["heads"] % cfg["kv_heads"]:
        raise BenchError(f"--kv-heads {cfg['kv_heads']} does not divide --heads {cfg['heads']}")
    return cfg


def _batch(rng: np.random.Generator, small: bool) -> list[tuple[int, int]]:
    """16 sequences: 4 prefilling a chunk (128 tokens; 16 quick) at various depths of their
    prompt, 12 decoding one token after contexts of 1k-8k tokens (64-256 quick)."""
    chunk, lo, hi = (16, 64, 256) if small else (128, 1024, 8192)
    prefill = [(chunk * (i + 1), chunk) for i in range(4)]
    decode = [(int(n), 1) for n in rng.integers(lo, hi + 1, 12)]
    return prefill + decode


def _kv_bytes(cache_dtype: str, hkv: int, tokens: int, d: int) -> int:
    item = {"float16": 2, "int8": 1}[cache_dtype]
    return 2 * hkv * tokens * (d * item + (4 if cache_dtype == "int8" else 0))


def _interleaved(fa: Any, dt: str, bs: int, k: np.ndarray, v: np.ndarray) -> Any:
    """A PagedKVCache holding ``k``/``v`` as sequence 0, its blocks alternating with those of
    a sequence that grew beside it (then freed)."""
    hkv, length, d = k.shape[1:]
    blocks = -(-length // bs)
    cache = fa.PagedKVCache(2 * blocks, bs, hkv, d, dtype=dt)
    cache.add(0)
    cache.add(1)
    for lo in range(0, length, bs):
        hi = min(lo + bs, length)
        cache.append([0, 1], k[:, :, lo:hi].repeat(2, 0), v[:, :, lo:hi].repeat(2, 0))
    cache.free(1)
    return cache


def _shuffled(fa: Any, dt: str, bs: int, k: np.ndarray, v: np.ndarray, table: Any, kv_layout: str):
    """``(k_cache, v_cache, scales)``: ``k``/``v`` written by ``paged_write`` into the blocks
    ``table`` names of a pool twice their size, in ``kv_layout``."""
    _, hkv, length, d = k.shape
    pool = 2 * (-(-length // bs))
    dtype = np.int8 if dt == "int8" else np.float16
    blocks = (pool, bs, hkv) if kv_layout == "nhd" else (pool, hkv, bs)
    kc = np.zeros((*blocks, d), dtype)
    vc = np.zeros((*blocks, d), dtype)
    scales = {}
    if dt == "int8":
        scales = {"k_scale": np.zeros(blocks, np.float32)}
        scales["v_scale"] = np.zeros(blocks, np.float32)
    pos = np.arange(length)
    slots = table[0, pos // bs].astype(np.int64) * bs + pos % bs
    kv = (k[0].swapaxes(0, 1), v[0].swapaxes(0, 1))
    fa.paged.paged_write(kc, vc, *kv, slots, **scales, kv_layout=kv_layout)
    return kc, vc, scales


def decode_cell(fa, cfg, dt, bs, length, flush, rng) -> dict[str, Any]:
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["dim"]
    q = rng.standard_normal((1, h, 1, d), dtype=np.float32)
    k, v = (rng.standard_normal((1, hkv, length, d), dtype=np.float32) for _ in "kv")
    contiguous = fa.KVCache(1, hkv, d, length, dtype=dt)
    contiguous.append(k, v)
    paged = _interleaved(fa, dt, bs, k, v)
    blocks = -(-length // bs)
    table = rng.permutation(2 * blocks)[:blocks].astype(np.int32)[None]
    lens = np.array([length], np.int32)
    tol = RTOL[dt]
    cands = [
        Cand(CONTIGUOUS, partial(contiguous.attend, q), ref="f64", tol=tol),
        Cand(PAGED_CACHE, partial(paged.attend, [0], q), ref="f64", tol=tol),
    ]
    for kv_layout in KV_LAYOUTS:
        kc, vc, scales = _shuffled(fa, dt, bs, k, v, table, kv_layout)
        attend = partial(
            fa.paged.paged_attention, q, kc, vc, table, lens, **scales, kv_layout=kv_layout
        )
        cands.append(Cand(f"{PAGED_FN} {kv_layout}", attend, ref="f64", tol=tol))
    refs = {"f64": reference64(q, k, v)}
    del k, v
    return _timed(cands, refs, cfg, flush, {"dtype": dt, "block_size": bs, "L": length})


def batch_cell(fa, cfg, flush, rng) -> dict[str, Any]:
    """The continuous-batching step over float16 blocks of 16 tokens."""
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["dim"]
    bs, dt = 16, "float16"
    batch = cfg["batch"]
    cache = fa.PagedKVCache(sum(-(-n // bs) for n, _ in batch), bs, hkv, d, dtype=dt)
    for i, (n, _) in enumerate(batch):
        cache.add(i)
        k, v = (rng.standard_normal((1, hkv, n, d), dtype=np.float32) for _ in "kv")
        cache.append([i], k, v)
    ids = list(range(len(batch)))
    table, lens = cache.block_table(ids)
    q_lens = [t for _, t in batch]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), h, d), dtype=np.float32)
    kc, vc = cache.k_cache, cache.v_cache
    kv_layout = {"kv_layout": getattr(cache, "kv_layout", "nhd")}

    def loop() -> np.ndarray:
        out = np.empty((q.shape[0], h, d), np.float32)
        for b in ids:
            qb = q[None, cu[b] : cu[b + 1]].swapaxes(1, 2)
            got = fa.paged.paged_attention(
                qb, kc, vc, table[b : b + 1], lens[b : b + 1], **kv_layout
            )
            out[cu[b] : cu[b + 1]] = got[0].swapaxes(0, 1)
        return out

    packed = partial(fa.paged.paged_attention_varlen, q, kc, vc, table, lens, cu, **kv_layout)
    cands = [Cand(LOOP, loop, ref=None), Cand(PACKED, packed, ref=LOOP, tol=1e-5)]
    tokens = sum(n for n, _ in batch)
    cell = _timed(cands, {}, cfg, flush, {"sequences": len(batch), "tokens": tokens})
    nbytes = _kv_bytes(dt, hkv, tokens, d)
    flops = sum(4 * h * d * (t * n - t * (t - 1) // 2) for n, t in batch)
    for res in cell["candidates"].values():
        if "median_ms" in res:
            res["gbs"] = nbytes / (res["median_ms"] * 1e-3) / 1e9
            res["gflops"] = flops / (res["median_ms"] * 1e-3) / 1e9
    cell.update({"kv_bytes": nbytes, "flops": flops, "batch": batch})
    return cell


def _timed(cands, refs, cfg, flush, keys) -> dict[str, Any]:
    threads = cfg["threads"]
    res, live, failed = check(cands, refs)
    if failed:
        raise BenchError(f"accuracy check failed: {failed[0]}: {res[failed[0]]['status']}", 1)

    def gap(_name: str) -> None:
        if cfg["gap_ms"] > 0:
            flush.busy(cfg["gap_ms"], threads)

    samples = round_robin(
        live,
        repeats=cfg["repeats"],
        warmup=cfg["warmup"],
        before=partial(flush, threads),
        after=gap,
    )
    for name, ms in samples.items():
        res[name].update(summary(ms))
    return {**keys, "candidates": res}


def _ms(res: dict[str, Any]) -> float | None:
    return res.get("median_ms")


def decode_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cells:
        base = _ms(c["candidates"][CONTIGUOUS])
        for name, res in c["candidates"].items():
            ms = _ms(res)
            keys = [c["dtype"], str(c["block_size"]), str(c["L"]), name]
            if ms is None:
                rows.append(keys + [res["status"]] + [""] * 3)
                continue
            ratio = ms / base if base else None
            verdict = ""
            if name != CONTIGUOUS and ratio is not None:
                verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
            rows.append(
                keys
                + [f"{ms:.3f}", f"{res['min_ms']:.3f}"]
                + [f"{ratio:.3f}" if ratio else "", verdict]
            )
    return rows


def batch_rows(cell: dict[str, Any], bw: float) -> list[list[str]]:
    loop_ms = _ms(cell["candidates"][LOOP])
    rows = []
    for name, res in cell["candidates"].items():
        ms = _ms(res)
        if ms is None:
            rows.append([name, res["status"]] + [""] * 5)
            continue
        speedup = f"{loop_ms / ms:.2f}x" if loop_ms else ""
        pct = f"{100 * res['gbs'] / bw:.0f}%" if bw else ""
        rows.append(
            [name, f"{ms:.3f}", f"{res['min_ms']:.3f}", speedup, f"{res['gbs']:.1f}", pct]
            + [f"{res['gflops']:.0f}"]
        )
    return rows


DECODE_HEADERS = ["kv dtype", "block", "L", "candidate", "median ms", "min ms", "/ KVCache"]
DECODE_HEADERS.append(f"<= {TARGET_RATIO}x")
BATCH_HEADERS = ["candidate", "median ms", "min ms", "speedup", "K/V GB/s", "% bw", "GFLOP/s"]


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    cfg = config(args)
    fa, peers, env = start(("threadpoolctl",))
    threads = cfg["threads"]
    print("measuring memory-read bandwidth ...", flush=True)
    bandwidth = Bandwidth(cfg["bw_mib"], BW_REPEATS)
    bandwidth.measure(threads)
    flush = Flusher(cfg["flush_mib"], 0)
    rng = np.random.default_rng(cfg["seed"])
    notes: list[str] = []
    cells = []
    with thread_limits(threads, fa, peers, notes):
        for length in cfg["lengths"]:
            for dt in cfg["dtypes"]:
                for bs in cfg["block_sizes"]:
                    cells.append(decode_cell(fa, cfg, dt, bs, length, flush, rng))
                    print(f"  done decode L={length} {dt} block {bs}", flush=True)
        batch = batch_cell(fa, cfg, flush, rng)
        print("  done continuous-batching step", flush=True)
        bandwidth.measure(threads)
    bw = bandwidth.gbs(threads)
    header = [
        f"ferroattn paged-cache benchmark  {env['date']}" + ("  [QUICK]" if cfg["quick"] else ""),
        f"cpu: {env['cpu']}  ({env['logical_cpus']} logical CPUs)  threads={threads}  "
        f"isa={env['ferroattn'].get('isa')}",
        f"decode: B=1 H={cfg['heads']} Hkv={cfg['kv_heads']} D={cfg['dim']}, one query token;  "
        f"repeats={cfg['repeats']} (median)  flush={cfg['flush_mib']} MiB  "
        f"gap={cfg['gap_ms']:g} ms busy  seed={cfg['seed']}",
        f"memory-read bandwidth: {bw:.1f} GB/s (best of "
        f"{len(bandwidth.data[threads]['measurements_gbs'])} measurements, {cfg['bw_mib']} MiB)",
    ]
    batch_desc = (
        f"continuous-batching step: {batch['sequences']} sequences, {batch['tokens']} cached "
        f"tokens (float16, block 16), new tokens per sequence "
        f"{[t for _, t in cfg['batch']]}, contexts {[n for n, _ in cfg['batch']]}"
    )
    d_rows, b_rows = decode_rows(cells), batch_rows(batch, bw)
    text = format_table(DECODE_HEADERS, d_rows, left={0, 3, 7}, n_keys=4, group=3)
    print("\n" + "\n".join(header) + "\n\n" + "\n".join(text))
    print("\n" + batch_desc)
    print("\n".join(format_table(BATCH_HEADERS, b_rows, left={0}, n_keys=1, group=0)))
    if notes:
        print("\n".join(f"note: {n}" for n in notes))
    if args.quick:
        print("--quick: a smoke test of the script; these timings are not a measurement.")
    if not args.no_save:
        md = "\n".join(
            [*header, "", *markdown_table(DECODE_HEADERS, d_rows, left={0, 3, 7}), ""]
            + [batch_desc, "", *markdown_table(BATCH_HEADERS, b_rows, left={0})]
            + [""]
        )
        ratios = [float(r[6]) for r in d_rows if r[3] != CONTIGUOUS and r[6]]
        payload = {
            "schema": SCHEMA,
            "config": {**cfg, "bandwidth": bandwidth.as_json()},
            "env": env,
            "decode": cells,
            "batch": batch,
            "summary": {
                "bandwidth_gbs": bw,
                "worst_paged_ratio": max(ratios) if ratios else None,
                "median_paged_ratio": statistics.median(ratios) if ratios else None,
            },
        }
        stem = f"paged-{_dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
        json_path, md_path = write_results(args.out_dir, stem, md, payload)
        print(f"\nwrote {md_path}\nwrote {json_path}")
    return 0
