"""What a measurement depends on: the optional peers, the machine, the thread counts.

Every peer (torch, ONNX Runtime and onnx, ml_dtypes, threadpoolctl) is optional: a missing or
broken one is recorded with the reason and shows as such in the tables, never as a crash.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PEER_MODULES = ("torch", "onnxruntime", "onnx", "ml_dtypes", "threadpoolctl")
# Environment variables that change what the libraries do; recorded with every result.
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


class BenchError(Exception):
    """A failure with a message for the user: exit status ``code`` (1 for accuracy, else 2)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def short(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_main(prog: str, body: Callable[[], int], *, oom_hint: str = "") -> int:
    """Runs a command's ``body`` and returns its exit status; a failure becomes one error line
    on stderr (after the traceback, for an unexpected one) and status 2 (1 for accuracy)."""
    try:
        return body()
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory{oom_hint}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (traceback printed, then a clean exit)
        traceback.print_exc()
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def import_ferroattn() -> Any:
    """The ferroattn Python finds (installed or on PYTHONPATH); BenchError if none loads."""
    try:
        import ferroattn
    except Exception as exc:  # noqa: BLE001 (any failure of the import is reported)
        raise BenchError(f"cannot import ferroattn: {exc}") from None
    return ferroattn


def start(modules: Iterable[str] = PEER_MODULES) -> tuple[Any, Peers, dict[str, Any]]:
    """ferroattn, the optional ``modules``, and the description of this run's environment."""
    fa = import_ferroattn()
    peers = Peers().load(modules)
    return fa, peers, collect_env(fa, peers)


def progress(msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def import_optional(name: str) -> tuple[Any, str | None]:
    """(module, None), or (None, why it is not there)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = __import__(name)
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # noqa: BLE001 (broken install: report, don't crash)
        return None, f"import failed: {short(exc, 100)}"
    return module, None


@dataclass
class Peers:
    """The optional modules a run uses, each with its status."""

    modules: dict[str, tuple[Any, str | None]] = field(default_factory=dict)

    def load(self, names: Iterable[str] = PEER_MODULES) -> Peers:
        for name in names:
            self.modules[name] = import_optional(name)
        return self

    def get(self, name: str) -> Any:
        return self.modules.get(name, (None, None))[0]

    def status(self, name: str) -> str:
        return str(self.modules.get(name, (None, "not loaded"))[1])

    def ort(self) -> tuple[Any, Any, str | None]:
        """(onnxruntime, onnx, None) or (None, None, why not)."""
        ort, onnx = self.get("onnxruntime"), self.get("onnx")
        if ort is None:
            return None, None, f"onnxruntime {self.status('onnxruntime')}"
        if onnx is None:
            return None, None, f"onnx {self.status('onnx')} (needed to build the model)"
        return ort, onnx, None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def l3_size() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None


def _thread_pools(tpc: Any) -> list[dict[str, Any]] | str:
    if tpc is None:
        return "threadpoolctl not installed"
    keep = (
        "user_api",
        "internal_api",
        "prefix",
        "version",
        "architecture",
        "threading_layer",
        "num_threads",
    )
    return [{k: v for k, v in lib.items() if k in keep} for lib in tpc.threadpool_info()]


def collect_env(fa: Any, peers: Peers) -> dict[str, Any]:
    """The machine, the versions, the variables and the thread pools of this run."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "l3_cache": l3_size(),
        "loadavg_at_start": loadavg(),
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
    for name, (module, status) in peers.modules.items():
        if module is None:
            env[name] = {"status": status}
        else:
            env[name] = {"status": "ok", "version": str(getattr(module, "__version__", "?"))}
    torch = peers.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            env["torch"]["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        with contextlib.suppress(Exception):
            env["torch"]["parallel_info"] = torch.__config__.parallel_info().splitlines()[:12]
    env["blas_pools"] = _thread_pools(peers.get("threadpoolctl"))
    return env


@contextlib.contextmanager
def thread_limits(n: int, fa: Any, peers: Peers, notes: list[str] | None = None) -> Iterator[None]:
    """``n`` threads for ferroattn, torch and NumPy's BLAS (threadpoolctl) while the block runs;
    ONNX Runtime gets ``n`` in its session options. ``notes`` gets a line if ferroattn kept
    another count."""
    torch, tpc = peers.get("torch"), peers.get("threadpoolctl")
    prev_fa = fa.get_num_threads()
    fa.set_num_threads(n)
    got = fa.get_num_threads()
    if notes is not None and got != n:
        notes.append(f"ferroattn.set_num_threads({n}) left {got} threads")
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
