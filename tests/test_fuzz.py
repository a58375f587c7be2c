"""The bad-input fuzzer, bounded for CI: every public function, a fixed seed, ~2 s each.

Each target runs in a worker process (``fuzz_worker.py``), so an abort or a hang fails one
test with the call that caused it instead of ending the test run. A target passes when every
call it made was either right (the float64 reference) or refused with ValueError / TypeError /
MemoryError naming the offending argument (see ``fuzz_inputs.py`` for the exact contract).
The long profile is ``scripts/fuzz.py --minutes N``.
"""

from __future__ import annotations

import numpy as np
import pytest
from fuzz_inputs import INVALID, LAX, Arg, Case, build, judge, names
from fuzz_worker import all_targets, spawn

SEED = 20260509
EXAMPLES = 50


def _report(target: str, res) -> str:
    lines = [f"fuzz target {target!r} (seed {SEED}, {EXAMPLES} examples):"]
    if res.died:
        lines.append(f"the worker died: {res.died}; the call in flight:\n{res.in_flight}")
        lines.append(f"stderr tail:\n{res.stderr[-1500:]}")
    for f in res.findings:
        lines.append(f"- {f['finding']} in {f['function']} (x{f['count']}): {f['detail'][:300]}")
        lines.append(
            "  reproducer (PYTHONPATH=python:tests):\n    " + f["code"].replace("\n", "\n    ")
        )
    return "\n".join(lines)


@pytest.mark.parametrize("target", list(all_targets()))
def test_fuzz_target(target):
    res = spawn([target], examples=EXAMPLES, seed=SEED, call_timeout=5, timeout=120)
    assert res.died is None and not res.findings, _report(target, res)
    calls = sum(c["calls"] for c in res.counts.values())
    assert calls >= EXAMPLES, res.counts
    # The inputs reach the kernels, not only the argument checks.
    assert sum(c.get("ok", 0) for c in res.counts.values()) >= calls // 5, res.counts


# --------------------------------------------------------------------------
# The judge itself
# --------------------------------------------------------------------------


def test_names_matches_whole_words():
    assert names("k has dtype int32", "k")
    assert names("inputs must share one dtype, got q=float16, k=float32", "q")
    assert not names("key/value heads", "k")
    assert not names("k_scales: bad", "k")
    assert names("rel_bias.table must have shape", "rel_bias")


def _case(fn, verdict=None, check=None):
    args = {} if verdict is None else {"x": Arg(1, "1", verdict)}
    return Case("f", fn, "f()", args, check=check)


def _raise(err):
    def fn():
        raise err

    return fn


def test_judge_outcomes():
    assert judge(_case(lambda: 1)).finding is None
    assert judge(_case(_raise(RuntimeError("internal")))).finding == "other_exception"
    assert judge(_case(_raise(OverflowError("big")), LAX)).finding == "other_exception"
    assert judge(_case(_raise(ValueError("x must be ...")), INVALID)).finding is None
    assert judge(_case(_raise(ValueError("no name")), INVALID)).finding == "unnamed_error"
    assert judge(_case(_raise(ValueError("x bad")))).finding == "rejected_valid"
    assert judge(_case(lambda: 1, INVALID)).finding == "accepted_invalid"

    def wrong(_):
        raise AssertionError("off")

    assert judge(_case(lambda: 1, check=wrong)).finding == "wrong_result"


@pytest.mark.parametrize("layout", ["c", "f", "neg", "step", "rows", "misaligned", "readonly"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", ">f4", "float64"])
def test_build_keeps_the_values(layout, dtype):
    want = build((2, 3, 4), dtype, "c", seed=3)
    got = build((2, 3, 4), dtype, layout, seed=3)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))
    if layout == "misaligned" and want.dtype.itemsize > 1:
        assert not got.flags.aligned
    if layout in ("neg", "step", "rows", "f"):
        assert not got.flags.c_contiguous


def test_build_broadcasts_without_memory():
    x = build((2, 2**40, 8), "float32", "c", seed=1, bcast=(1,))
    assert x.shape == (2, 2**40, 8) and x.strides[1] == 0
