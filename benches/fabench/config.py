"""The side-by-side harness's cases, options and resolved configuration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .argtypes import add_run_options, new_parser, positive

PROG = "harness"
SCHEMA = "ferroattn-bench-harness/1"
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
    "hf",
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
    "hf": "10. generate() through transformers: DynamicCache vs FerroattnCache, window masks",
}


def parse_cases(text: str) -> list[str]:
    """Comma separated case names or numbers, in the harness's fixed order."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    aliases = {str(i + 1): c for i, c in enumerate(CASES)}
    names = [aliases.get(c, c) for c in names]
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {bad or text!r}; choose from {','.join(CASES)} (or 1-{len(CASES)})"
        )
    return [c for c in CASES if c in names]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        PROG,
        "ferroattn vs torch SDPA, ONNX Runtime and NumPy: every case of the project's "
        "benchmark, side by side in one process.",
        "tiny shapes, 1 repeat, no pauses; checks that every case runs and that well-formed "
        "JSON is written; timings mean nothing",
        show_defaults=False,
    )
    p.add_argument(
        "--cases",
        type=parse_cases,
        default=list(CASES),
        help=f"cases to run, comma separated, by name or number [all: {','.join(CASES)}]",
    )
    p.add_argument("--threads", type=positive, default=2, help="threads per case [2]")
    add_run_options(p, repeats="5; quick 1", files="harness-<date>.{json,md,png}")
    p.add_argument(
        "--no-huge",
        action="store_true",
        help="case 8 at N=16384 instead of N=32768 (1/4 of the time, 1/2 of the memory)",
    )
    p.add_argument("--no-chart", action="store_true", help="write no PNG chart")
    return p


@dataclass
class Config:
    """The options with their defaults resolved (``--quick`` changes several)."""

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
            out_dir=args.out_dir,
            save=not args.no_save,
            chart=not args.no_chart,
            seed=args.seed,
        )
