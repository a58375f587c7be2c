"""Prefill attention benchmark: ferroattn vs torch SDPA (CPU) vs NumPy.

Default case: B=1, H=16, N=2048, D=64, float32, dense and causal, at 1 and 2
threads.  The candidates are interleaved round-robin in one process, warmed up,
and the median of the repeats is reported.  Before timing, every peer's output
is checked against ferroattn's (relative Frobenius error < 1e-4).

Results are printed and written to benches/results/prefill-<date>.{md,json}
(prefill-<date>-quick.* with --quick).  See benches/README.md.

    python benches/bench_prefill.py                 # full run
    python benches/bench_prefill.py --quick         # smoke test, seconds
    python benches/bench_prefill.py --n 4096 --threads 1,2,4 --repeats 9
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Helpers shared with the harness (`ferroattn.bench`); the script needs ferroattn anyway.
try:
    from ferroattn.bench import (
        _cpu_model,
        _loadavg,
        _non_negative,
        _positive,
        rel_frobenius,
    )
except Exception as exc:  # noqa: BLE001 (any failure of the import is reported)
    print(f"bench_prefill: error: cannot import ferroattn: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

SCHEMA = "ferroattn-bench-prefill/1"
RTOL = 1e-4  # relative Frobenius error allowed vs ferroattn
NUMPY_MAX_BLOCK_BYTES = 256 << 20  # NumPy scores computed for this many bytes at a time
NUMPY_MAX_ROW_BYTES = 2 << 30  # one head's (Nq, Nk) above this: NumPy skipped
CANDIDATES = ("ferroattn", "torch", "numpy")
ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
)


class BenchError(Exception):
    """A failure with a message for the user (exit status 2; 1 for accuracy)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- setup


def _parse_threads(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2 - got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Prefill attention: ferroattn vs torch SDPA (CPU) vs NumPy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: B=1 H=2 N=128 D=32, 1 repeat "
        "(explicit --n/--heads/--dim/--repeats still win)",
    )
    p.add_argument("--batch", type=_positive, default=1, help="batch size B")
    p.add_argument("--heads", type=_positive, default=None, help="heads H [16]")
    p.add_argument("--n", type=_positive, default=None, help="sequence length N [2048]")
    p.add_argument("--dim", type=_positive, default=None, help="head dim D [64]")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats [5]")
    p.add_argument("--warmup", type=_non_negative, default=None, help="warm-up calls [1]")
    p.add_argument("--threads", type=_parse_threads, default=[1, 2], help="thread counts, e.g. 1,2")
    p.add_argument(
        "--cases",
        choices=("both", "dense", "causal"),
        default="both",
        help="masking cases to run",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where prefill-<date>.{md,json} go",
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="untimed pause after each call, so that one library's spinning worker "
        "threads do not steal cores from the next candidate [100; 0 with --quick]",
    )
    return p


def _resolve(args: argparse.Namespace) -> None:
    small = args.quick
    defaults = {
        "heads": 2 if small else 16,
        "n": 128 if small else 2048,
        "dim": 32 if small else 64,
        "repeats": 1 if small else 5,
        "warmup": 1,
        "gap_ms": 0.0 if small else 100.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# --------------------------------------------------------------------------- env


def _threadpoolctl() -> Any:
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def _import_torch() -> tuple[Any, str | None]:
    try:
        import torch
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # noqa: BLE001 (broken install: report, don't crash)
        return None, f"import failed: {type(exc).__name__}: {exc}"
    return torch, None


def collect_env(fa: Any, torch: Any, torch_status: str | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "loadavg_at_start": _loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "env_vars": {k: os.environ.get(k) for k in ENV_VARS},
    }
    try:
        env["ferroattn"] = dict(fa.info())
    except Exception as exc:  # noqa: BLE001 (reported in the header)
        env["ferroattn"] = {"error": str(exc)}
    env["ferroattn"].setdefault("version", getattr(fa, "__version__", "unknown"))
    if torch is None:
        env["torch"] = {"status": torch_status}
    else:
        env["torch"] = {"status": "ok", "version": str(torch.__version__)}
        with contextlib.suppress(Exception):
            env["torch"]["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        with contextlib.suppress(Exception):
            env["torch"]["parallel_info"] = torch.__config__.parallel_info().splitlines()[:12]
    tpc = _threadpoolctl()
    if tpc is None:
        env["threadpoolctl"] = "not installed"
    else:
        keep = (
            "user_api",
            "internal_api",
            "prefix",
            "version",
            "architecture",
            "threading_layer",
            "num_threads",
        )
        env["threadpoolctl"] = [
            {k: v for k, v in lib.items() if k in keep} for lib in tpc.threadpool_info()
        ]
    return env


def format_header(env: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    fa = env["ferroattn"]
    lines = [
        f"ferroattn prefill benchmark  {env['date']}" + ("  [QUICK]" if cfg["quick"] else ""),
        f"cpu: {env['cpu']}  ({env['logical_cpus']} logical CPUs, load average "
        f"{env['loadavg_at_start']} at start)",
        f"python {env['python']}  numpy {env['numpy']}  {env['platform']}",
        (
            f"ferroattn {fa.get('version')}  isa={fa.get('isa')}  "
            f"available={fa.get('isa_available')}"
        ),
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
    tpc = env["threadpoolctl"]
    if isinstance(tpc, str):
        lines.append(f"threadpoolctl: {tpc} (NumPy thread count not controlled)")
    elif not tpc:
        lines.append("threadpoolctl: no thread pools found")
    for lib in tpc if isinstance(tpc, list) else ():
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


# --------------------------------------------------------------------------- candidates


def make_ferroattn(fa: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool):
    def run() -> np.ndarray:
        return fa.attention(q, k, v, causal=causal)

    return run


def make_torch(torch: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))  # zero-copy views

    def run() -> Any:
        with torch.inference_mode():
            return sdpa(qt, kt, vt, is_causal=causal)

    return run


def make_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool):
    """Plain float32 attention: matmul + softmax, blocked over (batch, head) pairs
    so that at most NUMPY_MAX_BLOCK_BYTES of scores exist at a time."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    scale = np.float32(1.0 / math.sqrt(d))
    qf = q.reshape(b * h, nq, d)
    kt = np.ascontiguousarray(k.reshape(b * h, nk, d).transpose(0, 2, 1))  # (BH, D, Nk)
    vf = v.reshape(b * h, nk, dv)
    per_head = nq * nk * 4
    step = max(1, NUMPY_MAX_BLOCK_BYTES // per_head)
    mask = None
    if causal:  # additive mask, bottom-right aligned (same as ours for Nq == Nk)
        keep = np.tril(np.ones((nq, nk), dtype=bool), k=nk - nq)
        mask = np.where(keep, np.float32(0.0), np.float32(-np.inf))

    def run() -> np.ndarray:
        out = np.empty((b * h, nq, dv), dtype=np.float32)
        for lo in range(0, b * h, step):
            hi = min(b * h, lo + step)
            s = np.matmul(qf[lo:hi], kt[lo:hi])  # (h, Nq, Nk)
            s *= scale
            if mask is not None:
                s += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            denom = s.sum(axis=-1, keepdims=True)
            np.matmul(s, vf[lo:hi], out=out[lo:hi])
            out[lo:hi] /= denom
        return out.reshape(b, h, nq, dv)

    return run


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, tuple):  # (out, lse)
        x = x[0]
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def thread_limits(n: int, fa: Any, torch: Any, notes: list[str]):
    """Set n threads for all candidates for the duration of one case."""
    prev_fa = fa.get_num_threads()
    fa.set_num_threads(n)
    got = fa.get_num_threads()
    if got != n:
        notes.append(f"ferroattn.set_num_threads({n}) left {got} threads")
    prev_torch = None
    if torch is not None:
        prev_torch = torch.get_num_threads()
        torch.set_num_threads(n)
    tpc = _threadpoolctl()
    limiter = (
        tpc.threadpool_limits(limits=n, user_api="blas")
        if tpc is not None
        else contextlib.nullcontext()
    )
    try:
        with limiter:
            yield
    finally:
        with contextlib.suppress(Exception):
            fa.set_num_threads(prev_fa)
        if torch is not None:
            torch.set_num_threads(prev_torch)


def run_case(
    fa: Any,
    torch: Any,
    torch_status: str | None,
    cfg: dict[str, Any],
    causal: bool,
    threads: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    b, h, n, d = cfg["batch"], cfg["heads"], cfg["n"], cfg["dim"]
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))
    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    case = {
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
    cands: dict[str, Callable[[], Any]] = {}
    res = case["candidates"]
    with thread_limits(threads, fa, torch, case["notes"]):
        cands["ferroattn"] = make_ferroattn(fa, q, k, v, causal)
        if torch is not None:
            cands["torch"] = make_torch(torch, q, k, v, causal)
        else:
            res["torch"] = {"status": torch_status}
        if n * n * 4 <= NUMPY_MAX_ROW_BYTES:
            cands["numpy"] = make_numpy(q, k, v, causal)
        else:
            res["numpy"] = {"status": "skipped (scores too large for memory)"}

        # Accuracy first: every peer must agree with ferroattn.
        ref = _to_numpy(cands["ferroattn"]())
        if ref.shape != (*q.shape[:3], v.shape[3]):
            raise BenchError(f"ferroattn returned shape {ref.shape}, expected {q.shape}")
        if not np.all(np.isfinite(ref)):
            raise BenchError(f"ferroattn output has non-finite values ({case['case']})", 1)
        for name, fn in cands.items():
            err = 0.0 if name == "ferroattn" else rel_frobenius(_to_numpy(fn()), ref)
            res[name] = {"status": "ok", "rel_err": err}
            if not err < RTOL:
                raise BenchError(
                    f"accuracy check failed: {name} vs ferroattn relative Frobenius "
                    f"error {err:.3g} >= {RTOL:g} ({case['case']}, threads={threads}, "
                    f"B={b} H={h} N={n} D={d})",
                    1,
                )
        del ref

        # Warm up, then round-robin, rotating the start so no candidate is always
        # first (or always right after another's thread pool was busy).
        names = list(cands)
        for _ in range(cfg["warmup"]):
            for name in names:
                cands[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(cfg["repeats"]):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    t0 = time.perf_counter()
                    result = cands[name]()
                    dt = time.perf_counter() - t0
                    del result
                    samples[name].append(dt * 1e3)
                    if cfg["gap_ms"] > 0:
                        time.sleep(cfg["gap_ms"] / 1e3)
        finally:
            if gc_was_enabled:
                gc.enable()

    fa_ms = statistics.median(samples["ferroattn"])
    for name, ms in samples.items():
        med = statistics.median(ms)
        speedup = None
        if name != "ferroattn" and fa_ms > 0:
            speedup = med / fa_ms
        res[name].update(
            {
                "median_ms": med,
                "min_ms": min(ms),
                "max_ms": max(ms),
                "spread": (max(ms) - min(ms)) / med if med > 0 else None,
                "samples_ms": ms,
                "gflops": flops / (med * 1e-3) / 1e9 if med > 0 else None,
                "speedup": speedup,
            }
        )
    # fixed candidate order in the output
    case["candidates"] = {name: res[name] for name in CANDIDATES if name in res}
    return case


# --------------------------------------------------------------------------- output


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
                    "-" if name == "ferroattn" else (f"{sp:.2f}x" if sp else ""),
                    f"{r['rel_err']:.1e}" if name != "ferroattn" else "(ref)",
                ]
            )
    return rows


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


def format_text_table(rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in HEADERS]
    for row in rows:
        status_row = not any(row[4:])  # its status message spans the numeric columns
        for i, cell in enumerate(row[:3] if status_row else row):
            widths[i] = max(widths[i], len(cell))
    left = {0, 1, 2}

    def fmt(row: list[str]) -> str:
        if len(row) > 3 and row[3] and not any(row[4:]):
            return "  ".join(f"{c:<{widths[i]}}" for i, c in enumerate(row[:3])) + "  " + row[3]
        return "  ".join(
            f"{c:<{widths[i]}}" if i in left else f"{c:>{widths[i]}}" for i, c in enumerate(row)
        ).rstrip()

    out = [fmt(HEADERS), "  ".join("-" * w for w in widths)]
    prev = None
    for row in rows:
        key = (row[0], row[1])
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(fmt(row))
    return out


def format_markdown(header: list[str], rows: list[list[str]], env: dict[str, Any]) -> str:
    lines = ["# ferroattn prefill benchmark", "", "```"]
    lines += header
    lines += ["```", ""]
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "|".join(":---" if i < 3 else "---:" for i in range(len(HEADERS))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c or " " for c in row) + " |")
    lines += [
        "",
        (
            "ms = median wall time of one call; GFLOP/s counts 4*B*H*Nq*Nk*D "
            "(half for causal); fa speedup = peer median ms / ferroattn median ms "
            "(> 1: ferroattn faster); spread = (max - min) / median of the repeats; "
            "rel err = relative Frobenius error vs ferroattn."
        ),
        "",
    ]
    return "\n".join(lines)


def save(out_dir: Path, quick: bool, md: str, payload: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"prefill-{_dt.date.today().isoformat()}" + ("-quick" if quick else "")
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    json.loads(text)  # well-formed by construction; fail loudly otherwise
    md_path.write_text(md, encoding="utf-8")
    json_path.write_text(text + "\n", encoding="utf-8")
    return md_path, json_path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve(args)
    import ferroattn as fa  # importable: the helpers above came from it

    torch, torch_status = _import_torch()

    cfg = {
        "quick": args.quick,
        "batch": args.batch,
        "heads": args.heads,
        "n": args.n,
        "dim": args.dim,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "cases": args.cases,
        "seed": args.seed,
        "gap_ms": args.gap_ms,
        "rtol": RTOL,
    }
    env = collect_env(fa, torch, torch_status)
    header = format_header(env, cfg)
    for line in header:
        print(line)
    cpus = os.cpu_count() or 1
    if max(args.threads) > cpus:
        print(f"warning: more threads requested than the {cpus} logical CPUs")
    print(flush=True)

    causal_flags = {"both": (False, True), "dense": (False,), "causal": (True,)}[args.cases]
    rng = np.random.default_rng(args.seed)
    results = []
    try:
        for causal in causal_flags:
            for threads in args.threads:
                case = run_case(fa, torch, torch_status, cfg, causal, threads, rng)
                results.append(case)
                r = case["candidates"]
                summary = "  ".join(
                    f"{name} {c['median_ms']:.2f} ms"
                    if c.get("status") == "ok"
                    else f"{name} {c.get('status')}"
                    for name, c in r.items()
                )
                print(f"  done {case['case']:<6} threads={threads}: {summary}", flush=True)
                for note in case["notes"]:
                    print(f"  note: {note}")
    except BenchError as exc:
        print(f"bench_prefill: error: {exc}", file=sys.stderr)
        return exc.code
    except MemoryError:
        print("bench_prefill: error: out of memory (try a smaller --n)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (traceback printed, then a clean exit)
        traceback.print_exc()
        print(f"bench_prefill: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    rows = table_rows(results)
    print()
    for line in format_text_table(rows):
        print(line)
    print()
    print("ms: median of the repeats.  GFLOP/s: 4*B*H*Nq*Nk*D (half for causal) / median.")
    print("fa speedup: peer ms / ferroattn ms (> 1 means ferroattn is faster).")
    print("spread: (max - min) / median of the repeats; large = noisy machine.")
    if args.quick:
        print("--quick: a smoke test of the script; these timings are not a measurement.")

    if not args.no_save:
        payload = {"schema": SCHEMA, "config": cfg, "env": env, "results": results}
        md = format_markdown(header, rows, env)
        md_path, json_path = save(args.out_dir, args.quick, md, payload)
        print(f"\nwrote {md_path}\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
