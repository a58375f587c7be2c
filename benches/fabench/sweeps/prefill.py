"""Prefill across thread counts: ferroattn vs torch SDPA (CPU) vs NumPy (``bench_prefill.py``).

Default case: B=1, H=16, N=2048, D=64, float32, dense and causal, at 1 and 2 threads. The
candidates are interleaved round-robin in one process, warmed up, and the median of the
repeats is reported. Before timing, every peer's output is checked against ferroattn's
(relative Frobenius error < 1e-4); a peer that disagrees stops the run (exit status 1).
Results are printed and written to ``benches/results/prefill-<date>.{md,json}``
(``prefill-<date>-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
from functools import partial
from typing import Any

import numpy as np

from ..argtypes import add_run_options, new_parser, positive, positive_list
from ..env import BenchError, Peers, run_main, start, thread_limits
from ..peers import make_numpy, torch_cand
from ..tables import format_table, markdown_table, write_results
from ..timing import FA, RTOL, Cand, check, round_robin, sleeper, summary

PROG = "bench_prefill"
SCHEMA = "ferroattn-bench-prefill/1"
NUMPY_MAX_ROW_BYTES = 2 << 30  # one head's (Nq, Nk) float32 scores above this: NumPy skipped
CANDIDATES = (FA, "torch", "numpy")
HEADERS = [
    "case",
    "threads",
    "candidate",
    "median ms",
    "min ms",
    "spread",
    "GFLOP/s",
    "fa speedup",
    "rel err",
]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        PROG,
        "Prefill attention: ferroattn vs torch SDPA (CPU) vs NumPy.",
        "B=1 H=2 N=128 D=32, 1 repeat (explicit --n/--heads/--dim/--repeats still win)",
    )
    p.add_argument("--batch", type=positive, default=1, help="batch size B")
    p.add_argument("--heads", type=positive, default=None, help="heads H [16]")
    p.add_argument("--n", type=positive, default=None, help="sequence length N [2048]")
    p.add_argument("--dim", type=positive, default=None, help="head dim D [64]")
    p.add_argument(
        "--threads",
        type=positive_list("thread counts"),
        default=[1, 2],
        help="thread counts, e.g. 1,2",
    )
    p.add_argument(
        "--cases",
        choices=("both", "dense", "causal"),
        default="both",
        help="masking cases to run",
    )
    add_run_options(p, repeats="5; quick 1", files="prefill-<date>.{md,json}")
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The options with the defaults ``--quick`` changes resolved."""
    small = args.quick

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return {
        "quick": small,
        "batch": args.batch,
        "heads": pick(args.heads, 2 if small else 16),
        "n": pick(args.n, 128 if small else 2048),
        "dim": pick(args.dim, 32 if small else 64),
        "repeats": pick(args.repeats, 1 if small else 5),
        "warmup": pick(args.warmup, 1),
        "threads": args.threads,
        "cases": args.cases,
        "seed": args.seed,
        "gap_ms": pick(args.gap_ms, 0.0 if small else 100.0),
        "rtol": RTOL["float32"],
    }


def format_header(env: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    fa = env["ferroattn"]
    lines = [
        f"ferroattn prefill benchmark  {env['date']}" + ("  [QUICK]" if cfg["quick"] else ""),
        f"cpu: {env['cpu']}  ({env['logical_cpus']} logical CPUs, load average "
        f"{env['loadavg_at_start']} at start)",
        f"python {env['python']}  numpy {env['numpy']}  {env['platform']}",
        f"ferroattn {fa.get('version')}  isa={fa.get('isa')}  available={fa.get('isa_available')}",
    ]
    t = env["torch"]
    if t.get("status") == "ok":
        lines.append(f"torch {t['version']}  cpu_capability={t.get('cpu_capability')}")
    else:
        lines.append(f"torch: {t.get('status')}")
    ev = [
        f"{k}={v if v is not None else '(unset)'}"
        for k, v in env["env_vars"].items()
        if v is not None or k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    ]
    lines.append("env: " + "  ".join(ev))
    pools = env["blas_pools"]
    if isinstance(pools, str):
        lines.append(f"threadpoolctl: {pools} (NumPy thread count not controlled)")
    elif not pools:
        lines.append("threadpoolctl: no thread pools found")
    for lib in pools if isinstance(pools, list) else ():
        desc = [f"{lib.get('user_api')}/{lib.get('internal_api')}"]
        desc += [str(lib[k]) for k in ("version",) if lib.get(k)]
        if lib.get("architecture"):
            desc.append(f"kernel={lib['architecture']}")
        if lib.get("threading_layer"):
            desc.append(f"threading={lib['threading_layer']}")
        desc.append(f"({lib.get('prefix')}, {lib.get('num_threads')} threads at start)")
        lines.append("threadpoolctl: " + " ".join(desc))
    lines.append(
        f"shape: B={cfg['batch']} H={cfg['heads']} N={cfg['n']} D={cfg['dim']} fp32  "
        f"repeats={cfg['repeats']} (median)  warmup={cfg['warmup']}  "
        f"gap={cfg['gap_ms']:g}ms  threads={','.join(map(str, cfg['threads']))}"
    )
    return lines


def run_case(
    fa: Any,
    peers: Peers,
    cfg: dict[str, Any],
    causal: bool,
    threads: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One (masking, thread count) case: every candidate checked, then timed."""
    b, h, n, d = cfg["batch"], cfg["heads"], cfg["n"], cfg["dim"]
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))
    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    case: dict[str, Any] = {
        "case": "causal" if causal else "dense",
        "causal": causal,
        "threads": threads,
        "B": b,
        "H": h,
        "Nq": n,
        "Nk": n,
        "D": d,
        "dtype": "float32",
        "flops": flops,
        "notes": [],
        "candidates": {},
    }
    with thread_limits(threads, fa, peers, case["notes"]):
        cands = [
            Cand(FA, partial(fa.attention, q, k, v, causal=causal), required=True),
            torch_cand(peers, q, k, v, causal=causal, name="torch"),
        ]
        if n * n * 4 <= NUMPY_MAX_ROW_BYTES:
            cands.append(Cand("numpy", make_numpy(q, k, v, causal)))
        else:
            cands.append(Cand("numpy", status="skipped (scores too large for memory)"))
        res, live, failed = check(cands, {})
        if failed:
            bad = failed[0]
            raise BenchError(
                f"accuracy check failed: {bad} vs ferroattn: {res[bad]['status']} "
                f"({case['case']}, threads={threads}, B={b} H={h} N={n} D={d})",
                1,
            )
        samples = round_robin(
            live, repeats=cfg["repeats"], warmup=cfg["warmup"], after=sleeper(cfg["gap_ms"])
        )
    fa_ms = summary(samples[FA])["median_ms"]
    for name, ms in samples.items():
        res[name].update(summary(ms))
        med = res[name]["median_ms"]
        res[name]["gflops"] = flops / (med * 1e-3) / 1e9 if med > 0 else None
        res[name]["speedup"] = med / fa_ms if name != FA and fa_ms > 0 else None
    case["candidates"] = {name: res[name] for name in CANDIDATES if name in res}
    return case


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for case in results:
        for name, r in case["candidates"].items():
            base = [case["case"], str(case["threads"]), name]
            if r.get("status") != "ok":
                rows.append([*base, str(r.get("status"))] + [""] * (len(HEADERS) - 4))
                continue
            sp = r.get("speedup")
            rows.append(
                [
                    *base,
                    f"{r['median_ms']:.2f}",
                    f"{r['min_ms']:.2f}",
                    f"{100 * r['spread']:.0f}%" if r.get("spread") is not None else "",
                    f"{r['gflops']:.1f}" if r.get("gflops") is not None else "",
                    "-" if name == FA else (f"{sp:.2f}x" if sp else ""),
                    "(ref)" if name == FA else f"{r['rel_err']:.1e}",
                ]
            )
    return rows


FOOTNOTES = [
    "ms: median of the repeats.  GFLOP/s: 4*B*H*Nq*Nk*D (half for causal) / median.",
    "fa speedup: peer ms / ferroattn ms (> 1 means ferroattn is faster).",
    "spread: (max - min) / median of the repeats; large = noisy machine.",
]
MD_FOOTNOTE = (
    "ms = median wall time of one call; GFLOP/s counts 4*B*H*Nq*Nk*D "
    "(half for causal); fa speedup = peer median ms / ferroattn median ms "
    "(> 1: ferroattn faster); spread = (max - min) / median of the repeats; "
    "rel err = relative Frobenius error vs ferroattn."
)


def main(argv: list[str] | None = None) -> int:
    hint = " (try a smaller --n)"
    return run_main(PROG, lambda: run(build_parser().parse_args(argv)), oom_hint=hint)


def run(args: argparse.Namespace) -> int:
    cfg = config(args)
    fa, peers, env = start(("torch", "threadpoolctl"))
    header = format_header(env, cfg)
    print("\n".join(header))
    cpus = os.cpu_count() or 1
    if max(args.threads) > cpus:
        print(f"warning: more threads requested than the {cpus} logical CPUs")
    print(flush=True)

    causal_flags = {"both": (False, True), "dense": (False,), "causal": (True,)}[args.cases]
    rng = np.random.default_rng(args.seed)
    results = []
    for causal in causal_flags:
        for threads in args.threads:
            case = run_case(fa, peers, cfg, causal, threads, rng)
            results.append(case)
            done = "  ".join(
                f"{name} {c['median_ms']:.2f} ms"
                if c.get("status") == "ok"
                else f"{name} {c.get('status')}"
                for name, c in case["candidates"].items()
            )
            print(f"  done {case['case']:<6} threads={threads}: {done}", flush=True)
            for note in case["notes"]:
                print(f"  note: {note}")

    rows = table_rows(results)
    left = {0, 1, 2}
    print()
    print("\n".join(format_table(HEADERS, rows, left=left, n_keys=3, group=2)), end="\n\n")
    print("\n".join(FOOTNOTES))
    if args.quick:
        print("--quick: a smoke test of the script; these timings are not a measurement.")
    if not args.no_save:
        payload = {"schema": SCHEMA, "config": cfg, "env": env, "results": results}
        md = "\n".join(
            ["# ferroattn prefill benchmark", "", "```", *header, "```", ""]
            + markdown_table(HEADERS, rows, left=left)
            + ["", MD_FOOTNOTE, ""]
        )
        stem = f"prefill-{_dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
        json_path, md_path = write_results(args.out_dir, stem, md, payload)
        print(f"\nwrote {md_path}\nwrote {json_path}")
    return 0
