"""The benchmark harness: ferroattn next to torch SDPA, ONNX Runtime and NumPy, side by side.

    python benches/harness.py                    # every case, ~8-10 min on 2 cores
    python benches/harness.py --quick            # smoke test (CI): tiny shapes, seconds
    python benches/harness.py --cases prefill,decode --threads 2 --repeats 9

All candidates run in this one process, interleaved round-robin (a rotating start), after a
warm-up; the median of the repeats is reported. Before a peer is timed its output is checked
against ferroattn's (or a float64 reference). Two ceilings are measured in the same run: the
fp32 GEMM rate and the memory-read bandwidth. Each case is printed to stderr as it finishes;
the table goes to stdout and, with JSON, a markdown copy and a PNG chart, to
``benches/results/harness-<date>.*`` whatever the current directory (``--out-dir`` for
another). It imports the ferroattn that Python finds (installed, or on ``PYTHONPATH``).

torch, onnxruntime (+ onnx), ml_dtypes, threadpoolctl and matplotlib are all optional: a
missing one shows as "not installed" in its rows. Exit status: 0 on success, 1 if a peer
failed the accuracy check (its rows say so; the rest of the run still happens), 2 on errors.
See benches/README.md.
"""

from __future__ import annotations

import sys
import textwrap
import time
import traceback
from typing import Any

# Python puts this file's folder first on sys.path, so fabench imports from any directory.
from fabench import report
from fabench.cases import RUNNERS, Case, Run, share_ceilings
from fabench.ceilings import Ceilings
from fabench.config import CASE_TITLES, PROG, SCHEMA, Config, build_parser
from fabench.env import (
    BenchError,
    progress,
    run_main,
    short,
    start,
)
from fabench.tables import json_safe
from fabench.timing import FA


def run_case(name: str, run: Run) -> Case:
    """One case; a failure other than a BenchError becomes the case's only row."""
    try:
        return RUNNERS[name](run)
    except MemoryError:
        case = Case(name)
        case.add("-", FA, {"status": "failed: out of memory"}, threads=run.cfg.threads)
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 (one case failing does not lose the others)
        traceback.print_exc()
        case = Case(name)
        case.add("-", FA, {"status": f"failed: {short(exc)}"}, threads=run.cfg.threads)
    return case


def run(cfg: Config) -> int:
    fa, peers, env = start()
    ceil = Ceilings(cfg.quick)
    ctx = Run(fa, peers, cfg, ceil)
    started = time.perf_counter()
    progress(f"ferroattn harness: cases {','.join(cfg.cases)}" + (" [quick]" if cfg.quick else ""))
    # The ceilings first, on an otherwise idle process.
    for t in sorted({cfg.threads, 1} if "scaling" in cfg.cases else {cfg.threads}):
        ceil.gemm_gflops(t)
        ceil.bandwidth_gbs(t)
    cases: list[Case] = []
    for i, name in enumerate(cfg.cases, 1):
        t0 = time.perf_counter()
        progress(f"[{i}/{len(cfg.cases)}] {CASE_TITLES[name]} ...")
        case = run_case(name, ctx)
        share_ceilings(case, ceil)
        cases.append(case)
        progress(f"      done in {time.perf_counter() - t0:.1f}s: {report.progress_line(case)}")

    header = report.header_lines(env, cfg, ceil)
    rows = report.table_rows(cases)
    notes = [n for c in cases for n in c.notes]
    failed = [c.id for c in cases if not c.accuracy_ok]
    if failed:
        notes.append(f"ACCURACY CHECK FAILED in case(s) {', '.join(failed)}: see the rows")
    if cfg.quick:
        notes.append(
            "--quick: a smoke test of the harness; the timings and the (512^3, 64 MiB) "
            "ceilings are not a measurement"
        )
    summary = report.target_summary(cases)
    print("\n".join(header), end="\n\n")
    print("\n".join(report.text_table(rows)), end="\n\n")
    counts = {k: sum(1 for s in summary if s["result"] == k) for k in ("PASS", "MISS", "n/a")}
    print(f"targets: {counts['PASS']} PASS, {counts['MISS']} MISS, {counts['n/a']} n/a")
    for n in notes + report.FOOTNOTES:
        print(textwrap.fill(n, width=100, initial_indent="- ", subsequent_indent="  "))
    elapsed = time.perf_counter() - started
    print(f"total time {elapsed:.0f} s")

    if cfg.save:
        payload: dict[str, Any] = {
            "schema": SCHEMA,
            "config": json_safe(vars(cfg)),
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
        md = report.format_markdown(header, rows, notes)
        for path in report.save(cfg, md, payload, cases):
            print(f"wrote {path}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    cfg = Config.from_args(build_parser().parse_args(argv))
    return run_main(PROG, lambda: run(cfg))


if __name__ == "__main__":
    sys.exit(main())
