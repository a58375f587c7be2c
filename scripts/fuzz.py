"""The long bad-input fuzz profile: every public function, fresh seeds, for N minutes.

    PYTHONPATH=python python scripts/fuzz.py --minutes 5
    PYTHONPATH=python python scripts/fuzz.py --minutes 1 --targets attention,KVCache --json out.json
    PYTHONPATH=python python scripts/fuzz.py --rounds 1 --seed 20260509 --examples 50  # the CI run

Runs the fuzz targets of ``tests/fuzz_*.py`` (the same as ``tests/test_fuzz.py``, which runs a
bounded profile in CI) in worker processes, one target and seed at a time, round robin, until
the time is up. Prints, per function, the calls and their outcomes (ok / ValueError /
TypeError / MemoryError / other exceptions / crashes / hangs), then every distinct finding (a
call that broke the contract: see ``tests/fuzz_inputs.py``) with a reproducer. A worker that
aborts or hangs is counted against the function whose call was in flight, and the run goes on
with the next seed. Exits 1 when anything was found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_inputs import FINDINGS, OUTCOMES  # noqa: E402
from fuzz_worker import all_targets, spawn  # noqa: E402

COLUMNS = ("calls", *OUTCOMES, "crash", "hang")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz")
    p.add_argument("--targets", default="all", help="comma-separated targets (default: all)")
    p.add_argument("--examples", type=int, default=150, help="examples per worker run")
    p.add_argument("--seed", type=int, default=1, help="first seed (then +1 per round)")
    p.add_argument("--call-timeout", type=float, default=20.0, help="seconds one call may take")
    p.add_argument("--rounds", type=int, help="stop after this many rounds over the targets")
    p.add_argument("--json", type=Path, help="also write the counts and findings here")
    args = p.parse_args(argv)

    targets = list(all_targets()) if args.targets == "all" else args.targets.split(",")
    deadline = time.monotonic() + 60 * args.minutes
    counts: dict[str, Counter] = {}
    findings: dict[tuple, dict] = {}
    runs, seed = 0, args.seed
    while time.monotonic() < deadline and (args.rounds is None or seed - args.seed < args.rounds):
        for target in targets:
            if time.monotonic() >= deadline:
                break
            res = spawn(
                [target],
                examples=args.examples,
                seed=seed,
                call_timeout=args.call_timeout,
                timeout=args.call_timeout + 600,
            )
            runs += 1
            for func, c in res.counts.items():
                counts.setdefault(func, Counter()).update(c)
            for f in res.findings:
                key = (f["function"], f["finding"], f["detail"][:120])
                findings.setdefault(key, dict(f, count=0, seed=seed))["count"] += f["count"]
            if res.died:
                func, _, code = res.in_flight.partition("\n")
                func = func or target
                kind = "hang" if res.died == "hang" else "crash"
                c = counts.setdefault(func, Counter())
                c[kind] += 1
                c["calls"] += 1
                key = (func, kind, code[:120])
                findings.setdefault(
                    key,
                    {
                        "function": func,
                        "finding": kind,
                        "detail": res.died,
                        "code": code.strip(),
                        "count": 0,
                        "seed": seed,
                    },
                )
                findings[key]["count"] += 1
        seed += 1

    print(f"{runs} worker runs, seeds {args.seed}..{seed - 1}, {args.examples} examples each\n")
    width = max(len(f) for f in counts) if counts else 8
    print(f"{'function':<{width}} " + " ".join(f"{c:>11}" for c in COLUMNS) + "  findings")
    for func in sorted(counts):
        c = counts[func]
        found = sum(c.get(k, 0) for k in (*FINDINGS, "crash", "hang"))
        print(f"{func:<{width}} " + " ".join(f"{c.get(k, 0):>11}" for k in COLUMNS) + f"  {found}")
    total = Counter()
    for c in counts.values():
        total.update(c)
    print(f"{'total':<{width}} " + " ".join(f"{total.get(k, 0):>11}" for k in COLUMNS))
    print(f"\n{len(findings)} distinct findings")
    for f in sorted(findings.values(), key=lambda f: (f["function"], f["finding"])):
        print(
            f"\n[{f['finding']}] {f['function']} x{f['count']} (seed {f['seed']}): "
            f"{f['detail'][:400]}"
        )
        print("    " + f["code"].replace("\n", "\n    "))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "counts": {k: dict(v) for k, v in counts.items()},
                    "findings": list(findings.values()),
                },
                indent=1,
            )
        )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
