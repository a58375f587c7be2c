"""Bad-input fuzzing of ferroattn: arrays and option values, cases, and how a call is judged.

A *case* is one public call with arguments drawn by hypothesis. Every argument carries a
verdict: ``VALID`` (the documented contract accepts it), ``LAX`` (odd but with a meaning, such
as a 2**63 window side, a zero-size axis or a bool where an int is wanted: the call may give
the right answer or refuse it by name) or ``INVALID`` (the call must refuse it). The judge then
requires, of every call:

* a result: no ``INVALID`` argument, and the result equals the float64 reference (the case's
  ``check``; a few results, such as a call with NaN inputs, are only checked for shape);
* an exception: ``ValueError``, ``TypeError`` or ``MemoryError`` (or subclasses) whose message
  names one of the ``LAX``/``INVALID`` arguments as a word (the simple, honest check: the
  argument's name appears in the message), and only when there is such an argument; a failed
  cache call must leave the cache as it was (the case's ``after_error``);
* never another exception type (``RuntimeError`` is ferroattn's "internal error"), an abort
  or a hang (those are caught by the worker's parent: see ``fuzz_worker.py``).

Arrays are built by :func:`build` from a shape, dtype, memory layout and seed, so a case's
reproducer is a few lines of Python (``from fuzz_inputs import build``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import strategies as st
from reference import OUT_RTOL, rel_err

VALID, LAX, INVALID = "valid", "lax", "invalid"

# Outcomes counted per function (crash and hang are added by the worker's parent).
OUTCOMES = ("ok", "ValueError", "TypeError", "MemoryError", "other")
# Findings: calls whose outcome breaks the contract above.
FINDINGS = (
    "wrong_result",
    "accepted_invalid",
    "rejected_valid",
    "unnamed_error",
    "other_exception",
    "state_changed",
    "fuzzer_error",  # the fuzzer's own code failed (a bug here, not in ferroattn)
)

# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Accepted by the documentation too (converted to float32 once): byte-swapped and long floats.
CONVERTED_DTYPES = (">f4", ">f8", ">f2", "longdouble")
BAD_DTYPES = ("int32", "int8", "uint8", "bool", "complex64", "object", "U3", "datetime64[s]")
# Memory layouts with the same values: C order, Fortran order, negative strides on every axis,
# a step of 2 on the last axis, padded rows, data one byte off its item alignment, read-only,
# nested lists, and zero strides (the values are then constant along the broadcast axes).
LAYOUTS = ("c", "f", "neg", "step", "rows", "misaligned", "readonly", "list", "bcast")


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def build(
    shape: tuple[int, ...],
    dtype: str = "float32",
    layout: str = "c",
    seed: int = 0,
    *,
    bcast: tuple[int, ...] = (),
    mag: float = 1.0,
) -> Any:
    """Standard-normal values (times ``mag``) of ``shape`` in ``dtype`` with memory ``layout``.

    ``bcast`` lists axes along which the values are constant and the strides zero (the array
    is a read-only ``np.broadcast_to`` view, so any size costs no memory).
    """
    dt = np_dtype(dtype)
    rng = np.random.default_rng(seed)
    base_shape = tuple(1 if i in bcast else n for i, n in enumerate(shape))
    size = int(np.prod(base_shape, dtype=np.int64))
    values = (rng.standard_normal(size) * mag).reshape(base_shape)
    if dt.kind == "b":
        x = np.asarray(values > 0)
    elif dt.kind in "iu":
        x = np.clip(np.rint(values * 3), np.iinfo(dt).min, np.iinfo(dt).max).astype(dt)
    elif dt.kind == "U":
        x = values.astype(dt)
    elif dt.kind == "M":
        x = values.astype(np.int64).astype(dt)
    else:
        x = values.astype(np.float32).astype(dt) if dt.kind == "f" else values.astype(dt)
    if bcast:
        return np.broadcast_to(x, shape)
    return _with_layout(x, layout)


def _with_layout(x: np.ndarray, layout: str) -> Any:
    if layout == "c" or x.ndim == 0:
        return np.ascontiguousarray(x)
    if layout == "f":
        return np.asfortranarray(x)
    if layout == "neg":
        flip = (slice(None, None, -1),) * x.ndim
        return np.ascontiguousarray(x[flip])[flip]
    if layout in ("step", "rows"):
        axis = x.ndim - 1 if layout == "step" or x.ndim == 1 else x.ndim - 2
        wide = list(x.shape)
        wide[axis] = 2 * x.shape[axis] + 1
        buf = np.zeros(wide, dtype=x.dtype)
        index = [slice(None)] * x.ndim
        index[axis] = slice(1, None, 2)
        view = buf[tuple(index)]
        view[...] = x
        return view
    if layout == "misaligned":
        if x.dtype.itemsize < 2 or x.dtype.kind == "O":
            return x
        raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
        out = raw[1:].view(x.dtype).reshape(x.shape)
        out[...] = x
        return out
    if layout == "readonly":
        out = np.ascontiguousarray(x)
        out.setflags(write=False)
        return out
    if layout == "list":
        return x.tolist()
    raise ValueError(f"unknown layout {layout!r}")


def build_code(shape, dtype, layout, seed, bcast=(), mag=1.0) -> str:
    extra = (f", bcast={tuple(bcast)!r}" if bcast else "") + (f", mag={mag!r}" if mag != 1 else "")
    return f"build({tuple(shape)!r}, {dtype!r}, {layout!r}, seed={seed}{extra})"


def as_f64(x: Any) -> np.ndarray:
    """The values the reference reads: the argument exactly as the caller's dtype holds it."""
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------
# Arguments and cases
# --------------------------------------------------------------------------


@dataclass
class Arg:
    """One argument: its value, the Python that rebuilds it, its verdict and its meaning (what
    the oracle reads: the value itself unless given)."""

    value: Any
    code: str
    verdict: str = VALID
    meaning: Any = None
    setup: str = ""  # statements the code needs first (a reproducer prints them above the call)

    def __post_init__(self) -> None:
        if self.meaning is None:
            self.meaning = self.value


def lit(value: Any, verdict: str = VALID, meaning: Any = None) -> Arg:
    """An argument whose ``repr`` rebuilds it."""
    return Arg(value, _code_of(value), verdict, meaning)


def _code_of(value: Any) -> str:
    if isinstance(value, float) and not np.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, np.generic):
        return f"np.{type(value).__name__}({value.item()!r})"
    return repr(value)


@dataclass
class Case:
    """One call to judge. ``check(result)`` raises AssertionError for a wrong result;
    ``after_error()`` raises AssertionError when a failed call changed state."""

    func: str
    call: Callable[[], Any]
    code: str
    args: dict[str, Arg] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None
    after_error: Callable[[], None] | None = None
    extra_blame: tuple[str, ...] = ()
    must_fail: bool = False

    @property
    def blame(self) -> tuple[str, ...]:
        """Arguments a refusal may name: the odd and the invalid ones."""
        odd = tuple(n for n, a in self.args.items() if a.verdict != VALID)
        return odd + self.extra_blame

    @property
    def invalid(self) -> bool:
        return self.must_fail or any(a.verdict == INVALID for a in self.args.values())


def call_code(
    func: str, args: dict[str, Arg], positional: Iterable[str] = (), assign: str = ""
) -> str:
    """``assign func(a, b, key=value, ...)`` with each argument's rebuilding code, after the
    statements the arguments need."""
    pos = list(positional)
    parts = [args[n].code for n in pos if n in args]
    parts += [f"{n}={a.code}" for n, a in args.items() if n not in pos]
    setup = dict.fromkeys(a.setup for a in args.values() if a.setup)  # once each, in order
    return "".join(f"{line}\n" for line in setup) + f"{assign}{func}({', '.join(parts)})"


def masked(x: Any, value: float, row_axis: int) -> np.ndarray:
    """A copy of ``x`` with every other entry along ``row_axis`` (counted from the end) set to
    ``value``: the rows a part of a split attention did not see."""
    out = np.array(x)
    index = [slice(None)] * out.ndim
    index[out.ndim - row_axis] = slice(None, None, 2)
    out[tuple(index)] = value
    return out


def names(message: str, *args: str) -> bool:
    """Whether ``message`` names one of ``args`` as a word (``k`` in "k has ...", not in "key";
    ``rel_bias`` also by ``rel_bias.table``)."""
    return any(re.search(rf"(?<![\w]){re.escape(a)}(?!\w)", message) for a in args)


@dataclass
class Verdict:
    outcome: str  # one of OUTCOMES
    finding: str | None = None  # one of FINDINGS
    detail: str = ""


def judge(case: Case) -> Verdict:
    """Run one case and judge it (see the module docstring)."""
    try:
        result = case.call()
    except (ValueError, TypeError, MemoryError) as err:
        outcome = next(
            t.__name__ for t in (ValueError, TypeError, MemoryError) if isinstance(err, t)
        )
        message = f"{type(err).__name__}: {err}"
        if case.after_error is not None:
            try:
                case.after_error()
            except AssertionError as e:
                return Verdict(outcome, "state_changed", f"{message} | {e}")
        blame = case.blame
        if not blame:
            return Verdict(outcome, "rejected_valid", message)
        if not names(str(err), *blame):
            return Verdict(outcome, "unnamed_error", f"{message} | should name one of {blame}")
        return Verdict(outcome)
    except Exception as err:  # noqa: BLE001 - any other type is what the fuzzer looks for
        return Verdict("other", "other_exception", f"{type(err).__name__}: {err}")
    if case.invalid:
        bad = [n for n, a in case.args.items() if a.verdict == INVALID] or list(case.extra_blame)
        return Verdict("ok", "accepted_invalid", f"no error for {bad}")
    if case.check is not None:
        try:
            case.check(result)
        except AssertionError as e:
            return Verdict("ok", "wrong_result", str(e)[:500] or "wrong result")
    return Verdict("ok")


# --------------------------------------------------------------------------
# Strategies: sizes, arrays and option values
# --------------------------------------------------------------------------

HUGE_SIZES = (2**31, 2**40, 2**45)
HUGE_INTS = (2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70)


def size(draw, lo: int = 1, hi: int = 9) -> int:
    return draw(st.integers(lo, hi))


class Draw:
    """hypothesis's ``draw`` plus a seeded ``random.Random`` for the choice between kinds of
    input: hypothesis favours the ends of integer ranges (0 comes up a third of the time in
    ``integers(0, 9)``), which would make the rare kinds (the invalid ones) the common ones.
    Values themselves (sizes, seeds, floats) still come from hypothesis, ends included."""

    def __init__(self, draw) -> None:
        self._draw = draw
        self.rng = random.Random(draw(st.integers(0, 2**32 - 1)))

    def __call__(self, strategy):
        return self._draw(strategy)


def roll(draw, n: int) -> int:
    """A uniform integer in ``[0, n)``."""
    if isinstance(draw, Draw):
        return draw.rng.randrange(n)
    return draw(st.integers(0, n - 1))


def chance(draw, p: float) -> bool:
    """True with probability ``p``."""
    if isinstance(draw, Draw):
        return draw.rng.random() < p
    return draw(st.integers(0, 999)) < int(p * 1000)


def pick(draw, options: Iterable[Any]) -> Any:
    return draw(st.sampled_from(list(options)))


def draw_layout(draw, allow_list: bool = True, p_odd: float = 0.3) -> str:
    if not chance(draw, p_odd):
        return "c"
    odd = [x for x in LAYOUTS if x not in ("c", "bcast") and (allow_list or x != "list")]
    return pick(draw, odd)


def array_arg(
    draw,
    shape: tuple[int, ...],
    dtype: str,
    *,
    verdict: str = VALID,
    layout: str | None = None,
    bcast: tuple[int, ...] = (),
    mag: float = 1.0,
    allow_list: bool = True,
) -> Arg:
    """An array argument (see :func:`build`); ``layout`` is drawn unless given."""
    if layout is None:
        # Nested lists become float64 arrays: only a float64 argument can be one.
        small = 0 < int(np.prod(shape, dtype=np.int64)) <= 4096  # [] would lose the shape
        layout = draw_layout(draw, allow_list=allow_list and small and dtype == "float64")
    if bcast:
        layout = "bcast"
    seed = draw(st.integers(0, 2**16))
    value = build(shape, dtype, layout, seed, bcast=bcast, mag=mag)
    return Arg(value, build_code(shape, dtype, layout, seed, bcast, mag), verdict)


def junk_arg(draw) -> Arg:
    """Something that is not an array at all."""
    return pick(
        draw,
        [
            lit(None, INVALID),
            lit("abc", INVALID),
            lit({"a": 1}, INVALID),
            Arg(object(), "object()", INVALID),
            lit([[1.0, 2.0], [3.0]], INVALID),
        ],
    )


def float_option(
    draw, valid: Iterable[Any], *, odd: Iterable[Arg] = (), bad: Iterable[Any] = ()
) -> Arg:
    """A number option: mostly valid values, sometimes an odd or invalid one."""
    r = roll(draw, 10)
    odd, bad = list(odd), list(bad)
    if r == 0 and bad:
        return lit(pick(draw, bad), INVALID)
    if r == 1 and odd:
        return pick(draw, odd)
    return lit(pick(draw, valid))


def int_option(draw, valid: Iterable[int], name_bad: Iterable[Any] = (), none_ok=False) -> Arg:
    """An integer option: valid values, huge ints (LAX), bools (LAX: as the int), floats,
    strings and None (INVALID unless ``none_ok``)."""
    r = roll(draw, 20)
    if r == 0:
        return lit(pick(draw, HUGE_INTS), LAX)
    if r == 1:
        b = draw(st.booleans())
        return lit(b, LAX, int(b))
    if r == 2:
        bad = pick(draw, [2.0, 1.5, "2", None, *name_bad])
        return lit(None) if bad is None and none_ok else lit(bad, INVALID)
    v = pick(draw, valid)
    return lit(np.int64(v) if r == 3 else v)


# --------------------------------------------------------------------------
# Judging results against the references
# --------------------------------------------------------------------------


def tolerance(dtype: Any) -> float:
    """Relative tolerance of a result in ``dtype`` (float32 compute, rounded to ``dtype``)."""
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":
        return OUT_RTOL[np.dtype(dt)]
    if dt.itemsize == 2:
        return OUT_RTOL[np.dtype(np.float16)]
    return OUT_RTOL[np.dtype(np.float32)]


def result_dtype(arg: Arg) -> np.dtype:
    """The dtype a result takes for this input (lists are float64 arrays)."""
    return np.asarray(arg.value).dtype


def assert_close(got: Any, want: np.ndarray | None, dtype: Any, what: str = "output") -> None:
    """Type, dtype, shape and relative error against the reference (``want`` None: the
    reference could not be formed, e.g. a zero-size head dimension: shape-free checks only)."""
    assert isinstance(got, np.ndarray), f"{what}: got {type(got).__name__}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    if want is None:
        return
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    g = as_f64(got)
    bad = np.isnan(g) & ~np.isnan(want)
    assert not bad.any(), f"{what}: NaN where the reference has none"
    err = rel_err(np.where(np.isnan(want), 0, g), np.where(np.isnan(want), 0, want))
    assert err <= tolerance(dtype), f"{what}: relative error {err:.3g} > {tolerance(dtype):.0e}"


def assert_lse(got: Any, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, f"lse: {type(got)}"
    assert got.shape == want.shape, f"lse: shape {got.shape}, expected {want.shape}"
    g = got.astype(np.float64)
    assert not np.isnan(g).any(), "lse: NaN"
    same_inf = np.isinf(g) == np.isinf(want)
    assert same_inf.all(), f"lse: -inf at {np.argwhere(~same_inf)[:3].tolist()} differs"
    fin = ~np.isinf(want)
    diff = np.abs(g[fin] - want[fin])
    assert (diff <= 1e-4 * np.maximum(1, np.abs(want[fin]))).all(), f"lse off by {diff.max():.3g}"


def reference_or_none(fn, *args, **kwargs):
    """The reference, or None where it has no answer (a zero-size head dimension, say)."""
    try:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    except (ZeroDivisionError, ValueError, IndexError):
        return None
