"""Decode attention benchmark: ferroattn's KV cache vs torch SDPA vs ONNX Runtime GQA.

One new query token attends over a cache of L tokens: B=1, 32 query heads, 8 and 32 KV
heads, head_dim 128, L = 4096 and 32768, at 2 threads.  Decode is memory-bound, so next to
the times the script measures the machine's memory-read bandwidth in the same run and
reports every candidate's effective K/V read rate (bytes of its K/V storage / time) as GB/s
and as a % of it.  The project's target: ferroattn's cache reaches >= 80% of the bandwidth
at 2 threads for every cache dtype (PASS/MISS column).

Candidates are interleaved round-robin in one process, warmed up, the caches of the CPU are
flushed before each timed call, the cores are kept busy between calls (as the rest of a model
would), and the median of the repeats is reported.  Before timing,
every output is checked against a float64 NumPy reference.  Each ferroattn cache row also gets
an in-cache time (the call over caches small enough to stay in the last-level cache, scaled to
L): the rate it could reach if memory were free, which tells a memory-bound miss from an
arithmetic-bound one.

Results are printed and written to benches/results/decode-<date>.{md,json}
(decode-<date>-quick.* with --quick).  See benches/README.md.

    python benches/bench_decode.py                  # full run
    python benches/bench_decode.py --quick          # smoke test, seconds
    python benches/bench_decode.py --lengths 8192 --kv-heads 8 --dtypes int8 --repeats 21
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import threading
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
        _short,
        rel_frobenius,
    )
except Exception as exc:  # noqa: BLE001 (any failure of the import is reported)
    print(f"bench_decode: error: cannot import ferroattn: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

SCHEMA = "ferroattn-bench-decode/1"
CACHE_DTYPES = ("float32", "float16", "int8")
# relative Frobenius error allowed vs the float64 reference, by the narrowest K/V storage
RTOL = {"float32": 1e-4, "float16": 5e-3, "int8": 5e-2}
TARGET_PCT = 80.0  # ferroattn's K/V read rate as % of the measured bandwidth
BW_REPEATS = 8  # reads of the array per kernel and measurement; the fastest counts
ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "FERROATTN_NUM_THREADS",
    "FERROATTN_ISA",
)

# candidate keys, in table order: (kind, storage dtype)
FA_CACHE = "ferroattn KVCache"
FA_PLAIN = "ferroattn (no cache)"
TORCH = "torch sdpa"
ORT = "ort GQA"


class BenchError(Exception):
    """A failure with a message for the user (exit status 2; 1 for accuracy)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- setup


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2 - got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {text!r}")
    return values


def _parse_threads(text: str) -> list[int]:
    return _int_list(text, "thread counts")


def _parse_lengths(text: str) -> list[int]:
    return _int_list(text, "cache lengths")


def _parse_kv_heads(text: str) -> list[int]:
    return _int_list(text, "KV head counts")


def _parse_dtypes(text: str) -> list[str]:
    values = [t for t in text.replace(" ", "").split(",") if t]
    bad = [t for t in values if t not in CACHE_DTYPES]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"dtypes must be a comma-separated subset of {','.join(CACHE_DTYPES)}, got {text!r}"
        )
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Decode attention: ferroattn KVCache vs torch SDPA vs ONNX Runtime GQA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: H=8 D=32, L=256, KV heads 2,8, 64 MiB bandwidth array, 1 repeat "
        "(explicit options still win)",
    )
    p.add_argument("--heads", type=_positive, default=None, help="query heads H [32]")
    p.add_argument("--dim", type=_positive, default=None, help="head dim D [128]")
    p.add_argument(
        "--kv-heads", type=_parse_kv_heads, default=None, help="KV head counts, e.g. 8,32 [8,32]"
    )
    p.add_argument(
        "--lengths", type=_parse_lengths, default=None, help="cache lengths L [4096,32768]"
    )
    p.add_argument(
        "--dtypes",
        type=_parse_dtypes,
        default=list(CACHE_DTYPES),
        help="ferroattn cache dtypes (float16 also adds torch's float16 row)",
    )
    p.add_argument("--threads", type=_parse_threads, default=[2], help="thread counts, e.g. 1,2")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats [9]")
    p.add_argument("--warmup", type=_non_negative, default=None, help="warm-up calls [1]")
    p.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="untimed pause after each call, so that one library's spinning worker "
        "threads do not steal cores from the next candidate [100; 0 with --quick]",
    )
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
        type=_non_negative,
        default=None,
        help="MiB read (untimed) before each timed call to evict the CPU caches; "
        "0 = no flush (cache-warm timings) [256; 0 with --quick]",
    )
    p.add_argument(
        "--flush-threads",
        type=_non_negative,
        default=None,
        help="threads that read the flush buffer; 0 = as many as the case uses "
        "[0 with --gap-mode busy, 1 with idle]",
    )
    p.add_argument(
        "--resident-mib",
        type=_non_negative,
        default=None,
        help="K/V MiB of the cache-resident runs that estimate each ferroattn cache row's "
        "in-cache time (its speed when memory is not the limit); 0 = skip [8]",
    )
    p.add_argument(
        "--bw-mib",
        type=_positive,
        default=None,
        help="size of the array of the bandwidth measurement [1024; 64 with --quick]",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where decode-<date>.{md,json} go",
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p


def _resolve(args: argparse.Namespace) -> None:
    small = args.quick
    defaults = {
        "heads": 8 if small else 32,
        "dim": 32 if small else 128,
        "kv_heads": [2, 8] if small else [8, 32],
        "lengths": [256] if small else [4096, 32768],
        "repeats": 1 if small else 9,
        "warmup": 1,
        "gap_ms": 0.0 if small else 100.0,
        "flush_mib": 0 if small else 256,
        "bw_mib": 64 if small else 1024,
        "resident_mib": 8,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.flush_threads is None:
        args.flush_threads = 0 if args.gap_mode == "busy" else 1
    bad = [h for h in args.kv_heads if args.heads % h]
    if bad:
        raise BenchError(f"--kv-heads {bad} do not divide --heads {args.heads}")


# --------------------------------------------------------------------------- env


def _threadpoolctl() -> Any:
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def _import_optional(name: str) -> tuple[Any, str | None]:
    try:
        module = __import__(name)
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # noqa: BLE001 (broken install: report, don't crash)
        return None, f"import failed: {type(exc).__name__}: {exc}"
    return module, None


def _l3_size() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None


def collect_env(fa: Any, peers: dict[str, tuple[Any, str | None]]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "l3_cache": _l3_size(),
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
    env["ferroattn"]["kv_cache"] = hasattr(fa, "KVCache")
    for name, (module, status) in peers.items():
        if module is None:
            env[name] = {"status": status}
        else:
            env[name] = {"status": "ok", "version": str(getattr(module, "__version__", "?"))}
    torch = peers["torch"][0]
    if torch is not None:
        with contextlib.suppress(Exception):
            env["torch"]["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    tpc = _threadpoolctl()
    if tpc is None:
        env["threadpoolctl"] = "not installed"
    else:
        keep = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads")
        env["threadpoolctl"] = [
            {k: v for k, v in lib.items() if k in keep} for lib in tpc.threadpool_info()
        ]
    return env


def _peer_line(env: dict[str, Any], name: str) -> str:
    e = env[name]
    return f"{name} {e['version']}" if e.get("status") == "ok" else f"{name}: {e.get('status')}"


def format_header(env: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    n = cfg.get("flush_threads")
    flush_on = f"{n} thread(s)" if n else "as many threads as the case"
    fa = env["ferroattn"]
    torch = env["torch"]
    lines = [
        f"ferroattn decode benchmark  {env['date']}" + ("  [QUICK]" if cfg["quick"] else ""),
        f"cpu: {env['cpu']}  ({env['logical_cpus']} logical CPUs, L3 {env['l3_cache']}, "
        f"load average {env['loadavg_at_start']} at start)",
        f"python {env['python']}  numpy {env['numpy']}  {env['platform']}",
        (
            f"ferroattn {fa.get('version')}  isa={fa.get('isa')}  "
            f"KVCache={'yes' if fa.get('kv_cache') else 'MISSING'}  "
            f"prefetch={fa.get('stream_prefetch_bytes')} B ahead"
            + (" (one-row streams too)" if fa.get("one_row_stream_prefetch") else "")
            + (f"  error={fa['error']}" if "error" in fa else "")
        ),
        (
            _peer_line(env, "torch")
            + (f" (cpu capability {torch['cpu_capability']})" if "cpu_capability" in torch else "")
            + "  "
            + _peer_line(env, "onnxruntime")
            + "  "
            + _peer_line(env, "onnx")
        ),
        (
            f"shape: B=1 H={cfg['heads']} Hkv={','.join(map(str, cfg['kv_heads']))} "
            f"L={','.join(map(str, cfg['lengths']))} D={cfg['dim']}, one query token; "
            f"cache dtypes {','.join(cfg['dtypes'])}"
        ),
        (
            f"repeats={cfg['repeats']} (median)  warmup={cfg['warmup']}  "
            f"gap={cfg['gap_ms']:g} ms {cfg.get('gap_mode', 'idle')}  "
            f"cache flush={cfg['flush_mib']} MiB before each call "
            f"on {flush_on}  "
            f"seed={cfg['seed']}"
        ),
    ]
    for n, bw in sorted(cfg.get("bandwidth", {}).items()):
        per = "  ".join(f"{k} {v:.1f}" for k, v in bw["kernels_gbs"].items())
        seen = bw["measurements_gbs"]
        lines.append(
            f"memory-read bandwidth at {n} thread(s): {bw['gbs']:.1f} GB/s, the best of "
            f"{len(seen)} measurement(s) ({min(seen):.1f} to {max(seen):.1f} GB/s; each the "
            f"fastest of {bw['runs']} reads of {bw['mib']} MiB per kernel; {per})"
        )
    set_vars = {k: v for k, v in env["env_vars"].items() if v is not None}
    if set_vars:
        lines.append("env: " + "  ".join(f"{k}={v}" for k, v in set_vars.items()))
    return lines


# --------------------------------------------------------------------------- bandwidth


def measure_bandwidth(threads: int, mib: int, runs: int = BW_REPEATS) -> dict[str, float]:
    """Read rate (GB/s) of NumPy reductions over one array split across `threads` Python
    threads, per kernel: the fastest of `runs` reads.

    NumPy releases the GIL in reductions, so the threads read their slices in parallel.
    Two kernels (a sum and a max) are tried; the one less limited by arithmetic gives the
    higher, more honest ceiling.
    """
    a = np.ones((mib << 20) // 4, dtype=np.float32)  # written once: every page is mapped
    parts = np.array_split(a, threads)
    kernels: dict[str, Callable[[np.ndarray], Any]] = {
        "add.reduce": np.add.reduce,
        "maximum.reduce": np.maximum.reduce,
    }
    result: dict[str, float] = {}
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
        result[name] = a.nbytes / best / 1e9
    del parts, a
    return result


class Bandwidth:
    """Bandwidth per thread count, measured before the run and again after every case.

    The best measurement is the reference for the % columns: other load on the machine only
    ever lowers a measurement, so the best is the stablest estimate and the stricter target.
    The spread of the measurements shows how much the machine changed during the run.
    """

    def __init__(self, threads: list[int], mib: int) -> None:
        self.mib = mib
        self.data: dict[int, dict[str, Any]] = {
            n: {"gbs": 0.0, "kernels_gbs": {}, "measurements_gbs": [], "runs": BW_REPEATS}
            for n in threads
        }

    def measure(self, threads: int) -> None:
        per_kernel = measure_bandwidth(threads, self.mib)
        d = self.data[threads]
        d["measurements_gbs"].append(max(per_kernel.values()))
        for k, v in per_kernel.items():
            d["kernels_gbs"][k] = max(v, d["kernels_gbs"].get(k, 0.0))
        d["gbs"] = max(d["measurements_gbs"])
        d["mib"] = self.mib

    def gbs(self, threads: int) -> float:
        return float(self.data[threads]["gbs"])


class Flusher:
    """Evicts the CPU caches by reading a buffer larger than them (untimed), on ``threads``
    Python threads (NumPy releases the GIL), or on the case's thread count when ``threads``
    is 0.

    With one thread the other cores idle through the flush (and through an idle gap); on a
    virtual machine an idle CPU can take milliseconds to run a woken thread again (measured
    here: 0.7 to 4.8 ms), which every multi-threaded candidate pays. Reading on all of them
    keeps the cores busy up to the call, as the multi-threaded rest of a model would: the
    default with the busy gap; one thread with the idle gap, the earlier protocol.
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
        idle pause instead lets the virtual CPUs of a VM go idle, and on this development
        machine an idle one then came back to ferroattn's helper thread milliseconds late,
        or not within the call at all (``benches/NOTES.md``). The peers' worker threads,
        which spin after a call (torch ~9 ms, ORT ~49 ms here), have stopped by the end of a
        100 ms gap either way. Without a flush buffer (cache-warm runs) a 256 KiB one is read,
        which leaves the last-level cache mostly as it was (and its rate is not a memory
        bandwidth).
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


# --------------------------------------------------------------------------- candidates


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(D)) v for one batch, GQA, no mask; q (1, H, Nq, D)."""
    _, h, nq, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    out = np.empty((1, h, nq, v.shape[3]), dtype=np.float64)
    for j in range(hkv):
        kj = k[0, j].astype(np.float64)
        vj = v[0, j].astype(np.float64)
        qj = q[0, j * group : (j + 1) * group].astype(np.float64)  # (group, Nq, D)
        s = qj @ kj.T / np.sqrt(d)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out[0, j * group : (j + 1) * group] = s @ vj
    return out


def kv_bytes(dtype: str, hkv: int, length: int, d: int) -> int:
    """Bytes of K and V storage for `length` tokens; int8 adds one float32 scale per token,
    head and tensor."""
    item = {"float32": 4, "float16": 2, "int8": 1}[dtype]
    total = 2 * hkv * length * d * item
    if dtype == "int8":
        total += 2 * hkv * length * 4
    return total


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


def make_fa_cache(fa: Any, dtype: str, k: np.ndarray, v: np.ndarray, q: np.ndarray):
    _, hkv, length, d = k.shape
    cache = fa.KVCache(1, hkv, d, length, dtype=dtype)
    cache.append(k, v)
    return cache, (lambda: cache.attend(q))


def make_torch(torch: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, dtype: str):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero copy for float32
    if dtype == "float16":
        tq, tk, tv = (x.to(torch.float16).contiguous() for x in (tq, tk, tv))

    def run() -> Any:
        with torch.inference_mode():
            return sdpa(tq, tk, tv, enable_gqa=True)

    return run


def _ort_model(onnx: Any, h: int, hkv: int, d: int) -> bytes:
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
    graph = helper.make_graph(
        [node],
        "gqa_decode",
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
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10  # readable by every onnxruntime >= 1.20
    return model.SerializeToString()


def make_ort(
    ort: Any,
    onnx: Any,
    threads: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    notes: list[str],
) -> Callable[[], np.ndarray]:
    """One GroupQueryAttention decode step: the new token's k/v are appended at position L of
    a past cache of L tokens, and the query attends over all L + 1.

    The past and present caches share one buffer (IO binding, capacity L + 1), as in a real
    decode loop: ORT then writes only the new token instead of copying the whole cache.  If
    that fails, separate past (L) and present (L + 1) tensors are used, and noted.
    """
    _, h, _, d = q.shape
    _, hkv, length, _ = k.shape
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(_ort_model(onnx, h, hkv, d), so, providers=["CPUExecutionProvider"])
    feeds = {
        "query": np.ascontiguousarray(q.reshape(1, 1, h * d)),  # (1, H, 1, D) == (1, 1, H*D)
        "key": np.ascontiguousarray(k_new.reshape(1, 1, hkv * d)),
        "value": np.ascontiguousarray(v_new.reshape(1, 1, hkv * d)),
        "seqlens_k": np.array([length], dtype=np.int32),  # total length - 1
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

        def run_shared() -> np.ndarray:
            sess.run_with_iobinding(binding)
            return unpack(binding.get_outputs()[0].numpy())

        run_shared()
        if not np.array_equal(buf_k[:, :, length], k_new[:, :, 0]):
            raise RuntimeError("present_key was not written into the shared buffer")
        return run_shared
    except Exception as exc:  # noqa: BLE001 (fall back to separate past/present)
        notes.append(f"ort: shared past/present buffer failed ({_short(exc, 100)}); copies")
    full = dict(feeds, past_key=k, past_value=v)

    def run_copy() -> np.ndarray:
        return unpack(sess.run(["output"], full)[0])

    return run_copy


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, tuple):  # (out, lse)
        x = x[0]
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def thread_limits(n: int, fa: Any, torch: Any, notes: list[str]):
    """Set n threads for ferroattn, torch and NumPy's BLAS for the duration of one case
    (ONNX Runtime gets n in its session options)."""
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
    runs = []
    for n in (l1, l2):
        k, v = (rng.standard_normal((1, hkv, n, d), dtype=np.float32) for _ in "kv")
        runs.append(make_fa_cache(fa, dt, k, v, q))
    samples: list[list[float]] = [[], []]
    calls = 0
    start = time.perf_counter()
    # At least 31 calls each; more while under ~0.3 s, so short calls get many samples.
    while calls < 31 or (calls < 401 and time.perf_counter() - start < 0.3):
        for i, (_, fn) in enumerate(runs):
            t0 = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - t0) * 1e3)
        calls += 1
    m1, m2 = (statistics.median(x[len(x) // 10 :]) for x in samples)  # first tenth: warm-up
    per_token = max(m2 - m1, 0.0) / (l2 - l1)
    return {"in_cache_ms": per_token * length, "resident_tokens": [l1, l2], "calls": calls}


def run_case(
    fa: Any,
    peers: dict[str, tuple[Any, str | None]],
    cfg: dict[str, Any],
    hkv: int,
    length: int,
    threads: int,
    flush: Flusher,
    rng: np.random.Generator,
) -> dict[str, Any]:
    h, d = cfg["heads"], cfg["dim"]
    torch, torch_status = peers["torch"]
    ort, ort_status = peers["onnxruntime"]
    onnx, onnx_status = peers["onnx"]
    q = rng.standard_normal((1, h, 1, d), dtype=np.float32)
    k, v = (rng.standard_normal((1, hkv, length, d), dtype=np.float32) for _ in range(2))
    case: dict[str, Any] = {
        "threads": threads,
        "B": 1,
        "H": h,
        "Hkv": hkv,
        "L": length,
        "D": d,
        "notes": [],
        "candidates": {},
    }
    notes = case["notes"]
    res: dict[str, dict[str, Any]] = {}
    cands: dict[str, Callable[[], Any]] = {}
    meta: dict[str, dict[str, Any]] = {}  # per candidate: storage dtype, bytes, reference

    def add(key: str, kind: str, dtype: str, nbytes: int, fn: Callable[[], Any], ref: str):
        cands[key] = fn
        meta[key] = {"kind": kind, "dtype": dtype, "kv_bytes": nbytes, "ref": ref}
        res[key] = {"kind": kind, "dtype": dtype, "status": "ok"}

    def skip(key: str, kind: str, dtype: str, status: str) -> None:
        res[key] = {"kind": kind, "dtype": dtype, "status": status}

    keep_alive: list[Any] = []  # caches and buffers the closures use
    with thread_limits(threads, fa, torch, notes):
        for dt in cfg["dtypes"]:
            key = f"{FA_CACHE}/{dt}"
            if not hasattr(fa, "KVCache"):
                skip(key, FA_CACHE, dt, "not available (ferroattn.KVCache missing)")
                continue
            try:
                cache, fn = make_fa_cache(fa, dt, k, v, q)
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                skip(key, FA_CACHE, dt, f"failed: {_short(exc)}")
                continue
            keep_alive.append(cache)
            nbytes, how = cache_kv_bytes(cache, dt, hkv, length, d)
            add(key, FA_CACHE, dt, nbytes, fn, "past")
            res[key]["kv_bytes_source"] = how
        add(
            f"{FA_PLAIN}/float32",
            FA_PLAIN,
            "float32",
            kv_bytes("float32", hkv, length, d),
            lambda: fa.attention(q, k, v),
            "past",
        )
        torch_dtypes = ["float32"] + (["float16"] if "float16" in cfg["dtypes"] else [])
        for dt in torch_dtypes:
            key = f"{TORCH}/{dt}"
            if torch is None:
                skip(key, TORCH, dt, str(torch_status))
                continue
            try:
                fn = make_torch(torch, q, k, v, dt)
            except Exception as exc:  # noqa: BLE001
                skip(key, TORCH, dt, f"failed: {_short(exc)}")
                continue
            add(key, TORCH, dt, kv_bytes(dt, hkv, length, d), fn, "past")
        key = f"{ORT}/float32"
        k_new = v_new = None
        if ort is None:
            skip(key, ORT, "float32", f"onnxruntime {ort_status}")
        elif onnx is None:
            skip(key, ORT, "float32", f"onnx {onnx_status} (needed to build the model)")
        else:
            k_new, v_new = (rng.standard_normal((1, hkv, 1, d), dtype=np.float32) for _ in "kv")
            try:
                fn = make_ort(ort, onnx, threads, q, k, v, k_new, v_new, notes)
            except Exception as exc:  # noqa: BLE001
                skip(key, ORT, "float32", f"failed: {_short(exc)}")
            else:
                add(key, ORT, "float32", kv_bytes("float32", hkv, length + 1, d), fn, "past+new")

        # Accuracy first: every candidate against a float64 reference of the same keys.
        refs = {"past": reference(q, k, v)}
        if k_new is not None and v_new is not None:
            refs["past+new"] = reference(
                q, np.concatenate([k, k_new], axis=2), np.concatenate([v, v_new], axis=2)
            )
        for key in list(cands):
            m = meta[key]
            try:
                out = _to_numpy(cands[key]())
            except Exception as exc:  # noqa: BLE001
                if m["kind"] in (FA_PLAIN,):
                    raise
                skip(key, m["kind"], m["dtype"], f"failed: {_short(exc)}")
                del cands[key]
                continue
            ref = refs[m["ref"]]
            if out.shape != ref.shape:
                raise BenchError(f"{key} returned shape {out.shape}, expected {ref.shape}")
            err = rel_frobenius(out, ref)
            res[key]["rel_err"] = err
            tol = RTOL[m["dtype"]]
            if not err < tol:
                raise BenchError(
                    f"accuracy check failed: {key} vs float64 reference relative Frobenius "
                    f"error {err:.3g} >= {tol:g} (threads={threads}, H={h} Hkv={hkv} "
                    f"L={length} D={d})",
                    1,
                )
        del refs

        # Warm up, then round-robin, rotating the start so that no candidate is always
        # first; the CPU caches are flushed before every timed call.
        names = list(cands)
        for _ in range(cfg["warmup"]):
            for name in names:
                cands[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        # The busy gap's read rate after each call: the bandwidth the machine had then.
        gaps: dict[str, list[float]] = {name: [] for name in names}
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(cfg["repeats"]):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    flush(threads)
                    t0 = time.perf_counter()
                    result = cands[name]()
                    dt_s = time.perf_counter() - t0
                    del result
                    samples[name].append(dt_s * 1e3)
                    if cfg["gap_ms"] > 0:
                        if cfg.get("gap_mode") == "busy":
                            gaps[name].append(flush.busy(cfg["gap_ms"], threads))
                        else:
                            time.sleep(cfg["gap_ms"] / 1e3)
        finally:
            if gc_was_enabled:
                gc.enable()
        keep_alive.clear()
        cands.clear()
        if cfg.get("resident_mib"):
            for key, m in meta.items():
                if m["kind"] == FA_CACHE:
                    est = in_cache_ms(fa, m["dtype"], h, hkv, d, length, cfg["resident_mib"], rng)
                    if est is not None:
                        res[key].update(est)

    medians = {name: statistics.median(ms) for name, ms in samples.items()}
    torch_ms = medians.get(f"{TORCH}/float32")
    ort_ms = medians.get(f"{ORT}/float32")
    for name, ms in samples.items():
        med = medians[name]
        m = meta[name]
        is_fa = m["kind"] in (FA_CACHE, FA_PLAIN)
        # Each call's rate over the bandwidth read right after it, so that the machine's
        # swings (this VM's two-thread bandwidth moves between ~35 and ~57 GB/s from minute
        # to minute) hit both sides of the ratio alike. Only with a busy gap over a buffer
        # larger than the caches.
        adjacent = None
        if len(gaps[name]) == len(ms) and cfg.get("flush_mib", 0) > 0 and all(ms):
            rates = [m["kv_bytes"] / (t * 1e-3) / 1e9 for t in ms]
            adjacent = [x / g for x, g in zip(rates, gaps[name], strict=True)]
        res[name].update(
            {
                "kv_bytes": m["kv_bytes"],
                "median_ms": med,
                "min_ms": min(ms),
                "max_ms": max(ms),
                "spread": (max(ms) - min(ms)) / med if med > 0 else None,
                "samples_ms": ms,
                "gbs": m["kv_bytes"] / (med * 1e-3) / 1e9 if med > 0 else None,
                "torch_over_fa": torch_ms / med if is_fa and torch_ms and med > 0 else None,
                "ort_over_fa": ort_ms / med if is_fa and ort_ms and med > 0 else None,
                "adjacent_gbs": statistics.median(gaps[name]) if adjacent else None,
                "pct_adjacent": 100.0 * statistics.median(adjacent) if adjacent else None,
            }
        )
    case["candidates"] = res
    return case


def apply_bandwidth(case: dict[str, Any], bandwidth: float) -> None:
    """% of the measured bandwidth, and PASS/MISS of the target for ferroattn rows."""
    case["bandwidth_gbs"] = bandwidth
    for r in case["candidates"].values():
        if r.get("status") != "ok":
            continue
        gbs = r.get("gbs")
        pct = 100.0 * gbs / bandwidth if gbs is not None and bandwidth > 0 else None
        r["pct_bandwidth"] = pct
        best = r["kv_bytes"] / (r["min_ms"] * 1e-3) / 1e9 if r["min_ms"] > 0 else None
        r["pct_bandwidth_fastest"] = 100.0 * best / bandwidth if best and bandwidth > 0 else None
        fast = r.get("in_cache_ms")
        r["ceiling_pct"] = (
            100.0 * r["kv_bytes"] / (fast * 1e-3) / 1e9 / bandwidth
            if fast and bandwidth > 0
            else None
        )
        r["target"] = None
        if r["kind"] in (FA_CACHE, FA_PLAIN) and pct is not None:
            r["target"] = "PASS" if pct >= TARGET_PCT else "MISS"


# --------------------------------------------------------------------------- output

HEADERS = [
    "Hkv",
    "L",
    "threads",
    "candidate",
    "kv dtype",
    "KV MiB",
    "median ms",
    "min ms",
    "spread",
    "GB/s",
    "% bw",
    "% adj",
    f">={TARGET_PCT:.0f}%",
    "in-cache ms",
    "ceiling",
    "torch/fa",
    "ort/fa",
    "rel err",
]
N_KEYS = 5  # columns before the numbers (a status message replaces those)
LEFT = {3, 4, HEADERS.index(f">={TARGET_PCT:.0f}%")}  # left-aligned columns


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for case in results:
        for r in case["candidates"].values():
            base = [str(case["Hkv"]), str(case["L"]), str(case["threads"]), r["kind"], r["dtype"]]
            if r.get("status") != "ok":
                rows.append([*base, str(r.get("status"))] + [""] * (len(HEADERS) - N_KEYS - 1))
                continue

            def opt(x: float | None, fmt: str) -> str:
                return "" if x is None else format(x, fmt)

            rows.append(
                [
                    *base,
                    f"{r['kv_bytes'] / 2**20:.1f}",
                    f"{r['median_ms']:.3f}",
                    f"{r['min_ms']:.3f}",
                    f"{100 * r['spread']:.0f}%" if r.get("spread") is not None else "",
                    opt(r.get("gbs"), ".1f"),
                    opt(r.get("pct_bandwidth"), ".0f"),
                    opt(r.get("pct_adjacent"), ".0f"),
                    r.get("target") or "",
                    opt(r.get("in_cache_ms"), ".3f"),
                    opt(r.get("ceiling_pct"), ".0f") + ("%" if r.get("ceiling_pct") else ""),
                    opt(r.get("torch_over_fa"), ".2f") + ("x" if r.get("torch_over_fa") else ""),
                    opt(r.get("ort_over_fa"), ".2f") + ("x" if r.get("ort_over_fa") else ""),
                    f"{r['rel_err']:.1e}",
                ]
            )
    return rows


def _is_status_row(row: list[str]) -> bool:
    return bool(row[N_KEYS]) and not any(row[N_KEYS + 1 :])


def format_text_table(rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in HEADERS]
    for row in rows:
        for i, cell in enumerate(row[:N_KEYS] if _is_status_row(row) else row):
            widths[i] = max(widths[i], len(cell))

    def fmt(row: list[str]) -> str:
        if _is_status_row(row):
            return (
                "  ".join(
                    f"{c:<{widths[i]}}" if i in LEFT else f"{c:>{widths[i]}}"
                    for i, c in enumerate(row[:N_KEYS])
                )
                + "  "
                + row[N_KEYS]
            )
        return "  ".join(
            f"{c:<{widths[i]}}" if i in LEFT else f"{c:>{widths[i]}}" for i, c in enumerate(row)
        ).rstrip()

    out = [fmt(HEADERS), "  ".join("-" * w for w in widths)]
    prev = None
    for row in rows:
        key = tuple(row[:3])
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(fmt(row))
    return out


FOOTNOTE = (
    "ms = median wall time of one `attend`/attention call (CPU caches flushed before each "
    "unless the header says flush=0); "
    "KV MiB = bytes of the candidate's K and V storage (int8: plus one float32 scale per "
    "token, head and tensor; ORT: L + 1 tokens); GB/s = those bytes / median time; "
    "% bw = GB/s as a % of the memory-read bandwidth measured in the same run at the same "
    "thread count (the best of its measurements); % adj = the median over the repeats of "
    "each call's GB/s as a % of the read rate of the busy gap right after it (the bandwidth "
    "the machine had at that moment); "
    f">={TARGET_PCT:.0f}% = the project's target for ferroattn rows, against % bw; "
    "in-cache ms = the same call's time estimated from two caches small enough to stay in "
    "the last-level cache (per-token slope × L): its speed when memory is not the limit; "
    "ceiling = the % bw that speed would give (below the target: arithmetic, not memory, "
    "holds the row back on this CPU); "
    "torch/fa and ort/fa = torch float32 (ORT) median ms / this row's median ms "
    "(> 1: ferroattn faster); spread = (max - min) / median; rel err = relative Frobenius "
    "error vs a float64 NumPy reference."
)


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["# ferroattn decode benchmark", "", "```"]
    lines += header
    lines += ["```", ""]
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "|".join(":---" if i in LEFT else "---:" for i in range(len(HEADERS))) + "|")
    for row in rows:
        if _is_status_row(row):
            row = [*row[:N_KEYS], row[N_KEYS]] + [""] * (len(HEADERS) - N_KEYS - 1)
        lines.append("| " + " | ".join(c or " " for c in row) + " |")
    lines += ["", FOOTNOTE, ""]
    return "\n".join(lines)


def target_summary(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for n in sorted({c["threads"] for c in results}):
        rows = [
            r
            for c in results
            if c["threads"] == n
            for r in c["candidates"].values()
            if r["kind"] == FA_CACHE and r.get("status") == "ok"
        ]
        if not rows:
            out.append(f"target at {n} thread(s): no ferroattn KVCache rows ran")
            continue
        passed = sum(r["target"] == "PASS" for r in rows)
        worst = min(r["pct_bandwidth"] for r in rows)
        verdict = "PASS" if passed == len(rows) else "MISS"
        out.append(
            f"target >= {TARGET_PCT:.0f}% of bandwidth at {n} thread(s), ferroattn KVCache: "
            f"{verdict} ({passed}/{len(rows)} rows pass, worst {worst:.0f}%)"
        )
        adj = [r["pct_adjacent"] for r in rows if r.get("pct_adjacent") is not None]
        if adj:
            out.append(
                f"  against the bandwidth read right after each call (% adj): "
                f"{sum(a >= TARGET_PCT for a in adj)}/{len(adj)} rows >= {TARGET_PCT:.0f}%, "
                f"worst {min(adj):.0f}%"
            )
        capped = [
            r for r in rows if r["target"] == "MISS" and (r.get("ceiling_pct") or 1e9) < TARGET_PCT
        ]
        if capped:
            ceilings = ", ".join(f"{r['ceiling_pct']:.0f}%" for r in capped)
            out.append(
                f"  {len(capped)} of the misses stay below the target even in cache (ceiling "
                f"{ceilings}): arithmetic, not memory, bounds them on this CPU"
            )
    return out


def save(out_dir: Path, quick: bool, md: str, payload: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{_dt.date.today().isoformat()}" + ("-quick" if quick else "")
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    json.loads(text)  # well-formed by construction; fail loudly otherwise
    md_path.write_text(md, encoding="utf-8")
    json_path.write_text(text + "\n", encoding="utf-8")
    return md_path, json_path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _resolve(args)
    except BenchError as exc:
        print(f"bench_decode: error: {exc}", file=sys.stderr)
        return exc.code
    import ferroattn as fa  # importable: the helpers above came from it

    peers = {name: _import_optional(name) for name in ("torch", "onnxruntime", "onnx")}

    cfg: dict[str, Any] = {
        "quick": args.quick,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "lengths": args.lengths,
        "dim": args.dim,
        "dtypes": args.dtypes,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "gap_ms": args.gap_ms,
        "gap_mode": args.gap_mode,
        "flush_mib": args.flush_mib,
        "flush_threads": args.flush_threads,
        "bw_mib": args.bw_mib,
        "resident_mib": args.resident_mib,
        "seed": args.seed,
        "rtol": RTOL,
        "target_pct": TARGET_PCT,
    }
    env = collect_env(fa, peers)
    cpus = os.cpu_count() or 1
    results = []
    try:
        print("measuring memory-read bandwidth ...", flush=True)
        bandwidth = Bandwidth(args.threads, args.bw_mib)
        for n in args.threads:
            bandwidth.measure(n)
        cfg["bandwidth"] = bandwidth.data
        header = format_header(env, cfg)
        print()
        for line in header:
            print(line)
        if max(args.threads) > cpus:
            print(f"warning: more threads requested than the {cpus} logical CPUs")
        if not hasattr(fa, "KVCache"):
            print("note: ferroattn.KVCache is missing: its rows are reported as not available")
        print(flush=True)

        flush = Flusher(args.flush_mib, args.flush_threads)
        rng = np.random.default_rng(args.seed)
        for hkv in args.kv_heads:
            for length in args.lengths:
                for threads in args.threads:
                    case = run_case(fa, peers, cfg, hkv, length, threads, flush, rng)
                    results.append(case)
                    done = "  ".join(
                        f"{c['kind']} {c['dtype']} {c['median_ms']:.2f} ms"
                        for c in case["candidates"].values()
                        if c.get("status") == "ok"
                    )
                    print(f"  done Hkv={hkv} L={length} threads={threads}: {done}", flush=True)
                    for note in case["notes"]:
                        print(f"  note: {note}")
                    bandwidth.measure(threads)
        del flush
        for case in results:
            apply_bandwidth(case, bandwidth.gbs(case["threads"]))
        header = format_header(env, cfg)
    except BenchError as exc:
        print(f"bench_decode: error: {exc}", file=sys.stderr)
        return exc.code
    except MemoryError:
        print("bench_decode: error: out of memory (try smaller --lengths)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (traceback printed, then a clean exit)
        traceback.print_exc()
        print(f"bench_decode: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    rows = table_rows(results)
    print()
    for line in header:
        if line.startswith("memory-read bandwidth"):
            print(line)
    print()
    for line in format_text_table(rows):
        print(line)
    print()
    flushed = "CPU caches flushed before each call" if args.flush_mib else "caches NOT flushed"
    print(f"ms: median of the repeats, {flushed}.")
    print("GB/s: bytes of the K/V storage read / median; % bw: of the bandwidth in the header.")
    print("torch/fa, ort/fa: peer float32 ms / ferroattn ms (> 1 means ferroattn is faster).")
    print("spread: (max - min) / median of the repeats; large = noisy machine.")
    summary = target_summary(results)
    for line in summary:
        print(line)
    if args.quick:
        print("--quick: a smoke test of the script; these timings are not a measurement.")

    if not args.no_save:
        cfg["bandwidth"] = {str(n): bw for n, bw in cfg["bandwidth"].items()}
        payload = {
            "schema": SCHEMA,
            "config": cfg,
            "env": env,
            "target_summary": summary,
            "results": results,
        }
        md = format_markdown(header, rows) + "\n" + "\n".join(summary) + "\n"
        md_path, json_path = save(args.out_dir, args.quick, md, payload)
        print(f"\nwrote {md_path}\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
