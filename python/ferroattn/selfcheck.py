"""``ferroattn bench``: a quick check of attention on this machine, with timings.

Three calls a model makes: a prefill (B=1, H=16, N=2048, D=64), the same prefill causal, and
one decode step through :class:`ferroattn.KVCache` (32 query heads over 8 KV heads, D=128,
16384 cached float32 tokens). Each result is first compared with a float64 NumPy reference;
then ferroattn is timed, side by side with torch's ``scaled_dot_product_attention`` when
torch can be imported (it is imported here only, on demand). The report gives ms per call,
GFLOP/s (prefill) or GB/s of K/V read (decode), and torch ms / ferroattn ms. It takes a few
seconds; ``--quick`` shrinks the shapes for a smoke test.

The full side-by-side benchmark (other libraries, the machine's GEMM and bandwidth ceilings,
the project's targets) lives in the source tree: ``python benches/harness.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

TOLERANCE = 1e-4  # relative Frobenius error allowed against the float64 reference (float32)
WIDTH = 100  # every line printed fits in WIDTH columns


@dataclass(frozen=True)
class Call:
    """One call to check and time: ``heads`` query heads over ``kv_heads``, ``n_q`` queries
    over ``n_k`` keys of width ``dim``; ``decode`` calls go through a KVCache."""

    heads: int
    kv_heads: int
    n_q: int
    n_k: int
    dim: int
    causal: bool = False
    decode: bool = False

    @property
    def name(self) -> str:
        if self.decode:
            return f"decode {self.heads}q/{self.kv_heads}kv D={self.dim} L={self.n_k} (KVCache)"
        kind = "prefill causal" if self.causal else "prefill"
        return f"{kind} B=1 H={self.heads} N={self.n_q} D={self.dim}"

    def work(self) -> tuple[float, str]:
        """What one call does: flops (prefill: 4·H·D per query-key pair a query sees) or
        bytes of float32 K/V read (decode), and the unit of its rate."""
        if self.decode:
            return 2.0 * self.kv_heads * self.n_k * self.dim * 4, "GB/s"
        pairs = self.n_q * (self.n_q + 1) // 2 if self.causal else self.n_q * self.n_k
        return 4.0 * self.heads * self.dim * pairs, "GFLOP/s"


def calls(quick: bool) -> list[Call]:
    """The calls of a run (``quick``: small ones, for a smoke test)."""
    h, n, d = (4, 256, 64) if quick else (16, 2048, 64)
    hq, hkv, dd, length = (8, 2, 64, 1024) if quick else (32, 8, 128, 16384)
    return [
        Call(h, h, n, n, d),
        Call(h, h, n, n, d, causal=True),
        Call(hq, hkv, 1, length, dd, decode=True),
    ]


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """softmax(q kᵀ / √D) v in float64, one query head at a time; (1, H, N, D) arrays, each
    KV head shared by H / Hkv query heads, causal aligned to the last key."""
    hq, nq, d = q.shape[1], q.shape[2], q.shape[3]
    group, nk = hq // k.shape[1], k.shape[2]
    hidden = np.triu(np.ones((nq, nk), dtype=bool), k=nk - nq + 1) if causal else None
    out = np.empty((hq, nq, v.shape[3]))
    for head in range(hq):
        kh, vh = k[0, head // group].astype(np.float64), v[0, head // group].astype(np.float64)
        scores = q[0, head].astype(np.float64) @ kh.T / math.sqrt(d)
        if hidden is not None:
            scores[hidden] = -np.inf
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[head] = (weights / weights.sum(axis=1, keepdims=True)) @ vh
    return out[None]


def rel_err(x: Any, ref: np.ndarray) -> float:
    """||x - ref|| / ||ref|| (Frobenius), in float64."""
    diff = np.asarray(x, dtype=np.float64) - ref
    return float(np.linalg.norm(diff) / np.linalg.norm(ref))


def _torch() -> Any:
    """torch, or why it cannot be used (a str)."""
    try:
        return importlib.import_module("torch")
    except Exception as exc:  # noqa: BLE001 (ImportError, or a broken install)
        return "not installed" if isinstance(exc, ImportError) else f"import failed: {exc}"


def _candidates(fa: Any, torch: Any, call: Call, rng: np.random.Generator) -> dict[str, Any]:
    """The inputs' reference and, per library, the function to time."""
    q = rng.standard_normal((1, call.heads, call.n_q, call.dim), dtype=np.float32)
    k, v = (
        rng.standard_normal((1, call.kv_heads, call.n_k, call.dim), dtype=np.float32) for _ in "kv"
    )
    fns: dict[str, Callable[[], Any]] = {}
    if call.decode:
        cache = fa.KVCache(1, call.kv_heads, call.dim, call.n_k, dtype="float32")
        cache.append(k, v)
        fns["ferroattn"] = partial(cache.attend, q)
    else:
        fns["ferroattn"] = partial(fa.attention, q, k, v, causal=call.causal)
    if torch is not None:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # no copies
        options = {"enable_gqa": True} if call.kv_heads != call.heads else {}

        def run_torch() -> Any:
            with torch.inference_mode():
                return sdpa(tq, tk, tv, is_causal=call.causal, **options).numpy()

        fns["torch"] = run_torch
    return {"reference": reference(q, k, v, call.causal), "fns": fns}


def _timings(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """ms per call, after one warm-up call each; the libraries alternate, and every other
    round runs them in reverse so that neither always follows the other."""
    for fn in fns.values():
        fn()
    ms: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            ms[name].append((time.perf_counter() - start) * 1e3)
    return ms


def measure(
    fa: Any, torch: Any, call: Call, repeats: int, rng: np.random.Generator
) -> dict[str, Any]:
    """One call's result: each library's error against the reference, then its timings (a
    library that disagrees is not timed)."""
    work, unit = call.work()
    entry: dict[str, Any] = {"call": call.name, "unit": unit, "work": work}
    inputs = _candidates(fa, torch, call, rng)
    live = {}
    for lib, fn in inputs["fns"].items():
        try:
            err = rel_err(fn(), inputs["reference"])
        except Exception as exc:  # noqa: BLE001 (torch too old for the call, say: reported)
            if lib == "ferroattn":
                raise
            entry[lib] = {"status": f"failed: {type(exc).__name__}: {exc}"[:60]}
            continue
        entry[lib] = {"rel_err": err}
        if err < TOLERANCE:
            live[lib] = fn
        else:
            entry[lib]["status"] = f"disagrees with the reference: rel err {err:.1e}"
    for lib, ms in _timings(live, repeats).items():
        median = statistics.median(ms)
        rate = work / (median * 1e-3) / 1e9
        entry[lib].update({"median_ms": median, "min_ms": min(ms), "rate": rate})
    fa_ms, torch_ms = entry["ferroattn"].get("median_ms"), entry.get("torch", {}).get("median_ms")
    if fa_ms and torch_ms:
        entry["torch_over_ferroattn"] = torch_ms / fa_ms
    return entry


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ferroattn bench``."""

    def count(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats (a smoke test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--threads", type=count, default=None, help="threads for the run [ferroattn's count]"
    )
    p.add_argument("--repeats", type=count, default=None, help="timed calls per library [5]")
    p.add_argument("--no-torch", action="store_true", help="time ferroattn alone")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks and times every call; the report as a dict."""
    import ferroattn as fa

    torch = "not used (--no-torch)" if args.no_torch else _torch()
    torch_info = (
        {"status": torch} if isinstance(torch, str) else {"version": str(torch.__version__)}
    )
    torch = None if isinstance(torch, str) else torch
    threads = args.threads or fa.get_num_threads()
    repeats = args.repeats or (2 if args.quick else 5)
    before = (fa.get_num_threads(), torch.get_num_threads() if torch is not None else 0)
    fa.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        results = [measure(fa, torch, c, repeats, rng) for c in calls(args.quick)]
    finally:
        fa.set_num_threads(before[0])
        if torch is not None:
            torch.set_num_threads(before[1])
    return {
        "ferroattn": dict(fa.info()),
        "logical_cpus": os.cpu_count(),
        "torch": torch_info,
        "threads": threads,
        "repeats": repeats,
        "quick": bool(args.quick),
        "tolerance": TOLERANCE,
        "results": results,
    }


def _cells(lib: dict[str, Any] | None, unit: str) -> list[str]:
    if lib is None:
        return ["", ""]
    if "median_ms" not in lib:
        return [lib.get("status", ""), ""]
    return [f"{lib['median_ms']:.2f} ms", f"{lib['rate']:.1f} {unit}"]


def format_report(report: dict[str, Any]) -> str:
    """The report as text, every line within ``WIDTH`` columns."""
    info = report["ferroattn"]
    torch = report["torch"]
    lines = [
        f"ferroattn {info.get('version')} bench: SIMD path {info.get('isa')}, "
        f"{report['threads']} thread(s), {report['logical_cpus']} logical CPUs",
        f"torch {torch['version']}: scaled_dot_product_attention on the CPU, side by side"
        if "version" in torch
        else f"torch: {torch['status']} (ferroattn alone)",
        "",
    ]
    rows = [["call", "ferroattn", "", "torch", "", "torch/fa"]]
    for r in report["results"]:
        ratio = r.get("torch_over_ferroattn")
        rows.append(
            [r["call"], *_cells(r["ferroattn"], r["unit"]), *_cells(r.get("torch"), r["unit"])]
            + [f"{ratio:.2f}x" if ratio else ""]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    errors = [
        r[lib]["rel_err"]
        for r in report["results"]
        for lib in ("ferroattn", "torch")
        if "rel_err" in r.get(lib, {})
    ]
    worst = max(errors)
    lines += [
        "",
        f"Each result was checked against a float64 NumPy reference first (largest relative "
        f"error {worst:.1e}; allowed {report['tolerance']:g}). Median of {report['repeats']} "
        "calls after a warm-up, the libraries alternating; decode steps run back to back, so "
        "K/V that fit the CPU caches are read from there.",
        "torch/fa above 1: ferroattn is faster. The full comparison (other libraries, the "
        "GEMM and bandwidth ceilings) is `python benches/harness.py` in the source tree.",
    ]
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str) -> str:
    if len(line) <= WIDTH:
        return line
    return "\n".join(textwrap.wrap(line, WIDTH, break_on_hyphens=False))


def main(args: argparse.Namespace) -> int:
    """``ferroattn bench``: prints the report; exit status 1 if ferroattn disagrees with the
    reference anywhere."""
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    bad = [r["call"] for r in report["results"] if "status" in r["ferroattn"]]
    if bad:
        print(f"ferroattn: error: wrong results in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
