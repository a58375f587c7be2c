"""Case 8: the extra memory one large call takes, measured in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..env import progress, short
from ..tables import fmt_bytes
from ..timing import FA
from .base import Case, Run, target

MEMORY_EXTRA_TARGET = 16 << 20  # "a few MB": extra peak RSS allowed (O(threads x tile))

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


def memory(run: Run) -> Case:
    """One call at N=32768 D=128 H=16 fp32 (N=16384 with ``--no-huge``) in a subprocess: peak
    RSS during the call minus the RSS after allocating and touching q, k, v and ``out``."""
    cfg = run.cfg
    case = Case("memory")
    if cfg.quick:
        h, n, d, mode = 2, 1024, 64, "quick"
    elif cfg.no_huge:
        h, n, d, mode = 16, 16384, 128, "--no-huge"
    else:
        h, n, d, mode = 16, 32768, 128, "full"
    t = cfg.threads
    label = f"B=1 H={h} N={n} D={d} ({mode})"
    progress(f"  case 8 runs one call at N={n} in a subprocess ...")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CODE, str(h), str(n), str(d), str(t)],
            env=dict(os.environ),
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
        case.add(label, FA, {"status": f"failed: {short(exc)}"}, threads=t)
        return case
    if data.get("hwm_reset") and data.get("hwm") is not None and data.get("base_rss"):
        source, peak, base = "VmHWM (reset after the allocations)", data["hwm"], data["base_rss"]
    else:  # ru_maxrss: a peak since the process started (and inherited over exec)
        source, peak, base = "ru_maxrss", data["maxrss"], max(data["base_maxrss"], 0)
    extra = max(0, peak - base)
    ms = data["seconds"] * 1e3
    io_bytes = data["inputs_output_bytes"]
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
        "inputs_output_bytes": io_bytes,
        "extra_bytes": extra,
        "extra_over_inputs_output": extra / io_bytes,
    }
    row = case.add(label, FA, r, threads=t, flops=4.0 * h * n * n * d)
    target(
        row,
        f"extra peak RSS <= {fmt_bytes(MEMORY_EXTRA_TARGET)}",
        extra / (1 << 20),
        extra <= MEMORY_EXTRA_TARGET,
        "MiB",
    )
    case.notes.append(
        f"memory: N={n} ({mode}); extra = peak RSS during one call ({source}) - RSS after "
        f"allocating q, k, v and out ({fmt_bytes(io_bytes)}; out= given): "
        f"{fmt_bytes(extra)} = {100 * extra / io_bytes:.2f}% of them"
    )
    return case
