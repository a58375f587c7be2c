"""This machine's ceilings, measured in the same run as the candidates: the fp32 GEMM rate
(what a prefill could reach) and the memory-read bandwidth (what a decode step could reach).

The GEMM runs in a fresh interpreter whose environment lacks ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE``: OpenBLAS reads them when it loads, some machines set them to values that
slow it down, and they cannot be unset for one measurement inside this process.

The bandwidth is read by NumPy reductions (which release the GIL) over one array split across
as many Python threads as the case uses; of two kernels (a sum and a max) the one less limited
by arithmetic gives the higher, more honest ceiling. Other load only ever lowers a measurement,
so the best of several is the reference: the most stable estimate and the stricter target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .env import progress, short

CLEANED_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

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
    """fp32 GEMM rate of NumPy's BLAS at ``threads`` threads: ``n``³ matmul, best of ``runs``
    after a warm-up, in a subprocess without the variables of ``CLEANED_VARS``."""
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
        return {"status": f"failed: {short(exc)}", "threads": threads, "n": n}
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


def read_rates(threads: int, mib: int, runs: int) -> dict[str, float]:
    """Read rate (GB/s) per reduction kernel over ``mib`` MiB split across ``threads`` Python
    threads: the fastest of ``runs`` reads each."""
    a = np.ones((mib << 20) // 4, dtype=np.float32)  # written once: every page is mapped
    parts = np.array_split(a, threads)
    kernels: dict[str, Callable[[np.ndarray], Any]] = {
        "add.reduce": np.add.reduce,
        "maximum.reduce": np.maximum.reduce,
    }
    rates: dict[str, float] = {}
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
        rates[name] = a.nbytes / best / 1e9
    return rates


class Bandwidth:
    """The read bandwidth per thread count, over every measurement taken; the best is the
    reference."""

    def __init__(self, mib: int, runs: int) -> None:
        self.mib = mib
        self.runs = runs
        self.data: dict[int, dict[str, Any]] = {}

    def measure(self, threads: int) -> float:
        """Takes one more measurement at ``threads`` threads; returns the reference."""
        per_kernel = read_rates(threads, self.mib, self.runs)
        d = self.data.setdefault(
            threads,
            {
                "threads": threads,
                "mib": self.mib,
                "runs": self.runs,
                "gbs": 0.0,
                "kernels": {},
                "measurements_gbs": [],
            },
        )
        d["measurements_gbs"].append(max(per_kernel.values()))
        for k, v in per_kernel.items():
            d["kernels"][k] = max(v, d["kernels"].get(k, 0.0))
        d["gbs"] = max(d["measurements_gbs"])
        return float(d["gbs"])

    def gbs(self, threads: int) -> float:
        return float(self.data[threads]["gbs"])

    def as_json(self) -> dict[str, Any]:
        return {str(k): v for k, v in sorted(self.data.items())}


class Ceilings:
    """GEMM rate and read bandwidth per thread count, each measured once, when first needed
    (``quick``: 512³ and 64 MiB, a smoke test, not a measurement)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.gemm: dict[int, dict[str, Any]] = {}
        self.bw = Bandwidth(*((64, 3) if quick else (1024, 6)))

    def gemm_gflops(self, threads: int) -> float | None:
        if threads not in self.gemm:
            n, runs = (512, 2) if self.quick else (4096, 3)
            progress(f"  measuring the fp32 GEMM ceiling ({n}^3, {threads} threads) ...")
            self.gemm[threads] = measure_gemm(threads, n, runs)
        g = self.gemm[threads]
        return g.get("gflops") if g.get("status") == "ok" else None

    def bandwidth_gbs(self, threads: int) -> float:
        if threads not in self.bw.data:
            progress(f"  measuring the read bandwidth ({self.bw.mib} MiB, {threads} threads) ...")
            self.bw.measure(threads)
        return self.bw.gbs(threads)

    def as_json(self) -> dict[str, Any]:
        return {
            "gemm": {str(k): v for k, v in sorted(self.gemm.items())},
            "bandwidth": self.bw.as_json(),
        }
