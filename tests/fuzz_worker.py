"""The fuzz worker: runs fuzz targets for a number of examples and prints the outcome counts
(and every finding, with its reproducer) as one JSON line.

It runs in its own process (see ``tests/test_fuzz.py`` and ``scripts/fuzz.py``) so that an abort
or a hang ends the worker, not the test run: the parent reads the call in flight from
``--log`` (written before each call) and reports it. The worker caps its address space so that
a huge allocation fails at once instead of being overcommitted, and dumps its stack and exits
when one call runs past ``--call-timeout`` seconds.

    PYTHONPATH=python:tests python tests/fuzz_worker.py --targets attention --examples 50
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def all_targets() -> dict:
    from fuzz_attention import TARGETS as attention
    from fuzz_cache_layer import TARGETS as objects
    from fuzz_functions import TARGETS as functions

    return {**attention, **functions, **objects}


def _signature(func: str, finding: str, detail: str) -> str:
    """Findings that differ only in numbers and shapes count as one."""
    return f"{func}|{finding}|" + re.sub(r"[-\d.e+]+|\([^)]*\)|\[[^\]]*\]", "#", detail)[:160]


class Runner:
    def __init__(self, log: Path | None, call_timeout: float, verbose: bool = False) -> None:
        self.log, self.call_timeout, self.verbose = log, call_timeout, verbose
        self.counts: dict[str, Counter] = {}
        self.findings: dict[str, dict] = {}
        self.examples = 0

    def run(self, case) -> None:
        from fuzz_inputs import judge

        if self.log is not None:
            self.log.write_text(f"{case.func}\n{case.code}\n")
        faulthandler.dump_traceback_later(self.call_timeout, exit=True)
        try:
            verdict = judge(case)
        finally:
            faulthandler.cancel_dump_traceback_later()
        if self.verbose:
            print(
                f"{case.func}: {verdict.outcome} {verdict.finding or ''} {verdict.detail[:200]}"
                f"\n    {case.code[-400:]}",
                file=sys.stderr,
            )
        counts = self.counts.setdefault(case.func, Counter())
        counts["calls"] += 1
        counts[verdict.outcome] += 1
        if verdict.finding is not None:
            counts[verdict.finding] += 1
            key = _signature(case.func, verdict.finding, verdict.detail)
            entry = self.findings.setdefault(
                key,
                {
                    "function": case.func,
                    "finding": verdict.finding,
                    "detail": verdict.detail,
                    "code": case.code,
                    "count": 0,
                },
            )
            entry["count"] += 1

    def target(self, name: str, fn, examples: int, seed: int) -> None:
        from fuzz_inputs import Case, Draw
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st

        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hseed(seed)
        @given(st.data())
        def body(data):
            self.examples += 1
            try:
                made = fn(Draw(data.draw))
                for case in [made] if isinstance(made, Case) else made:
                    self.run(case)
            except Exception:  # noqa: BLE001 - a bug of the fuzzer itself: report, go on
                counts = self.counts.setdefault(name, Counter())
                counts["fuzzer_error"] += 1
                detail = traceback.format_exc(limit=-3)
                self.findings.setdefault(
                    _signature(name, "fuzzer_error", detail),
                    {
                        "function": name,
                        "finding": "fuzzer_error",
                        "detail": detail,
                        "code": "",
                        "count": 0,
                    },
                )["count"] += 1

        body()


# --------------------------------------------------------------------------
# The parent's side: run a worker, read what it said or how it died
# --------------------------------------------------------------------------


@dataclass
class WorkerResult:
    counts: dict[str, dict[str, int]]
    findings: list[dict]
    died: str | None = None  # "crash (signal 6)", "hang", "exit 1": the worker did not finish
    in_flight: str = ""  # the function and call running when it died
    stderr: str = ""


def spawn(
    targets: list[str],
    *,
    examples: int,
    seed: int,
    call_timeout: float = 10.0,
    timeout: float = 300.0,
    extra_env: dict[str, str] | None = None,
) -> WorkerResult:
    """Run a worker over ``targets`` in a fresh interpreter and return what it found; an
    abort, a hang or a timeout comes back as ``died`` with the call that was in flight."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, RUST_BACKTRACE="0", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "in_flight.txt"
        cmd = [
            sys.executable,
            str(here / "fuzz_worker.py"),
            "--targets",
            ",".join(targets),
            "--examples",
            str(examples),
            "--seed",
            str(seed),
            "--log",
            str(log),
            "--call-timeout",
            str(call_timeout),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = None, ""
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        in_flight = log.read_text() if log.exists() else ""
    lines = out.strip().splitlines()
    if rc == 0 and lines:
        data = json.loads(lines[-1])
        return WorkerResult(data["counts"], data["findings"], stderr=err[-4000:])
    if rc is None or "Timeout (" in err:
        died = "hang"
    elif rc < 0:
        died = f"crash (signal {-rc}: {signal.Signals(-rc).name})"
    else:
        died = f"exit {rc}"
    return WorkerResult({}, [], died, in_flight, err[-4000:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="all", help="comma-separated target names, or 'all'")
    p.add_argument("--examples", type=int, default=50, help="hypothesis examples per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=Path, help="file holding the call in flight")
    p.add_argument("--call-timeout", type=float, default=10.0, help="seconds for one call")
    p.add_argument("--memory-gib", type=float, default=6.0, help="address-space cap")
    p.add_argument("--list", action="store_true", help="print the target names and exit")
    p.add_argument("--verbose", action="store_true", help="print every call and its outcome")
    args = p.parse_args(argv)
    cap = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    warnings.simplefilter("ignore")  # overflow and NaN warnings are part of the inputs
    targets = all_targets()
    if args.list:
        print(" ".join(targets))
        return 0
    names = list(targets) if args.targets == "all" else args.targets.split(",")
    runner = Runner(args.log, args.call_timeout, args.verbose)
    for name in names:
        runner.target(name, targets[name], args.examples, args.seed)
    counts = {f: dict(c) for f, c in runner.counts.items()}
    print(json.dumps({"counts": counts, "findings": list(runner.findings.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
