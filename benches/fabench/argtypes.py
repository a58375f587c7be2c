"""argparse value parsers shared by the benchmark command lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def positive(text: str) -> int:
    """An integer >= 1."""
    return _at_least(text, 1)


def non_negative(text: str) -> int:
    """An integer >= 0."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_list(what: str) -> Callable[[str], list[int]]:
    """A parser of comma-separated integers >= 1, e.g. ``1,2`` (``what`` names them in the
    error message)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.replace(" ", "").split(",") if t]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected e.g. 1,2 - got {text!r}") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {text!r}")
        return values

    return parse


def new_parser(
    prog: str, description: str, quick: str, *, show_defaults: bool = True
) -> argparse.ArgumentParser:
    """A command line with its ``--quick`` smoke mode (``quick`` says what it runs)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter
        if show_defaults
        else argparse.HelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"smoke mode (CI): {quick}")
    return p


def add_run_options(p: argparse.ArgumentParser, *, repeats: str, files: str) -> None:
    """The options every benchmark command has: repeats (``repeats`` describes the default),
    warm-up, the pause between calls, where the result files (``files``) go, and the seed."""
    p.add_argument("--repeats", type=positive, default=None, help=f"timed repeats [{repeats}]")
    p.add_argument("--warmup", type=non_negative, default=None, help="warm-up calls [1]")
    p.add_argument(
        "--gap-ms",
        type=float,
        default=None,
        help="untimed pause after each timed call, so that spinning worker threads of one "
        "library do not steal the cores of the next [100; 0 with --quick]",
    )
    p.add_argument(
        "--out-dir", type=Path, default=RESULTS, help=f"where {files} go [benches/results]"
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs [0]")
