"""The benchmark harness: ferroattn vs torch SDPA, ONNX Runtime and NumPy, side by side.

Run as ``ferroattn bench [options]`` or ``python benches/harness.py [options]``:

    ferroattn bench                      # every case, ~5-10 min on 2 cores
    ferroattn bench --quick              # smoke test (CI): tiny shapes, 1 repeat, seconds
    ferroattn bench --cases prefill,decode --repeats 9

All candidates run in this one process, interleaved round-robin (a rotating start), after a
warm-up; the median of the repeats is reported.  Before a peer is timed its output is checked
against ferroattn's.  Two ceilings are measured in the same run: the fp32 GEMM rate (NumPy
matmul in a subprocess whose environment has no OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE) and the
memory-read bandwidth (NumPy reductions over 1 GiB split over the threads).  Each case is
printed to stderr as it finishes; the table goes to stdout and, with JSON, a markdown copy and
a PNG chart (matplotlib), to ``benches/results/harness-<date>.*`` (see benches/README.md).

torch, onnxruntime (+ onnx), ml_dtypes, threadpoolctl and matplotlib are all optional: a
missing one shows as "not installed" in its rows.  Exit status: 0 on success, 1 if a peer
failed the accuracy check (its rows say so; the rest of the run still happens), 2 on errors.
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
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "ferroattn-bench-harness/1"
PROG = "harness"
CASES = (
    "prefill",
    "causal",
    "small",
    "lowp",
    "window",
    "decode",
    "scaling",
    "memory",
    "variants",
)
CASE_TITLES = {
    "prefill": "1. prefill fp32, non-causal",
    "causal": "2. prefill fp32, causal",
    "small": "3. small shapes and per-call overhead",
    "lowp": "4. bf16 / fp16 inputs",
    "window": "5. sliding-window causal",
    "decode": "6. decode from a KV cache",
    "scaling": "7. thread scaling",
    "memory": "8. peak memory",
    "variants": "9. variants: block-sparse density, linear attention, mask/bias overhead",
}
FA = "ferroattn"
TORCH = "torch sdpa"
ORT_MHA = "ort MHA"
ORT_GQA = "ort GQA"
NUMPY = "numpy"
FLEX = "torch flex (compiled)"
RTOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2, "int8": 5e-2}
NUMPY_MAX_SCORES = 1 << 30  # NumPy peer skipped when all B*H*Nq*Nk float32 scores exceed this
NUMPY_BLOCK_BYTES = 256 << 20  # NumPy scores computed for this many bytes at a time
ORT_MAX_SCORES = 4 << 30  # ORT's CPU kernels hold B*H*Nq*Nk float32 probabilities
TORCH_MAX_MASK = 256 << 20  # bytes of the (N, N) boolean mask for SDPA
MEMORY_EXTRA_TARGET = 16 << 20  # "a few MB": extra peak RSS allowed by case 8
CLEANED_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ENV_VARS = (
    *CLEANED_VARS,
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "FERROATTN_NUM_THREADS",
    "FERROATTN_ISA",
)


class BenchError(Exception):
    """A failure with a message for the user (exit status 2)."""


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- options


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _parse_cases(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    aliases = {str(i + 1): c for i, c in enumerate(CASES)}
    names = [aliases.get(c, c) for c in names]
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {bad or text!r}; choose from {','.join(CASES)} (or 1-8)"
        )
    return [c for c in CASES if c in names]  # fixed order


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The harness's options (shared by ``ferroattn bench`` and benches/harness.py)."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode (CI): tiny shapes, 1 repeat, no pauses; checks that every case runs "
        "and that well-formed JSON is written; timings mean nothing",
    )
    p.add_argument(
        "--cases",
        type=_parse_cases,
        default=list(CASES),
        help=f"cases to run, comma separated, by name or number [all: {','.join(CASES)}]",
    )
    p.add_argument("--threads", type=_positive, default=2, help="threads per case [2]")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats [5; quick 1]")
    p.add_argument("--warmup", type=_non_negative, default=None, help="warm-up calls [1]")
    p.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="untimed pause after each timed call, so that spinning worker threads of one "
        "library do not steal the cores of the next [100; quick 0]",
    )
    p.add_argument(
        "--no-huge",
        action="store_true",
        help="case 8 at N=16384 instead of N=32768 (1/4 of the time, 1/2 of the memory)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where harness-<date>.{json,md,png} go [./benches/results]",
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--no-chart", action="store_true", help="write no PNG chart")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs [0]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="ferroattn vs torch SDPA, ONNX Runtime and NumPy: every case of the "
        "project's benchmark issue, side by side in one process.",
    )
    add_arguments(p)
    return p


@dataclass
class Config:
    quick: bool
    cases: list[str]
    threads: int
    repeats: int
    warmup: int
    gap_ms: float
    no_huge: bool
    out_dir: Path
    save: bool
    chart: bool
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        q = bool(args.quick)
        return cls(
            quick=q,
            cases=list(args.cases),
            threads=args.threads,
            repeats=args.repeats if args.repeats is not None else (1 if q else 5),
            warmup=args.warmup if args.warmup is not None else 1,
            gap_ms=args.gap_ms if args.gap_ms is not None else (0.0 if q else 100.0),
            no_huge=bool(args.no_huge),
            out_dir=args.out_dir if args.out_dir is not None else Path.cwd() / "benches/results",
            save=not args.no_save,
            chart=not args.no_chart,
            seed=args.seed,
        )


# --------------------------------------------------------------------------- environment


def _import_optional(name: str) -> tuple[Any, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = __import__(name)
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # noqa: BLE001 (broken install: report, don't crash)
        return None, f"import failed: {_short(exc, 100)}"
    return module, None


@dataclass
class Peers:
    modules: dict[str, tuple[Any, str | None]] = field(default_factory=dict)

    def load(self) -> None:
        for name in ("torch", "onnxruntime", "onnx", "ml_dtypes", "threadpoolctl"):
            self.modules[name] = _import_optional(name)

    def get(self, name: str) -> Any:
        return self.modules[name][0]

    def status(self, name: str) -> str:
        return str(self.modules[name][1])

    def ort(self) -> tuple[Any, Any, str | None]:
        """(onnxruntime, onnx, None) or (None, None, why not)."""
        ort, onnx = self.get("onnxruntime"), self.get("onnx")
        if ort is None:
            return None, None, f"onnxruntime {self.status('onnxruntime')}"
        if onnx is None:
            return None, None, f"onnx {self.status('onnx')} (needed to build the model)"
        return ort, onnx, None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def _blas_pools(tpc: Any) -> list[dict[str, Any]] | str:
    if tpc is None:
        return "threadpoolctl not installed"
    keep = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads")
    return [{k: v for k, v in lib.items() if k in keep} for lib in tpc.threadpool_info()]


def collect_env(fa: Any, peers: Peers) -> dict[str, Any]:
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
    for name, (module, status) in peers.modules.items():
        if module is None:
            env[name] = {"status": status}
        else:
            env[name] = {"status": "ok", "version": str(getattr(module, "__version__", "?"))}
    torch = peers.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            env["torch"]["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    env["blas_pools"] = _blas_pools(peers.get("threadpoolctl"))
    return env


# --------------------------------------------------------------------------- ceilings

_GEMM_CODE = r"""
import json, sys, time
import numpy as np
n, runs = int(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), dtype=np.float32)
np.matmul(a, b, out=c)
best = float("inf")
for _ in range(runs):
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    best = min(best, time.perf_counter() - t0)
pools = []
try:
    import threadpoolctl
    keep = ("user_api", "internal_api", "version", "architecture", "num_threads")
    pools = [{k: v for k, v in p.items() if k in keep} for p in threadpoolctl.threadpool_info()]
except ImportError:
    pass
print(json.dumps({"gflops": 2.0 * n**3 / best / 1e9, "seconds": best, "pools": pools}))
"""


def measure_gemm(threads: int, n: int, runs: int) -> dict[str, Any]:
    """fp32 GEMM rate of NumPy's BLAS at `threads` threads, in a fresh interpreter whose
    environment lacks OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (OpenBLAS reads them when it
    loads, so they cannot be unset for one measurement inside this process)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEANED_VARS}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _GEMM_CODE, str(n), str(runs)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"status": f"failed: {_short(exc)}", "threads": threads, "n": n}
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit {proc.returncode}"
        return {"status": f"failed: {tail[:160]}", "threads": threads, "n": n}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = sorted(
        {str(p.get("architecture")) for p in data["pools"] if p.get("user_api") == "blas"}
    )
    return {
        "status": "ok",
        "threads": threads,
        "n": n,
        "runs": runs,
        "gflops": data["gflops"],
        "kernels": kernels,
        "pools": data["pools"],
        "cleaned_env": list(CLEANED_VARS),
    }


def measure_bandwidth(threads: int, mib: int, runs: int) -> dict[str, Any]:
    """Read rate (GB/s) of NumPy reductions (they release the GIL) over one array split
    across `threads` Python threads: the fastest of `runs` reads, best of two kernels."""
    a = np.ones((mib << 20) // 4, dtype=np.float32)  # written once: every page is mapped
    parts = np.array_split(a, threads)
    kernels: dict[str, Callable[[np.ndarray], Any]] = {
        "add.reduce": np.add.reduce,
        "maximum.reduce": np.maximum.reduce,
    }
    per: dict[str, float] = {}
    for name, fn in kernels.items():
        best = float("inf")
        for _ in range(runs):
            workers = [threading.Thread(target=fn, args=(p,)) for p in parts]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t0)
        per[name] = a.nbytes / best / 1e9
    return {"threads": threads, "mib": mib, "runs": runs, "gbs": max(per.values()), "kernels": per}


class Ceilings:
    """GEMM rate and read bandwidth per thread count, measured once per count, lazily."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.gemm: dict[int, dict[str, Any]] = {}
        self.bw: dict[int, dict[str, Any]] = {}

    def gemm_gflops(self, threads: int) -> float | None:
        if threads not in self.gemm:
            n, runs = (512, 2) if self.cfg.quick else (4096, 3)
            _progress(f"  measuring the fp32 GEMM ceiling ({n}^3, {threads} threads) ...")
            self.gemm[threads] = measure_gemm(threads, n, runs)
        g = self.gemm[threads]
        return g.get("gflops") if g.get("status") == "ok" else None

    def bandwidth_gbs(self, threads: int) -> float:
        if threads not in self.bw:
            mib, runs = (64, 3) if self.cfg.quick else (1024, 6)
            _progress(f"  measuring the read bandwidth ({mib} MiB, {threads} threads) ...")
            self.bw[threads] = measure_bandwidth(threads, mib, runs)
        return float(self.bw[threads]["gbs"])

    def as_json(self) -> dict[str, Any]:
        return {
            "gemm": {str(k): v for k, v in sorted(self.gemm.items())},
            "bandwidth": {str(k): v for k, v in sorted(self.bw.items())},
        }


# --------------------------------------------------------------------------- threads


@contextlib.contextmanager
def thread_limits(n: int, fa: Any, peers: Peers) -> Iterator[None]:
    """n threads for ferroattn, torch and NumPy's BLAS (ORT gets n in its session options)."""
    torch, tpc = peers.get("torch"), peers.get("threadpoolctl")
    prev_fa = fa.get_num_threads()
    fa.set_num_threads(n)
    prev_torch = None
    if torch is not None:
        prev_torch = torch.get_num_threads()
        torch.set_num_threads(n)
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
        if torch is not None and prev_torch is not None:
            torch.set_num_threads(prev_torch)


# --------------------------------------------------------------------------- candidates


@dataclass
class Cand:
    """One thing to time: `fn` returns an output comparable with `ref` (a key of the case's
    references) within `tol`; `setup` runs untimed before every call."""

    name: str
    fn: Callable[[], Any] | None = None
    status: str = "ok"
    ref: str | None = FA
    tol: float = RTOL["float32"]
    setup: Callable[[], None] | None = None
    convert: Callable[[Any], np.ndarray] | None = None


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, tuple):  # (out, lse)
        x = x[0]
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype != np.float64 and x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def rel_frobenius(x: np.ndarray, ref: np.ndarray) -> float:
    x64 = x.astype(np.float64, copy=False)
    r64 = ref.astype(np.float64, copy=False)
    denom = float(np.linalg.norm(r64))
    num = float(np.linalg.norm(x64 - r64))
    return num / denom if denom > 0 else num


def _scores_bytes(b: int, h: int, nq: int, nk: int) -> int:
    return 4 * b * h * nq * nk


def _band(nq: int, nk: int, causal: bool, window: int | None) -> np.ndarray:
    """Boolean (nq, nk) visibility, bottom-right aligned, window = last w keys incl. own."""
    i = np.arange(nq)[:, None] + (nk - nq)
    j = np.arange(nk)[None, :]
    keep = np.ones((nq, nk), dtype=bool)
    if causal or window is not None:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    return keep


def visible_pairs(n: int, window: int | None, causal: bool) -> int:
    """Query-key pairs a query sees (self-attention, N queries over N keys)."""
    if window is not None:
        w = min(window, n)
        return w * (w + 1) // 2 + (n - w) * w
    return n * (n + 1) // 2 if causal else n * n


def make_numpy(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False, window: int | None = None
) -> Callable[[], np.ndarray]:
    """Plain float32 matmul -> softmax -> matmul over (B, H, N, D) arrays, GQA by grouping the
    query heads of a KV head, masks as a precomputed additive -inf mask (full dense work)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    scale = np.float32(1.0 / math.sqrt(d))
    qf = q.reshape(b * hkv, g * nq, d)  # the g heads of one KV head stacked along rows
    kt = np.ascontiguousarray(k.reshape(b * hkv, nk, d).transpose(0, 2, 1))
    vf = v.reshape(b * hkv, nk, dv)
    step = max(1, NUMPY_BLOCK_BYTES // (g * nq * nk * 4))
    mask = None
    if causal or window is not None:
        mask = np.where(_band(nq, nk, causal, window), np.float32(0.0), np.float32(-np.inf))
        mask = np.tile(mask, (g, 1))

    def run() -> np.ndarray:
        out = np.empty((b * hkv, g * nq, dv), dtype=np.float32)
        for lo in range(0, b * hkv, step):
            hi = min(b * hkv, lo + step)
            s = np.matmul(qf[lo:hi], kt[lo:hi])
            s *= scale
            if mask is not None:
                s += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            denom = s.sum(axis=-1, keepdims=True)
            np.matmul(s, vf[lo:hi], out=out[lo:hi])
            out[lo:hi] /= denom
        return out.reshape(b, hq, nq, dv)

    return run


def numpy_cand(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False, window: int | None = None
) -> Cand:
    b, h, nq, _ = q.shape
    size = _scores_bytes(b, h, nq, k.shape[2])
    if size > NUMPY_MAX_SCORES:
        return Cand(NUMPY, status=f"skipped: scores {_fmt_bytes(size)} > 1 GiB")
    return Cand(NUMPY, make_numpy(q, k, v, causal, window))


def torch_cand(
    peers: Peers,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    mask: np.ndarray | None = None,
    gqa: bool = False,
    name: str = TORCH,
) -> Cand:
    torch = peers.get("torch")
    if torch is None:
        return Cand(name, status=peers.status("torch"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero copy
    tm = torch.from_numpy(mask) if mask is not None else None
    kwargs: dict[str, Any] = {"is_causal": causal} if tm is None else {"attn_mask": tm}
    if gqa:
        kwargs["enable_gqa"] = True

    def run() -> Any:
        with torch.inference_mode():
            return sdpa(tq, tk, tv, **kwargs)

    return Cand(name, run)


def _bshd(x: np.ndarray) -> np.ndarray:
    """(B, H, N, D) -> contiguous (B, N, H*D), ORT's packed layout."""
    b, h, n, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, n, h * d))


def _ort_session(ort: Any, model: Any, threads: int) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_model(onnx: Any, node: Any, inputs: list[Any], outputs: list[Any]) -> Any:
    helper = onnx.helper
    graph = helper.make_graph([node], node.op_type, inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10  # readable by every onnxruntime >= 1.20
    return model


def ort_mha_cand(
    peers: Peers, threads: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool
) -> Cand:
    """com.microsoft MultiHeadAttention (unidirectional=1 for causal), packed (B, N, H*D)."""
    ort, onnx, why = peers.ort()
    if why:
        return Cand(ORT_MHA, status=why)
    b, h, n, d = q.shape
    if k.shape[1] != h:
        return Cand(ORT_MHA, status="n/a (MHA has no grouped KV heads)")
    size = _scores_bytes(b, h, n, k.shape[2])
    if size > ORT_MAX_SCORES:
        return Cand(ORT_MHA, status=f"skipped: ORT CPU holds {_fmt_bytes(size)} of probabilities")
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    node = helper.make_node(
        "MultiHeadAttention",
        ["query", "key", "value"],
        ["output"],
        domain="com.microsoft",
        num_heads=h,
        unidirectional=int(causal),
    )
    shape = [b, n, h * d]
    model = _ort_model(
        onnx,
        node,
        [helper.make_tensor_value_info(x, f32, shape) for x in ("query", "key", "value")],
        [helper.make_tensor_value_info("output", f32, shape)],
    )
    try:
        sess = _ort_session(ort, model, threads)
    except Exception as exc:  # noqa: BLE001
        return Cand(ORT_MHA, status=f"failed: {_short(exc)}")
    feeds = {"query": _bshd(q), "key": _bshd(k), "value": _bshd(v)}

    def run() -> np.ndarray:
        return sess.run(["output"], feeds)[0]

    return Cand(ORT_MHA, run, convert=lambda o: o.reshape(b, n, h, d).transpose(0, 2, 1, 3))


def ort_gqa_prefill_cand(
    peers: Peers,
    threads: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    window: int | None = None,
) -> Cand:
    """com.microsoft GroupQueryAttention as causal self-attention (no past; always causal;
    local_window_size = w for a sliding window; kv_num_heads = num_heads is plain MHA)."""
    ort, onnx, why = peers.ort()
    if why:
        return Cand(ORT_GQA, status=why)
    b, h, n, d = q.shape
    hkv = k.shape[1]
    size = _scores_bytes(b, h, n, n)
    if size > ORT_MAX_SCORES:
        return Cand(
            ORT_GQA, status=f"skipped: ORT CPU would hold {_fmt_bytes(size)} of probabilities"
        )
    helper, tp = onnx.helper, onnx.TensorProto
    f32 = tp.FLOAT
    attrs: dict[str, Any] = {"num_heads": h, "kv_num_heads": hkv}
    if window is not None:
        attrs["local_window_size"] = window
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "", "", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        **attrs,
    )
    model = _ort_model(
        onnx,
        node,
        [
            helper.make_tensor_value_info("query", f32, [b, n, h * d]),
            helper.make_tensor_value_info("key", f32, [b, n, hkv * d]),
            helper.make_tensor_value_info("value", f32, [b, n, hkv * d]),
            helper.make_tensor_value_info("seqlens_k", tp.INT32, [b]),
            helper.make_tensor_value_info("total_sequence_length", tp.INT32, []),
        ],
        [
            helper.make_tensor_value_info("output", f32, [b, n, h * d]),
            helper.make_tensor_value_info("present_key", f32, [b, hkv, "T", d]),
            helper.make_tensor_value_info("present_value", f32, [b, hkv, "T", d]),
        ],
    )
    try:
        sess = _ort_session(ort, model, threads)
    except Exception as exc:  # noqa: BLE001
        return Cand(ORT_GQA, status=f"failed: {_short(exc)}")
    feeds = {
        "query": _bshd(q),
        "key": _bshd(k),
        "value": _bshd(v),
        "seqlens_k": np.full((b,), n - 1, dtype=np.int32),  # total length - 1
        "total_sequence_length": np.array(n, dtype=np.int32),
    }

    def run() -> np.ndarray:
        return sess.run(["output"], feeds)[0]

    return Cand(ORT_GQA, run, convert=lambda o: o.reshape(b, n, h, d).transpose(0, 2, 1, 3))


def ort_gqa_decode_cand(
    peers: Peers,
    threads: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    notes: list[str],
) -> Cand:
    """One GroupQueryAttention decode step as benches/bench_decode.py runs it: the new token's
    k/v go to position L of a shared past/present buffer of L + 1 tokens (IO binding, as in a
    decode loop), and the query attends over all L + 1 (reference "past+new")."""
    ort, onnx, why = peers.ort()
    if why:
        return Cand(ORT_GQA, status=why)
    _, h, _, d = q.shape
    _, hkv, length, _ = k.shape
    helper, tp = onnx.helper, onnx.TensorProto
    f32 = tp.FLOAT
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=h,
        kv_num_heads=hkv,
    )
    model = _ort_model(
        onnx,
        node,
        [
            helper.make_tensor_value_info("query", f32, [1, 1, h * d]),
            helper.make_tensor_value_info("key", f32, [1, 1, hkv * d]),
            helper.make_tensor_value_info("value", f32, [1, 1, hkv * d]),
            helper.make_tensor_value_info("past_key", f32, [1, hkv, "P", d]),
            helper.make_tensor_value_info("past_value", f32, [1, hkv, "P", d]),
            helper.make_tensor_value_info("seqlens_k", tp.INT32, [1]),
            helper.make_tensor_value_info("total_sequence_length", tp.INT32, []),
        ],
        [
            helper.make_tensor_value_info("output", f32, [1, 1, h * d]),
            helper.make_tensor_value_info("present_key", f32, [1, hkv, "T", d]),
            helper.make_tensor_value_info("present_value", f32, [1, hkv, "T", d]),
        ],
    )
    try:
        sess = _ort_session(ort, model, threads)
    except Exception as exc:  # noqa: BLE001
        return Cand(ORT_GQA, status=f"failed: {_short(exc)}")
    feeds = {
        "query": np.ascontiguousarray(q.reshape(1, 1, h * d)),
        "key": np.ascontiguousarray(k_new.reshape(1, 1, hkv * d)),
        "value": np.ascontiguousarray(v_new.reshape(1, 1, hkv * d)),
        "seqlens_k": np.array([length], dtype=np.int32),
        "total_sequence_length": np.array(length + 1, dtype=np.int32),
    }

    def unpack(out: np.ndarray) -> np.ndarray:
        return out.reshape(1, 1, h, d).transpose(0, 2, 1, 3)

    try:
        buf_k = np.empty((1, hkv, length + 1, d), dtype=np.float32)
        buf_v = np.empty_like(buf_k)
        buf_k[:, :, :length] = k
        buf_v[:, :, :length] = v
        ov_k = ort.OrtValue.ortvalue_from_numpy(buf_k)
        ov_v = ort.OrtValue.ortvalue_from_numpy(buf_v)
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("past_key", ov_k)
        binding.bind_ortvalue_input("past_value", ov_v)
        binding.bind_output("output")
        binding.bind_ortvalue_output("present_key", ov_k)
        binding.bind_ortvalue_output("present_value", ov_v)
        keep = (buf_k, buf_v, ov_k, ov_v)

        def run_shared() -> np.ndarray:
            sess.run_with_iobinding(binding)
            assert keep  # the buffers live as long as this closure
            return unpack(binding.get_outputs()[0].numpy())

        run_shared()
        if not np.array_equal(buf_k[:, :, length], k_new[:, :, 0]):
            raise RuntimeError("present_key was not written into the shared buffer")
        return Cand(ORT_GQA, run_shared, ref="past+new")
    except Exception as exc:  # noqa: BLE001 (fall back to separate past/present)
        notes.append(f"ort: shared past/present buffer failed ({_short(exc, 100)}); copies")
    full = dict(feeds, past_key=k, past_value=v)
    return Cand(ORT_GQA, lambda: unpack(sess.run(["output"], full)[0]), ref="past+new")


# --------------------------------------------------------------------------- timing


def _gc_off() -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        was = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if was:
                gc.enable()

    return cm()


def check_and_time(
    cands: list[Cand],
    refs: dict[str, np.ndarray],
    cfg: Config,
    *,
    flush: Callable[[], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Accuracy first (each candidate once against its reference), then warm-up and
    round-robin timing of the candidates that passed.  Returns per-candidate results and
    whether every check passed.  A candidate whose `ref` is missing from `refs` becomes the
    reference itself (its own output is stored under its name)."""
    res: dict[str, dict[str, Any]] = {}
    live: list[Cand] = []
    ok = True
    for c in cands:
        if c.fn is None:
            res[c.name] = {"status": c.status}
            continue
        if c.setup:
            c.setup()
        try:
            out = c.fn()
            arr = c.convert(out) if c.convert else out
            arr = _to_numpy(arr)
        except Exception as exc:  # noqa: BLE001 (a peer that fails is reported, not fatal)
            if c.name == FA:
                raise
            res[c.name] = {"status": f"failed: {_short(exc)}"}
            continue
        del out
        if c.ref is None or c.ref not in refs:
            refs[c.ref or c.name] = arr
            if not np.all(np.isfinite(arr)):
                raise BenchError(f"{c.name} output has non-finite values")
            res[c.name] = {"status": "ok", "rel_err": None}
        else:
            ref = refs[c.ref]
            if arr.shape != ref.shape:
                res[c.name] = {"status": f"failed: shape {arr.shape} != {ref.shape}"}
                ok = False
                continue
            err = rel_frobenius(arr, ref)
            if not err < c.tol:
                res[c.name] = {
                    "status": f"ACCURACY CHECK FAILED: rel err {err:.2e} >= {c.tol:g}",
                    "rel_err": err,
                }
                ok = False
                continue
            res[c.name] = {"status": "ok", "rel_err": err}
        live.append(c)

    for _ in range(cfg.warmup):
        for c in live:
            if c.setup:
                c.setup()
            c.fn()  # type: ignore[misc]
    samples: dict[str, list[float]] = {c.name: [] for c in live}
    with _gc_off():
        for r in range(cfg.repeats):
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for c in order:
                if c.setup:
                    c.setup()
                if flush:
                    flush()
                t0 = time.perf_counter()
                result = c.fn()  # type: ignore[misc]
                dt = time.perf_counter() - t0
                del result
                samples[c.name].append(dt * 1e3)
                if cfg.gap_ms > 0:
                    time.sleep(cfg.gap_ms / 1e3)
    for name, ms in samples.items():
        med = statistics.median(ms)
        res[name].update(
            {
                "median_ms": med,
                "min_ms": min(ms),
                "max_ms": max(ms),
                "spread": (max(ms) - min(ms)) / med if med > 0 else None,
                "samples_ms": ms,
            }
        )
    return res, ok


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One case's rows: each row a candidate of one sub-case (label)."""

    id: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accuracy_ok: bool = True

    def add(
        self,
        label: str,
        name: str,
        r: dict[str, Any],
        *,
        threads: int,
        flops: float | None = None,
        nbytes: float | None = None,
        fa_ms: float | None = None,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"case": self.id, "label": label, "candidate": name}
        row["threads"] = threads
        row.update(r)
        med = r.get("median_ms")
        if r.get("status") == "ok" and med:
            if flops is not None:
                row["flops"] = flops
                row["gflops"] = flops / (med * 1e-3) / 1e9
            if nbytes is not None:
                row["bytes"] = nbytes
                row["gbs"] = nbytes / (med * 1e-3) / 1e9
            if fa_ms and not name.startswith(FA):  # peers only (fa variants: see targets)
                row["peer_over_fa"] = med / fa_ms
        self.rows.append(row)
        return row


def target(
    row: dict[str, Any], text: str, value: float | None, ok: bool | None, unit: str = "x"
) -> None:
    """Attach a project target to a row: `value` (in `unit`: "x", "%", "us", "MiB" or "" for
    a plain ratio) is what is compared; ok None = n/a."""
    if row.get("status") != "ok" or value is None or ok is None:
        result = "n/a"
    else:
        result = "PASS" if ok else "MISS"
    row["target"] = {"text": text, "value": value, "unit": unit, "result": result}


def share_ceilings(case: Case, ceil: Ceilings) -> None:
    for row in case.rows:
        if row.get("gflops") is not None:
            g = ceil.gemm_gflops(row["threads"])
            if g:
                row["pct_gemm"] = 100.0 * row["gflops"] / g
        if row.get("gbs") is not None:
            row["pct_bw"] = 100.0 * row["gbs"] / ceil.bandwidth_gbs(row["threads"])


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _ratio_target(row: dict[str, Any], at_least: float, what: str, peers_ok: bool = True) -> None:
    target(
        row,
        f"{what} >= {at_least:g}x",
        row.get("peer_over_fa"),
        (row.get("peer_over_fa") or 0) >= at_least if peers_ok else None,
    )


def case_prefill(fa: Any, peers: Peers, cfg: Config, causal: bool) -> Case:
    cid = "causal" if causal else "prefill"
    case = Case(cid, CASE_TITLES[cid])
    h, n, dims = (2, 128, (32, 64)) if cfg.quick else (16, 2048, (64, 128))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed)
    for d in dims:
        label = f"B=1 H={h} N={n} D={d}"
        q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
        flops = 4.0 * h * n * n * d * (0.5 if causal else 1.0)
        with thread_limits(t, fa, peers):
            cands = [Cand(FA, partial(fa.attention, q, k, v, causal=causal))]
            if causal:
                cands.append(Cand(f"{FA} non-causal", partial(fa.attention, q, k, v), ref=None))
            cands.append(torch_cand(peers, q, k, v, causal=causal))
            cands.append(ort_mha_cand(peers, t, q, k, v, causal))
            if causal:
                cands.append(ort_gqa_prefill_cand(peers, t, q, k, v))
            else:
                cands.append(Cand(ORT_GQA, status="n/a (GroupQueryAttention is causal only)"))
            cands.append(numpy_cand(q, k, v, causal))
            res, ok = check_and_time(cands, {}, cfg)
        case.accuracy_ok &= ok
        fa_ms = res[FA].get("median_ms")
        rows = {}
        for c in cands:
            full = flops if c.name != f"{FA} non-causal" else 4.0 * h * n * n * d
            rows[c.name] = case.add(label, c.name, res[c.name], threads=t, flops=full, fa_ms=fa_ms)
        if causal:
            nc = rows[f"{FA} non-causal"]
            fr = rows[FA]
            ratio = fa_ms / nc["median_ms"] if nc.get("median_ms") and fa_ms else None
            fr["causal_over_noncausal"] = ratio
            target(fr, "causal/non-causal time <= 0.55", ratio, (ratio or 1) <= 0.55, "")
            _ratio_target(rows[ORT_GQA], 1.5, "ort GQA/fa")
        else:
            _ratio_target(rows[ORT_MHA], 1.0, "ort MHA/fa")
            _ratio_target(rows[TORCH], 2.5, "torch/fa")
        del q, k, v
    return case


def _per_call_us(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def case_small(fa: Any, peers: Peers, cfg: Config) -> Case:
    case = Case("small", CASE_TITLES["small"])
    b, h, n, d = (4, 2, 32, 16) if cfg.quick else (32, 12, 128, 32)
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 3)
    label = f"B={b} H={h} N={n} D={d}"
    q, k, v = (_rand(rng, b, h, n, d) for _ in range(3))
    with thread_limits(t, fa, peers):
        cands = [
            Cand(FA, lambda: fa.attention(q, k, v)),
            torch_cand(peers, q, k, v),
            ort_mha_cand(peers, t, q, k, v, False),
            numpy_cand(q, k, v),
        ]
        res, ok = check_and_time(cands, {}, cfg)
    case.accuracy_ok &= ok
    flops = 4.0 * b * h * n * n * d
    fa_ms = res[FA].get("median_ms")
    rows = {
        c.name: case.add(label, c.name, res[c.name], threads=t, flops=flops, fa_ms=fa_ms)
        for c in cands
    }
    _ratio_target(rows[TORCH], 1.5, "torch/fa")

    # Per-call overhead: many calls on a tiny input, median of the repeats (us per call).
    label = "overhead B=1 H=1 N=1 D=8"
    tq, tk, tv = (_rand(rng, 1, 1, 1, 8) for _ in range(3))
    calls = 300 if cfg.quick else 5000
    fns: dict[str, Callable[[], Any]] = {FA: lambda: fa.attention(tq, tk, tv)}
    torch = peers.get("torch")
    if torch is not None:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        xt = [torch.from_numpy(x) for x in (tq, tk, tv)]

        def torch_tiny() -> Any:
            with torch.inference_mode():
                return sdpa(*xt)

        fns[TORCH] = torch_tiny
    us: dict[str, list[float]] = {name: [] for name in fns}
    reps = max(cfg.repeats, 3)
    with thread_limits(t, fa, peers), _gc_off():
        for fn in fns.values():
            _per_call_us(fn, max(10, calls // 10))  # warm-up
        names = list(fns)
        for r in range(reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                us[name].append(_per_call_us(fns[name], calls))
    fa_us = statistics.median(us[FA])
    for name, vals in us.items():
        med = statistics.median(vals)
        stats = {
            "status": "ok",
            "median_ms": med / 1e3,
            "min_ms": min(vals) / 1e3,
            "max_ms": max(vals) / 1e3,
            "spread": (max(vals) - min(vals)) / med if med > 0 else None,
            "per_call_us": med,
            "calls_per_repeat": calls,
        }
        row = case.add(label, name, stats, threads=t, fa_ms=fa_us / 1e3)
        if name == FA:
            target(row, "per call < 10 us", med, med < 10.0, "us")
    if torch is None:
        case.add(label, TORCH, {"status": peers.status("torch")}, threads=t)
    return case


def case_lowp(fa: Any, peers: Peers, cfg: Config) -> Case:
    case = Case("lowp", CASE_TITLES["lowp"])
    h, n, dims = (2, 128, (32, 64)) if cfg.quick else (16, 2048, (64, 128))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 4)
    features = []
    with contextlib.suppress(Exception):
        features = [str(f) for f in fa.info().get("cpu_features", [])]
    has_bf16 = "avx512_bf16" in features
    mld = peers.get("ml_dtypes")
    for d in dims:
        label = f"B=1 H={h} N={n} D={d}"
        q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
        flops = 4.0 * h * n * n * d
        cands = [Cand(FA + " fp32", partial(fa.attention, q, k, v), ref=None)]
        if mld is None:
            cands.append(Cand(FA + " bf16", status=f"ml_dtypes {peers.status('ml_dtypes')}"))
        else:
            qb, kb, vb = (x.astype(mld.bfloat16) for x in (q, k, v))
            cands.append(
                Cand(
                    FA + " bf16",
                    partial(fa.attention, qb, kb, vb),
                    ref=FA + " fp32",
                    tol=RTOL["bfloat16"],
                )
            )
        qh, kh, vh = (x.astype(np.float16) for x in (q, k, v))
        cands.append(
            Cand(
                FA + " fp16",
                partial(fa.attention, qh, kh, vh),
                ref=FA + " fp32",
                tol=RTOL["float16"],
            )
        )
        with thread_limits(t, fa, peers):
            res, ok = check_and_time(cands, {}, cfg)
        case.accuracy_ok &= ok
        base = res[FA + " fp32"].get("median_ms")
        for c in cands:
            row = case.add(label, c.name, res[c.name], threads=t, flops=flops)
            med = row.get("median_ms")
            if c.name == FA + " fp32" or not med or not base:
                continue
            speed = base / med  # throughput vs our fp32
            row["throughput_vs_fp32"] = speed
            if c.name.endswith("bf16"):
                if has_bf16:
                    target(row, "bf16 throughput >= 1.6x fp32", speed, speed >= 1.6)
                else:
                    target(row, "bf16 throughput >= 1.0x fp32", speed, speed >= 1.0)
                    row["target"]["note"] = "1.6x: not applicable (no avx512_bf16)"
            else:
                target(row, "fp16 throughput >= 1.0x fp32", speed, speed >= 1.0)
    if not has_bf16:
        case.notes.append(
            "bf16 >= 1.6x fp32 target: not applicable on this CPU (no avx512_bf16 in "
            "ferroattn.info()['cpu_features']); only 'never slower than fp32' is checked"
        )
    return case


def _flex_cand(peers: Peers, q: np.ndarray, k: np.ndarray, v: np.ndarray, w: int) -> Cand:
    torch = peers.get("torch")
    if torch is None:
        return Cand(FLEX, status=peers.status("torch"))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001
        return Cand(FLEX, status=f"n/a: {_short(exc, 100)}")
    n = q.shape[2]

    def sliding(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    try:
        block_mask = create_block_mask(sliding, None, None, n, n, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        return Cand(FLEX, status=f"n/a: {_short(exc, 120)}")
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def run() -> Any:
        with torch.inference_mode():
            return flex(tq, tk, tv, block_mask=block_mask)

    return Cand(FLEX, run)


def case_window(fa: Any, peers: Peers, cfg: Config) -> Case:
    case = Case("window", CASE_TITLES["window"])
    h, d, w, ns = (2, 32, 64, (512, 2048)) if cfg.quick else (16, 64, 1024, (8192, 32768))
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 5)
    fa_rows: dict[int, dict[str, Any]] = {}
    for n in ns:
        label = f"B=1 H={h} N={n} D={d} w={w}"
        q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
        flops = 4.0 * h * d * visible_pairs(n, w, True)
        with thread_limits(t, fa, peers):
            cands = [Cand(FA, partial(fa.attention, q, k, v, causal=True, window=w))]
            if n * n > TORCH_MAX_MASK:
                cands.append(
                    Cand(
                        TORCH + "+mask",
                        status=f"skipped: the (N, N) bool mask is {_fmt_bytes(n * n)} "
                        f"(dense work {n // w}x ours); too big",
                    )
                )
            else:
                mask = _band(n, n, True, w)
                cands.append(torch_cand(peers, q, k, v, mask=mask, name=TORCH + "+mask"))
            if cfg.quick:
                cands.append(Cand(FLEX, status="skipped in --quick (torch.compile takes minutes)"))
            else:
                _progress(f"  compiling FlexAttention for N={n} (first call) ...")
                cands.append(_flex_cand(peers, q, k, v, w))
            cands.append(ort_gqa_prefill_cand(peers, t, q, k, v, window=w))
            cands.append(Cand(ORT_MHA, status="n/a (no sliding window in MultiHeadAttention)"))
            cands.append(numpy_cand(q, k, v, True, w))
            res, ok = check_and_time(cands, {}, cfg)
        case.accuracy_ok &= ok
        fa_ms = res[FA].get("median_ms")
        rows = {
            c.name: case.add(label, c.name, res[c.name], threads=t, flops=flops, fa_ms=fa_ms)
            for c in cands
        }
        fa_rows[n] = rows[FA]
        _ratio_target(rows[FLEX], 3.0, "flex/fa")
        if n == ns[0]:
            _ratio_target(rows[TORCH + "+mask"], 10.0, "sdpa+mask/fa")
        del q, k, v
    small, big = fa_rows[ns[0]], fa_rows[ns[1]]
    if small.get("median_ms") and big.get("median_ms"):
        growth = big["median_ms"] / small["median_ms"]
        big["time_over_smaller_n"] = growth
        target(big, f"time(N={ns[1]}) <= 4.4x time(N={ns[0]})", growth, growth <= 4.4, "")
    return case


def _kv_bytes(dtype: str, hkv: int, length: int, d: int) -> int:
    """Bytes of K and V storage for `length` tokens (as benches/bench_decode.py counts them:
    int8 adds one float32 scale per token, head and tensor)."""
    item = {"float32": 4, "float16": 2, "int8": 1}[dtype]
    total = 2 * hkv * length * d * item
    if dtype == "int8":
        total += 2 * hkv * length * 4
    return total


def _reference64(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(D)) v, B=1, GQA, no mask."""
    _, h, _, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = np.empty((1, h, q.shape[2], v.shape[3]), dtype=np.float64)
    for j in range(hkv):
        qj = q[0, j * g : (j + 1) * g].astype(np.float64)
        s = qj @ k[0, j].astype(np.float64).T / math.sqrt(d)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out[0, j * g : (j + 1) * g] = s @ v[0, j].astype(np.float64)
    return out


def case_decode(fa: Any, peers: Peers, cfg: Config, ceil: Ceilings) -> Case:
    case = Case("decode", CASE_TITLES["decode"])
    h, hkv, d, length = (8, 2, 32, 512) if cfg.quick else (32, 8, 128, 32768)
    flush_mib = 0 if cfg.quick else 256
    t = cfg.threads
    rng = np.random.default_rng(cfg.seed + 6)
    label = f"Hq={h} Hkv={hkv} D={d} L={length}"
    q = _rand(rng, 1, h, 1, d)
    k, v = (_rand(rng, 1, hkv, length, d) for _ in range(2))
    k_new, v_new = (_rand(rng, 1, hkv, 1, d) for _ in range(2))
    refs = {
        "past": _reference64(q, k, v),
        "past+new": _reference64(
            q, np.concatenate([k, k_new], axis=2), np.concatenate([v, v_new], axis=2)
        ),
    }
    buf = np.ones((flush_mib << 20) // 4, dtype=np.float32) if flush_mib else None

    def flush() -> None:
        if buf is not None:
            np.maximum.reduce(buf)

    cands: list[Cand] = []
    nbytes: dict[str, int] = {}
    caches: list[Any] = []
    with thread_limits(t, fa, peers):
        for dt in ("float32", "float16", "int8"):
            name = f"{FA} KVCache {dt}"
            try:
                cache = fa.KVCache(1, hkv, d, length, dtype=dt)
                cache.append(k, v)
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                cands.append(Cand(name, status=f"failed: {_short(exc)}"))
                continue
            caches.append(cache)
            cands.append(Cand(name, partial(cache.attend, q), ref="past", tol=RTOL[dt]))
            nbytes[name] = _kv_bytes(dt, hkv, length, d)
        cands.append(torch_cand(peers, q, k, v, gqa=True))
        cands[-1].ref = "past"
        nbytes[TORCH] = _kv_bytes("float32", hkv, length, d)
        cands.append(ort_gqa_decode_cand(peers, t, q, k, v, k_new, v_new, case.notes))
        nbytes[ORT_GQA] = _kv_bytes("float32", hkv, length + 1, d)
        cands.append(numpy_cand(q, k, v))
        cands[-1].ref = "past"
        nbytes[NUMPY] = _kv_bytes("float32", hkv, length, d)
        res, ok = check_and_time(cands, refs, cfg, flush=flush)
        caches.clear()
    case.accuracy_ok &= ok
    fa32 = f"{FA} KVCache float32"
    fa_ms = res.get(fa32, {}).get("median_ms")
    bw = ceil.bandwidth_gbs(t)
    rows = {}
    for c in cands:
        rows[c.name] = case.add(
            label, c.name, res[c.name], threads=t, nbytes=nbytes.get(c.name), fa_ms=fa_ms
        )
    for c in cands:
        row = rows[c.name]
        if c.name.startswith(FA) and row.get("gbs") is not None:
            pct = 100.0 * row["gbs"] / bw
            target(row, "K/V read >= 80% of bandwidth", pct, pct >= 80.0, "%")
    _ratio_target(rows[ORT_GQA], 2.0, "ort GQA/fa fp32")
    _ratio_target(rows[TORCH], 5.0, "torch/fa fp32")
    case.notes.append(
        f"decode: caches flushed before every timed call ({flush_mib} MiB read, untimed); "
        "peer/fa ratios are against the float32 KVCache row; ORT attends over L+1 keys "
        "(the new token appended in place, as in bench_decode.py)"
    )
    return case


def case_scaling(fa: Any, peers: Peers, cfg: Config) -> Case:
    case = Case("scaling", CASE_TITLES["scaling"])
    h, n, d = (2, 128, 32) if cfg.quick else (16, 2048, 64)
    hi = cfg.threads if cfg.threads > 1 else 2
    rng = np.random.default_rng(cfg.seed + 7)
    label = f"B=1 H={h} N={n} D={d}"
    q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
    flops = 4.0 * h * n * n * d
    prev = fa.get_num_threads()

    def threads(nt: int) -> Callable[[], None]:
        return lambda: fa.set_num_threads(nt)

    cands = [
        Cand(f"{FA} 1 thread", lambda: fa.attention(q, k, v), ref=None, setup=threads(1)),
        Cand(
            f"{FA} {hi} threads",
            lambda: fa.attention(q, k, v),
            ref=f"{FA} 1 thread",
            setup=threads(hi),
        ),
    ]
    tpc = peers.get("threadpoolctl")
    limiter = tpc.threadpool_limits(limits=hi, user_api="blas") if tpc else contextlib.nullcontext()
    try:
        with limiter:
            res, ok = check_and_time(cands, {}, cfg)
    finally:
        fa.set_num_threads(prev)
    case.accuracy_ok &= ok
    one = case.add(label, cands[0].name, res[cands[0].name], threads=1, flops=flops)
    many = case.add(label, cands[1].name, res[cands[1].name], threads=hi, flops=flops)
    if one.get("median_ms") and many.get("median_ms"):
        s = one["median_ms"] / many["median_ms"]
        many["speedup_over_1_thread"] = s
        target(many, f"{hi} threads vs 1 >= {0.925 * hi:g}x", s, s >= 0.925 * hi)
    if hi > (os.cpu_count() or 1):
        case.notes.append(f"scaling: {hi} threads on {os.cpu_count()} logical CPUs")
    return case


def _density_layout(n_blocks: int, per_row: int, rng: np.random.Generator) -> np.ndarray:
    """A block layout with `per_row` live blocks in every row (the diagonal among them)."""
    layout = np.eye(n_blocks, dtype=bool)
    for row in range(n_blocks):
        others = np.setdiff1d(np.arange(n_blocks), [row])
        layout[row, rng.choice(others, size=per_row - 1, replace=False)] = True
    return layout


def case_variants(fa: Any, cfg: Config) -> Case:
    """Issue D's figures: block-sparse time against density, linear attention time against N,
    and the cost of an all-true mask / all-zero bias over the plain kernel."""
    case = Case("variants", CASE_TITLES["variants"])
    rng = np.random.default_rng(cfg.seed + 9)
    nt = cfg.threads

    # Block-sparse: the same shape at falling densities; each layout is its own reference.
    h, n, d, bs = (2, 512, 32, 64) if cfg.quick else (8, 4096, 64, 64)
    nb = n // bs
    q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
    shares = [1.0, 0.5, 0.25, 0.125]
    cands = []
    for share in shares:
        layout = _density_layout(nb, max(1, round(share * nb)), rng)
        name = f"{FA} density {share:.3g}"
        cands.append(
            Cand(
                name,
                partial(fa.attention, q, k, v, block_layout=layout, block_size=bs),
                ref=None,
            )
        )
    res, ok = check_and_time(cands, {}, cfg)
    case.accuracy_ok &= ok
    label = f"block-sparse H={h} N={n} D={d} bs={bs}"
    rows = [case.add(label, c.name, res[c.name], threads=nt) for c in cands]
    times = [float(r["median_ms"]) for r in rows if r.get("median_ms")]
    if len(times) == len(rows):
        for r, t in zip(rows, times, strict=True):
            r["time_over_dense"] = t / times[0]
        falling = all(a > b for a, b in zip(times, times[1:], strict=False))
        target(rows[-1], "time falls with density", times[-1] / times[0], falling, unit="")

    # Linear attention: time against N (doubling N should double the time).
    h, d = (2, 32) if cfg.quick else (8, 64)
    lengths = [128, 256, 512] if cfg.quick else [1024, 2048, 4096, 8192]
    lin_rows = []
    for n in lengths:
        q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
        c = Cand(
            f"{FA} linear causal",
            partial(fa.linear_attention, q, k, v, causal=True),
            ref=None,
        )
        res, ok = check_and_time([c], {}, cfg)
        case.accuracy_ok &= ok
        lin_rows.append(case.add(f"linear H={h} N={n} D={d}", c.name, res[c.name], threads=nt))
    lt = [float(r["median_ms"]) for r in lin_rows if r.get("median_ms")]
    if len(lt) == len(lin_rows):
        growth = lt[-1] / lt[0]
        expected = lengths[-1] / lengths[0]
        lin_rows[-1]["time_over_first"] = growth
        target(
            lin_rows[-1],
            f"time(N={lengths[-1]}) / time(N={lengths[0]}) <= 1.25 x {expected:g} (linear)",
            growth,
            growth <= 1.25 * expected,
            unit="",
        )

    # Mask / bias overhead where they change nothing (all-true, all-zero).
    h, n, d = (2, 256, 32) if cfg.quick else (16, 2048, 64)
    q, k, v = (_rand(rng, 1, h, n, d) for _ in range(3))
    ones = np.ones((n, n), dtype=bool)
    zeros = np.zeros((n, n), dtype=np.float32)
    cands = [
        Cand(f"{FA} plain", lambda: fa.attention(q, k, v), ref=None),
        Cand(f"{FA} mask all-true", lambda: fa.attention(q, k, v, mask=ones), ref=f"{FA} plain"),
        Cand(f"{FA} bias all-zero", lambda: fa.attention(q, k, v, bias=zeros), ref=f"{FA} plain"),
    ]
    res, ok = check_and_time(cands, {}, cfg)
    case.accuracy_ok &= ok
    label = f"mask/bias H={h} N={n} D={d}"
    flops = 4.0 * h * n * n * d
    plain = case.add(label, cands[0].name, res[cands[0].name], threads=nt, flops=flops)
    for c in cands[1:]:
        row = case.add(label, c.name, res[c.name], threads=nt, flops=flops)
        if plain.get("median_ms") and row.get("median_ms"):
            over = row["median_ms"] / plain["median_ms"]
            row["time_over_plain"] = over
            target(row, "time <= 1.10 x plain", over, over <= 1.10, unit="")
    return case


_MEMORY_CODE = r"""
import json, os, resource, sys, time
import numpy as np
import ferroattn as fa
h, n, d, threads = (int(x) for x in sys.argv[1:5])
fa.set_num_threads(threads)
x = np.zeros((1, 1, 4, 8), dtype=np.float32)
fa.attention(x, x, x)  # the thread pool exists before the baseline
def status(key):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rng = np.random.default_rng(0)
arrs = [np.empty((1, h, n, d), dtype=np.float32) for _ in range(3)]
for a in arrs:
    rng.standard_normal(out=a, dtype=np.float32)
out = np.empty((1, h, n, d), dtype=np.float32)
out.fill(0.0)  # touched: its pages count in the baseline
# ru_maxrss survives exec (a child starts with its parent's peak), so on Linux the peak is
# reset here ("5" > clear_refs resets VmHWM) and read back from VmHWM.
reset = False
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    pass
base_rss = status("VmRSS")
base_hwm = status("VmHWM")
base_maxrss = maxrss()
t0 = time.perf_counter()
fa.attention(*arrs, out=out)
sec = time.perf_counter() - t0
print(json.dumps({"base_rss": base_rss, "base_hwm": base_hwm, "hwm": status("VmHWM"),
                  "base_maxrss": base_maxrss, "maxrss": maxrss(), "hwm_reset": reset,
                  "inputs_output_bytes": 4 * h * n * d * 4, "seconds": sec}))
"""


def case_memory(fa: Any, peers: Peers, cfg: Config) -> Case:
    case = Case("memory", CASE_TITLES["memory"])
    if cfg.quick:
        h, n, d, mode = 2, 1024, 64, "quick"
    elif cfg.no_huge:
        h, n, d, mode = 16, 16384, 128, "--no-huge"
    else:
        h, n, d, mode = 16, 32768, 128, "full"
    t = cfg.threads
    label = f"B=1 H={h} N={n} D={d} ({mode})"
    _progress(f"  case 8 runs one call at N={n} in a subprocess ...")
    env = dict(os.environ)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CODE, str(h), str(n), str(d), str(t)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit {proc.returncode}"
            raise RuntimeError(tail[:200])
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001
        case.add(label, FA, {"status": f"failed: {_short(exc)}"}, threads=t)
        return case
    if data.get("hwm_reset") and data.get("hwm") is not None and data.get("base_rss"):
        source, peak, base = "VmHWM (reset after the allocations)", data["hwm"], data["base_rss"]
    else:  # ru_maxrss: a peak since the process started (and inherited over exec)
        source, peak, base = "ru_maxrss", data["maxrss"], max(data["base_maxrss"], 0)
    extra = max(0, peak - base)
    ms = data["seconds"] * 1e3
    r = {
        "status": "ok",
        "median_ms": ms,
        "min_ms": ms,
        "max_ms": ms,
        "spread": 0.0,
        "samples_ms": [ms],
        "mode": mode,
        "peak_source": source,
        "peak_rss_bytes": peak,
        "rss_after_inputs_bytes": base,
        "ru_maxrss_bytes": data["maxrss"],
        "inputs_output_bytes": data["inputs_output_bytes"],
        "extra_bytes": extra,
        "extra_over_inputs_output": extra / data["inputs_output_bytes"],
    }
    row = case.add(label, FA, r, threads=t, flops=4.0 * h * n * n * d)
    target(
        row,
        f"extra peak RSS <= {_fmt_bytes(MEMORY_EXTRA_TARGET)}",
        extra / (1 << 20),
        extra <= MEMORY_EXTRA_TARGET,
        "MiB",
    )
    case.notes.append(
        f"memory: N={n} ({mode}); extra = peak RSS during one call ({source}) - RSS after "
        f"allocating q, k, v and out ({_fmt_bytes(data['inputs_output_bytes'])}; out= given): "
        f"{_fmt_bytes(extra)} = {100 * extra / data['inputs_output_bytes']:.2f}% of them"
    )
    return case


# --------------------------------------------------------------------------- output


def _fmt_bytes(x: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{int(x)} B"


HEADERS = [
    "case",
    "shape",
    "thr",
    "candidate",
    "ms",
    "GFLOP/s",
    "GB/s",
    "% ceiling",
    "peer/fa",
    "target",
    "measured",
    "result",
]


def _fmt_ms(ms: float) -> str:
    if ms < 0.1:
        return f"{ms * 1e3:.2f}us"
    return f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def _measured(row: dict[str, Any]) -> str:
    t = row.get("target")
    if not t or t.get("value") is None:
        return ""
    v, unit = t["value"], t.get("unit", "x")
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "%":
        return f"{v:.0f}%"
    if unit in ("us", "MiB"):
        return f"{v:.2f} {unit}" if unit == "us" else f"{v:.1f} {unit}"
    return f"{v:.3f}"


def table_rows(cases: list[Case]) -> list[list[str]]:
    rows = []
    for case in cases:
        for row in case.rows:
            base = [case.id, row["label"], str(row["threads"]), row["candidate"]]
            if row.get("status") != "ok":
                rows.append([*base, str(row.get("status"))] + [""] * (len(HEADERS) - 5))
                continue
            ceil = []
            if row.get("pct_gemm") is not None:
                ceil.append(f"{row['pct_gemm']:.0f}% gemm")
            if row.get("pct_bw") is not None:
                ceil.append(f"{row['pct_bw']:.0f}% bw")
            t = row.get("target") or {}
            result = t.get("result", "")
            if t.get("note"):
                result += f" ({t['note']})"
            ms = row["median_ms"]
            rows.append(
                [
                    *base,
                    f"{row['per_call_us']:.2f}us/call" if "per_call_us" in row else _fmt_ms(ms),
                    f"{row['gflops']:.1f}" if row.get("gflops") is not None else "",
                    f"{row['gbs']:.1f}" if row.get("gbs") is not None else "",
                    " ".join(ceil),
                    f"{row['peer_over_fa']:.2f}x" if row.get("peer_over_fa") else "",
                    t.get("text", ""),
                    _measured(row),
                    result,
                ]
            )
    return rows


def _is_status(row: list[str]) -> bool:
    return not any(row[5:])


def format_text_table(rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in HEADERS]
    for row in rows:
        for i, cell in enumerate(row[:4] if _is_status(row) else row):
            widths[i] = max(widths[i], len(cell))
    right = {4, 5, 6, 7, 8, 10}

    def fmt(row: list[str]) -> str:
        if _is_status(row) and row is not HEADERS:
            return "  ".join(f"{c:<{widths[i]}}" for i, c in enumerate(row[:4])) + "  " + row[4]
        return "  ".join(
            f"{c:>{widths[i]}}" if i in right else f"{c:<{widths[i]}}" for i, c in enumerate(row)
        ).rstrip()

    out = [fmt(HEADERS), "  ".join("-" * w for w in widths)]
    prev = None
    for row in rows:
        if prev is not None and row[:2] != prev:
            out.append("")
        prev = row[:2]
        out.append(fmt(row))
    return out


FOOTNOTES = [
    "ms: median wall time of one call over the repeats (candidates interleaved round-robin).",
    "GFLOP/s: 4*B*H*Nq*Nk*D, counting only the query-key pairs a query sees (half for "
    "causal, the band for a window; NumPy and SDPA+mask do more work than that).",
    "GB/s (decode): bytes of K/V storage read / median time.",
    "% ceiling: GFLOP/s as % of the fp32 GEMM rate, GB/s as % of the read bandwidth, both "
    "measured in this run at the row's thread count.",
    "peer/fa: peer ms / ferroattn ms (> 1: ferroattn faster).  PASS/MISS: the project's target.",
]


def header_lines(env: dict[str, Any], cfg: Config, ceil: Ceilings) -> list[str]:
    fa = env["ferroattn"]
    lines = [
        f"ferroattn benchmark harness  {env['date']}" + ("  [QUICK]" if cfg.quick else ""),
        f"cpu: {env['cpu']} ({env['logical_cpus']} logical CPUs, load average "
        f"{env['loadavg_at_start']} at start)",
        f"python {env['python']}  numpy {env['numpy']}  {env['platform']}",
        f"ferroattn {fa.get('version')}  isa={fa.get('isa')}  "
        f"cpu_features={' '.join(map(str, fa.get('cpu_features', [])))}",
    ]
    peers = []
    for name in ("torch", "onnxruntime", "onnx", "ml_dtypes", "threadpoolctl"):
        e = env.get(name, {})
        peers.append(
            f"{name} {e['version']}" if e.get("status") == "ok" else f"{name}: {e.get('status')}"
        )
    lines.append("peers: " + "  ".join(peers))
    ev = [f"{k}={v}" for k, v in env["env_vars"].items() if v is not None]
    lines.append("env: " + ("  ".join(ev) if ev else "(none of " + ", ".join(ENV_VARS) + " set)"))
    pools = env["blas_pools"]
    if isinstance(pools, list):
        for p in (p for p in pools if p.get("user_api") == "blas"):
            lines.append(
                f"numpy BLAS in this process: {p.get('internal_api')} {p.get('version')} "
                f"kernel={p.get('architecture')}"
            )
    for t, g in sorted(ceil.gemm.items()):
        if g.get("status") == "ok":
            lines.append(
                f"ceiling fp32 GEMM, {t} thread(s): {g['gflops']:.1f} GFLOP/s (NumPy matmul "
                f"{g['n']}^3, best of {g['runs']}, subprocess without "
                f"{'/'.join(CLEANED_VARS)}; kernel={','.join(g['kernels']) or '?'})"
            )
        else:
            lines.append(f"ceiling fp32 GEMM, {t} thread(s): {g.get('status')}")
    for t, b in sorted(ceil.bw.items()):
        lines.append(
            f"ceiling read bandwidth, {t} thread(s): {b['gbs']:.1f} GB/s (NumPy reductions "
            f"over {b['mib']} MiB split over the threads, fastest of {b['runs']})"
        )
    lines.append(
        f"threads={cfg.threads}  repeats={cfg.repeats} (median)  warmup={cfg.warmup}  "
        f"gap={cfg.gap_ms:g}ms  cases={','.join(cfg.cases)}"
    )
    return lines


def target_summary(cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        for row in case.rows:
            t = row.get("target")
            if t:
                out.append(
                    {
                        "case": case.id,
                        "label": row["label"],
                        "candidate": row["candidate"],
                        "target": t["text"],
                        "value": t["value"],
                        "result": t["result"],
                    }
                )
    return out


def format_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = ["# ferroattn benchmark harness", "", "```", *header, "```", ""]
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append(
        "|"
        + "|".join("---:" if i in (4, 5, 6, 7, 8, 10) else ":---" for i in range(len(HEADERS)))
        + "|"
    )
    for row in rows:
        cells = [c.replace("|", "/") for c in row]
        lines.append("| " + " | ".join(c or " " for c in cells) + " |")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines += [f"- {n}" for n in FOOTNOTES]
    lines.append("")
    return "\n".join(lines)


def write_chart(path: Path, cases: list[Case]) -> str | None:
    """ferroattn vs peers per case: peer ms / ferroattn ms, log scale; None if written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        why = "not installed" if isinstance(exc, ImportError) else _short(exc)
        return f"no chart: matplotlib {why}"
    bars = [
        (f"{r['case']}: {r['label']}", r["candidate"], r["peer_over_fa"])
        for c in cases
        for r in c.rows
        if r.get("peer_over_fa")
    ]
    if not bars:
        return "no chart: no peer was timed"
    groups = list(dict.fromkeys(b[0] for b in bars))
    peers = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.3 * len(bars) + 0.2 * len(groups)))
    ypos, labels, y = [], [], 0.0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seen: set[str] = set()
    for g in groups:
        for gi, peer, ratio in (b for b in bars if b[0] == g):
            color = colors[peers.index(peer) % len(colors)]
            ax.barh(y, ratio, color=color, label=None if peer in seen else peer)
            seen.add(peer)
            ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
            ypos.append(y)
            labels.append(gi if peer == next(b[1] for b in bars if b[0] == g) else "")
            y += 1
        y += 0.6
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("peer time / ferroattn time  (> 1: ferroattn faster)")
    ax.set_title("ferroattn vs peers per case")
    ax.set_xlim(right=ax.get_xlim()[1] * 2.0)  # room for the value labels
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def save(cfg: Config, md: str, payload: dict[str, Any], cases: list[Case]) -> list[Path]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"harness-{_dt.date.today().isoformat()}"
    # A run of some cases must not overwrite the day's full run.
    if sorted(cfg.cases) != sorted(CASES):
        stem += "-" + "-".join(cfg.cases)
    stem += "-quick" if cfg.quick else ""
    paths = [cfg.out_dir / f"{stem}.json", cfg.out_dir / f"{stem}.md"]
    payload["chart"] = None
    if cfg.chart:
        png = cfg.out_dir / f"{stem}.png"
        why = write_chart(png, cases)
        if why is None:
            paths.append(png)
            payload["chart"] = png.name
        else:
            payload["notes"].append(why)
            md += f"\n- {why}\n"
            _progress(why)
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    json.loads(text)  # well-formed by construction; fail loudly otherwise
    paths[0].write_text(text + "\n", encoding="utf-8")
    paths[1].write_text(md, encoding="utf-8")
    return paths


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


# --------------------------------------------------------------------------- main


def run(cfg: Config) -> int:
    try:
        import ferroattn as fa
    except Exception as exc:  # noqa: BLE001
        print(f"{PROG}: error: cannot import ferroattn: {exc}", file=sys.stderr)
        return 2
    peers = Peers()
    peers.load()
    env = collect_env(fa, peers)
    ceil = Ceilings(cfg)
    started = time.perf_counter()
    _progress(f"ferroattn harness: cases {','.join(cfg.cases)}" + (" [quick]" if cfg.quick else ""))
    # The ceilings first, on an otherwise idle process.
    for t in sorted({cfg.threads, 1} if "scaling" in cfg.cases else {cfg.threads}):
        ceil.gemm_gflops(t)
        ceil.bandwidth_gbs(t)
    runners: dict[str, Callable[[], Case]] = {
        "prefill": lambda: case_prefill(fa, peers, cfg, False),
        "causal": lambda: case_prefill(fa, peers, cfg, True),
        "small": lambda: case_small(fa, peers, cfg),
        "lowp": lambda: case_lowp(fa, peers, cfg),
        "window": lambda: case_window(fa, peers, cfg),
        "decode": lambda: case_decode(fa, peers, cfg, ceil),
        "scaling": lambda: case_scaling(fa, peers, cfg),
        "memory": lambda: case_memory(fa, peers, cfg),
        "variants": lambda: case_variants(fa, cfg),
    }
    cases: list[Case] = []
    for i, name in enumerate(cfg.cases, 1):
        t0 = time.perf_counter()
        _progress(f"[{i}/{len(cfg.cases)}] {CASE_TITLES[name]} ...")
        try:
            case = runners[name]()
        except MemoryError:
            case = Case(name, CASE_TITLES[name])
            case.add("-", FA, {"status": "failed: out of memory"}, threads=cfg.threads)
        except BenchError:
            raise
        except Exception as exc:  # noqa: BLE001 (one case failing does not lose the others)
            traceback.print_exc()
            case = Case(name, CASE_TITLES[name])
            case.add("-", FA, {"status": f"failed: {_short(exc)}"}, threads=cfg.threads)
        share_ceilings(case, ceil)
        cases.append(case)
        groups: dict[str, list[str]] = {}
        for row in case.rows:
            parts = groups.setdefault(row["label"], [])
            if row.get("status") != "ok":
                parts.append(f"{row['candidate']} {row['status'][:40]}")
                continue
            s = f"{row['candidate']} {row['median_ms']:.4g} ms"
            if "per_call_us" in row:
                s = f"{row['candidate']} {row['per_call_us']:.2f}us/call"
            if row.get("peer_over_fa"):
                s += f" ({row['peer_over_fa']:.2f}x)"
            if row.get("target"):
                s += f" [{row['target']['result']}]"
            parts.append(s)
        text = " | ".join(f"{lab}: " + "; ".join(p) for lab, p in groups.items())
        _progress(f"      done in {time.perf_counter() - t0:.1f}s: {text}")

    header = header_lines(env, cfg, ceil)
    rows = table_rows(cases)
    notes = [n for c in cases for n in c.notes]
    failed = [c.id for c in cases if not c.accuracy_ok]
    if failed:
        notes.append(f"ACCURACY CHECK FAILED in case(s) {', '.join(failed)}: see the rows")
    if cfg.quick:
        notes.append(
            "--quick: a smoke test of the harness; the timings and the (512^3, 64 MiB) "
            "ceilings are not a measurement"
        )
    summary = target_summary(cases)
    out = sys.stdout
    for line in header:
        print(line, file=out)
    print(file=out)
    for line in format_text_table(rows):
        print(line, file=out)
    print(file=out)
    counts = {k: sum(1 for s in summary if s["result"] == k) for k in ("PASS", "MISS", "n/a")}
    print(f"targets: {counts['PASS']} PASS, {counts['MISS']} MISS, {counts['n/a']} n/a", file=out)
    for n in notes + FOOTNOTES:
        print(textwrap.fill(n, width=100, initial_indent="- ", subsequent_indent="  "), file=out)
    elapsed = time.perf_counter() - started
    print(f"total time {elapsed:.0f} s", file=out)

    if cfg.save:
        payload = {
            "schema": SCHEMA,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
            "env": env,
            "ceilings": ceil.as_json(),
            "cases": [
                {
                    "id": c.id,
                    "title": c.title,
                    "notes": c.notes,
                    "accuracy_ok": c.accuracy_ok,
                    "rows": c.rows,
                }
                for c in cases
            ],
            "targets": summary,
            "notes": notes,
            "elapsed_s": elapsed,
        }
        payload = _json_safe(payload)
        md = format_markdown(header, rows, notes)
        for path in save(cfg, md, payload, cases):
            print(f"wrote {path}", file=out)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_args(args)


def run_args(args: argparse.Namespace) -> int:
    """Run from parsed options (``ferroattn bench`` calls this)."""
    try:
        return run(Config.from_args(args))
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
