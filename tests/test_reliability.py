"""Regression tests for bad inputs a hostile caller can pass.

Each test states the contract a user can rely on: a call either gives the right answer (checked
against the float64 reference) or raises ``ValueError`` / ``TypeError`` / ``MemoryError`` whose
message names the offending argument; it never aborts the interpreter, never raises
``RuntimeError`` (ferroattn's "internal error"), never returns a silently wrong answer, and a
cache call that fails leaves the cache as it was. Calls that could abort run in a subprocess
with a capped address space, so a failure is a red test, not a dead test run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from reference import reference_attention, reference_varlen, reference_weights, rel_err
from test_linear import reference_linear

import ferroattn

F32 = np.float32
ACCEPTED = (ValueError, TypeError, MemoryError)


def names(message: str, *args: str) -> bool:
    """Whether ``message`` names one of ``args`` as a word (``k`` in "k has ...", not "key")."""
    return any(re.search(rf"(?<![\w.]){re.escape(a)}(?!\w)", message) for a in args)


def assert_named_error(excinfo: pytest.ExceptionInfo, *args: str) -> None:
    """The exception is one users catch and its message names one of ``args``."""
    err = excinfo.value
    assert isinstance(err, ACCEPTED), f"{type(err).__name__}: {err}"
    assert names(str(err), *args), f"{type(err).__name__} does not name {args}: {err}"


def call_named(fn, *args: str):
    """Run ``fn``; return its result, or None after checking a raised error names ``args``.

    Anything other than ValueError/TypeError/MemoryError propagates and fails the test.
    """
    try:
        return fn()
    except ACCEPTED as err:
        assert names(str(err), *args), f"{type(err).__name__} does not name {args}: {err}"
        return None


def misaligned(x: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``x`` whose data starts one byte past an item boundary."""
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    out = raw[1:].view(x.dtype).reshape(x.shape)
    out[...] = x
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def qkv(rng, b=1, hq=2, hk=1, nq=16, nk=16, d=32, dv=None, dtype=F32):
    dv = d if dv is None else dv
    return (
        rng.standard_normal((b, hq, nq, d)).astype(dtype),
        rng.standard_normal((b, hk, nk, d)).astype(dtype),
        rng.standard_normal((b, hk, nk, dv)).astype(dtype),
    )


# The child caps its address space so that a huge allocation fails at once (instead of being
# overcommitted and then killed), whatever the machine's memory and overcommit policy.
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import numpy as np
import ferroattn
from ferroattn import *
def outcome():
{body}
try:
    r = outcome()
    print(json.dumps({{"ok": repr(getattr(r, "shape", r))}}))
except BaseException as e:
    print(json.dumps({{"type": type(e).__name__, "msg": str(e)[:500]}}))
"""


def run_isolated(body: str, *, limit_gib: int = 4, timeout: float = 60) -> dict:
    """Run ``body`` (the statements of a function returning the call's result) in a fresh
    interpreter with an address-space cap; return ``{"ok": shape}`` or ``{"type", "msg"}``."""
    code = _CHILD.format(limit=limit_gib << 30, body=textwrap.indent(textwrap.dedent(body), "    "))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"the interpreter died (exit {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_isolated_named(body: str, *args: str, allowed=("MemoryError", "ValueError")) -> None:
    res = run_isolated(body)
    assert "type" in res, f"expected an error naming {args}, got a result {res['ok']}"
    assert res["type"] in allowed, f"{res['type']}: {res['msg']}"
    assert names(res["msg"], *args), f"{res['type']} does not name {args}: {res['msg']}"


# --------------------------------------------------------------------------
# 1. A result too large to allocate is an exception, never an abort
# --------------------------------------------------------------------------

HUGE_CALLS = {
    # The (1, 1, 2^20, 2^20) float32 weights are 4 TiB: the binding allocated them unchecked.
    "weights": (
        "x = np.broadcast_to(np.ones((1, 1, 1, 8), np.float32), (1, 1, 2**20, 8))\n"
        "return attention_weights(x, x)",
        ("q", "k"),
    ),
    "weights_bshd_3d": (
        "x = np.broadcast_to(np.ones((1, 1, 8), np.float16), (2**19, 4, 8))\n"
        "return attention_weights(x, x, layout='bshd')",
        ("q", "k"),
    ),
    "attention_output": (
        "q = np.broadcast_to(np.ones((1, 1, 1, 8), np.float32), (1, 1, 2**40, 8))\n"
        "k = np.ones((1, 1, 4, 8), np.float32)\n"
        "return attention(q, k, k)",
        ("q",),
    ),
    "linear_attention": (
        "q = np.broadcast_to(np.ones((1, 1, 1, 8), np.float32), (1, 1, 2**40, 8))\n"
        "return linear_attention(q, q, q)",
        ("q", "k", "v"),
    ),
    "cache_capacity": ("return KVCache(1, 1, 8, capacity=2**40)", ("capacity",)),
    "cache_window": ("return KVCache(1, 1, 8, window=2**40)", ("window",)),
    "linear_state": ("return LinearAttentionState(2**31, 6, 4, value_dim=16)", ("batch",)),
    "cache_value_dim": ("return KVCache(1, 1, 1, capacity=4, value_dim=2**31)", ("value_dim",)),
    "rope": (
        "x = np.broadcast_to(np.ones((1, 1, 1, 8), np.float32), (1, 1, 2**40, 8))\n"
        "return rope(x, np.broadcast_to(np.zeros(1, np.int64), (2**40,)))",
        ("x", "positions"),
    ),
}


@pytest.mark.parametrize("case", list(HUGE_CALLS))
def test_huge_result_raises_named_error(case):
    body, args = HUGE_CALLS[case]
    assert_isolated_named(body, *args)


def test_huge_alibi_slope_count_is_refused_quickly():
    # 2^40 slopes are 4 TiB of float32: refuse before building a 2^40-element Python list.
    assert_isolated_named("return alibi_slopes(2**40)", "num_heads")


# --------------------------------------------------------------------------
# 2. Zero-size dimensions: an empty (or correct) result, or a ValueError naming the argument
# --------------------------------------------------------------------------

# (B, Hq, Hkv, Nq, Nk, D, Dv) with one of them zero; the argument a refusal must name.
ZERO_DIMS = {
    "batch": ((0, 2, 1, 4, 4, 8, 8), ("q", "k", "v")),
    "q_heads": ((1, 0, 1, 4, 4, 8, 8), ("q",)),
    "q_tokens": ((1, 2, 1, 0, 4, 8, 8), ("q",)),
    "k_tokens": ((1, 2, 1, 4, 0, 8, 8), ("k", "v")),
    "v_dim": ((1, 2, 1, 4, 4, 8, 0), ("v",)),
}


def _zero_inputs(dims):
    b, hq, hk, nq, nk, d, dv = dims
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((b, hq, nq, d)).astype(F32),
        rng.standard_normal((b, hk, nk, d)).astype(F32),
        rng.standard_normal((b, hk, nk, dv)).astype(F32),
    )


@pytest.mark.parametrize("dim", list(ZERO_DIMS))
@pytest.mark.parametrize("causal", [False, True])
def test_zero_size_attention(dim, causal):
    dims, args = ZERO_DIMS[dim]
    q, k, v = _zero_inputs(dims)
    res = call_named(lambda: ferroattn.attention(q, k, v, causal=causal, return_lse=True), *args)
    if res is not None:
        out, lse = res
        want, want_lse = reference_attention(q, k, v, causal=causal)
        assert out.shape == want.shape and lse.shape == want_lse.shape
        assert rel_err(out, want) <= 1e-5
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))


@pytest.mark.parametrize("dim", [d for d in ZERO_DIMS if d != "v_dim"])
def test_zero_size_weights(dim):
    dims, args = ZERO_DIMS[dim]
    q, k, _ = _zero_inputs(dims)
    w = call_named(lambda: ferroattn.attention_weights(q, k), *args)
    if w is not None:
        want = reference_weights(q, k)
        assert w.shape == want.shape
        assert rel_err(w, want) <= 1e-5


@pytest.mark.parametrize("dim", list(ZERO_DIMS))
def test_zero_size_linear_attention(dim):
    dims, args = ZERO_DIMS[dim]
    q, k, v = _zero_inputs(dims)
    out = call_named(lambda: ferroattn.linear_attention(q, k, v), *args)
    if out is not None:
        want = reference_linear(q, k, v)
        assert out.shape == want.shape
        assert rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("dim", ["q_heads", "q_tokens", "k_tokens", "v_dim"])
def test_zero_size_varlen(dim):
    dims, args = ZERO_DIMS[dim]
    q, k, v = (x[0].transpose(1, 0, 2) for x in _zero_inputs(dims))
    cq, ck = [0, q.shape[0]], [0, k.shape[0]]
    out = call_named(lambda: ferroattn.attention_varlen(q, k, v, cq, ck, causal=True), *args)
    if out is not None:
        want, _ = reference_varlen(q, k, v, cq, ck, causal=True)
        assert out.shape == want.shape
        assert rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("method", ["attend", "step"])
@pytest.mark.parametrize("window", [None, 4])
def test_zero_query_heads_in_cache(method, window):
    rng = np.random.default_rng(1)
    kw = {"window": window} if window else {"capacity": 16}
    cache = ferroattn.KVCache(1, 1, 8, **kw)
    _, k, v = qkv(rng, hk=1, nk=3, d=8)
    cache.append(k, v)
    before = cache.lengths.tolist()
    q0 = np.zeros((1, 0, 1, 8), F32)
    if method == "attend":
        res = call_named(lambda: cache.attend(q0), "q")
        assert cache.lengths.tolist() == before
    else:
        k1, v1 = k[:, :, :1], v[:, :, :1]
        res = call_named(lambda: cache.step(q0, k1, v1), "q")
        assert cache.lengths.tolist() == (before if res is None else [before[0] + 1])
    if res is not None:
        assert res.shape == (1, 0, 1, 8)


# --------------------------------------------------------------------------
# 3. Misaligned arrays are copied (as the README says), never refused
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, np.float16])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_misaligned_attention(rng, dtype, which):
    arrays = dict(zip("qkv", qkv(rng, dtype=dtype), strict=True))
    want, _ = reference_attention(*arrays.values(), causal=True)
    arrays[which] = misaligned(arrays[which])
    got = ferroattn.attention(*arrays.values(), causal=True)
    assert rel_err(got, want) <= (1e-5 if dtype == F32 else 2e-3)


def test_misaligned_attention_all_and_lse(rng):
    q, k, v = qkv(rng)
    want, want_lse = reference_attention(q, k, v, window=(3, 2))
    got, lse = ferroattn.attention(
        *(misaligned(x) for x in (q, k, v)), window=(3, 2), return_lse=True
    )
    assert rel_err(got, want) <= 1e-5
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_misaligned_bias(rng):
    q, k, v = qkv(rng, hq=1)
    bias = rng.standard_normal((16, 16)).astype(F32)
    got = ferroattn.attention(q, k, v, bias=misaligned(bias))
    want = ferroattn.attention(q, k, v, bias=bias)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("which", ["q", "k"])
def test_misaligned_weights(rng, which):
    q, k, _ = qkv(rng)
    want = reference_weights(q, k, causal=True)
    arrays = {"q": q, "k": k}
    arrays[which] = misaligned(arrays[which])
    got = ferroattn.attention_weights(arrays["q"], arrays["k"], causal=True)
    assert rel_err(got, want) <= 1e-5


def test_misaligned_varlen(rng):
    q, k, v = (x[0].transpose(1, 0, 2).copy() for x in qkv(rng))
    cu = [0, 5, 16]
    want, _ = reference_varlen(q, k, v, cu, cu, causal=True)
    got = ferroattn.attention_varlen(*(misaligned(x) for x in (q, k, v)), cu, cu, causal=True)
    assert rel_err(got, want) <= 1e-5


def test_misaligned_linear_attention(rng):
    q, k, v = qkv(rng)
    want = reference_linear(q, k, v, causal=True)
    got = ferroattn.linear_attention(*(misaligned(x) for x in (q, k, v)), causal=True)
    assert rel_err(got, want) <= 1e-5


def test_misaligned_linear_state(rng):
    q, k, v = qkv(rng, hk=2)
    want = reference_linear(q, k, v, causal=True)
    state = ferroattn.LinearAttentionState(1, 2, 32)
    got = state.step(*(misaligned(x) for x in (q, k, v)))
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("window", [None, 8])
def test_misaligned_cache(rng, dtype, window):
    q, k, v = qkv(rng, nq=6, nk=6, d=16)
    # A window cache attends at most max_rollback + 1 queries after append(): two here.
    kw = {"window": window, "max_rollback": 1} if window else {"capacity": 16}
    a = ferroattn.KVCache(1, 1, 16, dtype=dtype, **kw)
    b = ferroattn.KVCache(1, 1, 16, dtype=dtype, **kw)
    want = b.step(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    got = a.step(*(misaligned(x[:, :, :4]) for x in (q, k, v)))
    np.testing.assert_array_equal(got, want)
    b.append(k[:, :, 4:], v[:, :, 4:])
    a.append(misaligned(k[:, :, 4:]), misaligned(v[:, :, 4:]))
    np.testing.assert_array_equal(a.attend(misaligned(q[:, :, 4:])), b.attend(q[:, :, 4:]))


# --------------------------------------------------------------------------
# 4. A KVCache.step that fails leaves the cache as it was
# --------------------------------------------------------------------------


def _snapshot(cache):
    return (
        cache.lengths.tolist(),
        [cache.keys(b).copy() for b in range(cache.batch)],
        [cache.values(b).copy() for b in range(cache.batch)],
    )


def _assert_unchanged(cache, snap):
    lengths, keys, values = snap
    assert cache.lengths.tolist() == lengths, "a failed call changed lengths"
    for b in range(cache.batch):
        np.testing.assert_array_equal(cache.keys(b), keys[b], err_msg="keys changed")
        np.testing.assert_array_equal(cache.values(b), values[b], err_msg="values changed")


class _NotT5:
    table = np.zeros((8, 2), F32)


FAILING_STEPS = {
    "sinks_nan": ({"sinks": [float("nan"), 0.0]}, "sinks"),
    "sinks_length": ({"sinks": [0.0]}, "sinks"),
    "scale_not_a_number": ({"scale": "big"}, "scale"),
    "scale_nan": ({"scale": float("nan")}, "scale"),
    "softcap_zero": ({"softcap": 0.0}, "softcap"),
    "alibi_nan": ({"alibi_slopes": [float("nan"), 1.0]}, "alibi_slopes"),
    "alibi_length": ({"alibi_slopes": [1.0, 1.0, 1.0]}, "alibi_slopes"),
    "rel_bias_type": ({"rel_bias": _NotT5()}, "rel_bias"),
    "rel_bias_table": ({"rel_bias": ferroattn.T5Bias(np.zeros((8, 3), F32))}, "rel_bias"),
    "scale_nan_lengths": ({"scale": float("nan"), "lengths": [2, 1]}, "scale"),
    "softcap_neg_lengths": ({"softcap": -1.0, "lengths": [2, 1]}, "softcap"),
}


@pytest.mark.parametrize("case", list(FAILING_STEPS))
@pytest.mark.parametrize("kind", ["plain", "window", "int8"])
def test_failed_step_leaves_cache_unchanged(rng, case, kind):
    kwargs, arg = FAILING_STEPS[case]
    kw = {"window": 4, "max_rollback": 1} if kind == "window" else {"capacity": 16}
    cache = ferroattn.KVCache(2, 1, 8, dtype="int8" if kind == "int8" else "float32", **kw)
    q, k, v = qkv(rng, b=2, hq=2, hk=1, nq=3, nk=3, d=8)
    cache.append(k, v)
    snap = _snapshot(cache)
    with pytest.raises(ACCEPTED) as excinfo:
        cache.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], **kwargs)
    assert_named_error(excinfo, arg)
    _assert_unchanged(cache, snap)


@pytest.mark.parametrize("kind", ["plain", "window"])
def test_step_with_zero_heads_or_misaligned_q_is_all_or_nothing(rng, kind):
    kw = {"window": 4} if kind == "window" else {"capacity": 16}
    q, k, v = qkv(rng, b=1, hq=2, hk=1, nq=2, nk=2, d=8)
    for bad_q in (np.zeros((1, 0, 2, 8), F32), misaligned(q)):
        cache = ferroattn.KVCache(1, 1, 8, **kw)
        cache.append(k[:, :, :1], v[:, :, :1])
        snap = _snapshot(cache)
        res = call_named(lambda q=bad_q, c=cache: c.step(q, k, v), "q")
        if res is None:
            _assert_unchanged(cache, snap)
        else:
            assert cache.lengths.tolist() == [3]
            if bad_q.shape[1]:
                kk = np.concatenate([k[:, :, :1], k], axis=2)
                vv = np.concatenate([v[:, :, :1], v], axis=2)
                want, _ = reference_attention(q, kk, vv, causal=True)
                assert rel_err(res, want) <= 1e-5


# --------------------------------------------------------------------------
# 5. Window sides beyond any sequence are unbounded, never a silent wrong answer
# --------------------------------------------------------------------------

HUGE_WINDOWS = [
    ((None, 2**63), (None, None)),
    ((None, 2**64 - 1), (None, None)),
    ((2**63, None), (None, None)),
    ((2**64 - 1, 0), (None, 0)),
    ((None, 2**70), (None, None)),
    ((2**70, 2**70), (None, None)),
    (2**64 - 1, (None, 0)),
    (2**64, (None, 0)),
    (2**70, (None, 0)),
]


@pytest.mark.parametrize("window,meaning", HUGE_WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_huge_window_sides(rng, window, meaning, causal):
    q, k, v = qkv(rng, nq=5, nk=9, d=8)
    res = call_named(
        lambda: ferroattn.attention(q, k, v, window=window, causal=causal, return_lse=True),
        "window",
    )
    if res is not None:
        want, want_lse = reference_attention(q, k, v, window=meaning, causal=causal)
        assert rel_err(res[0], want) <= 1e-5
        np.testing.assert_allclose(res[1], want_lse, atol=1e-5)


@pytest.mark.parametrize("window,meaning", HUGE_WINDOWS[:4], ids=str)
def test_huge_window_sides_weights_and_varlen(rng, window, meaning):
    q, k, v = qkv(rng, nq=5, nk=9, d=8)
    w = call_named(lambda: ferroattn.attention_weights(q, k, window=window), "window")
    if w is not None:
        assert rel_err(w, reference_weights(q, k, window=meaning)) <= 1e-5
    qp, kp, vp = (x[0].transpose(1, 0, 2) for x in (q, k, v))
    cq, ck = [0, 2, 5], [0, 4, 9]
    out = call_named(
        lambda: ferroattn.attention_varlen(qp, kp, vp, cq, ck, window=window), "window"
    )
    if out is not None:
        want, _ = reference_varlen(qp, kp, vp, cq, ck, window=meaning)
        assert rel_err(out, want) <= 1e-5


# --------------------------------------------------------------------------
# 6. keys()/values() of a window cache after rollback show only stored tokens
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window,sinks,max_rollback,steps,back",
    [(3, 0, 0, 5, 1), (3, 1, 0, 6, 1), (3, 0, 1, 7, 2), (2, 0, 0, 4, 1), (4, 2, 2, 11, 3)],
)
def test_window_cache_reads_after_rollback(window, sinks, max_rollback, steps, back):
    cache = ferroattn.KVCache(1, 1, 2, window=window, sinks=sinks, max_rollback=max_rollback)
    for i in range(steps):
        t = np.full((1, 1, 1, 2), i, F32)
        cache.step(t, t, -t)
    cache.rollback(back)
    n = steps - back
    for read, sign in ((cache.keys, 1), (cache.values, -1)):
        got = (sign * read(0)[0, :, 0]).astype(int).tolist()
        head, tail = got[: min(sinks, n)], got[min(sinks, n) :]
        assert head == list(range(min(sinks, n))), got
        # The tail is the last tokens before `n`, at least the window - 1 the next query needs.
        assert tail == list(range(n - len(tail), n)), got
        assert len(tail) >= min(window - 1, n - len(head)), got
    # Attention after the rollback equals a cache that never saw the rolled-back tokens.
    fresh = ferroattn.KVCache(1, 1, 2, window=window, sinks=sinks, max_rollback=max_rollback)
    for i in range(n):
        t = np.full((1, 1, 1, 2), i, F32)
        fresh.step(t, t, -t)
    t = np.full((1, 1, 1, 2), 0.5, F32)
    np.testing.assert_allclose(cache.step(t, t, t), fresh.step(t, t, t), rtol=1e-6)


# --------------------------------------------------------------------------
# 7. Messages name the argument; shapes are checked before anything is converted
# --------------------------------------------------------------------------

BAD_CACHE_ARGS = [
    ({"window": 4, "sinks": 2.5}, "sinks"),
    ({"window": 4, "sinks": None}, "sinks"),
    ({"window": 4, "max_rollback": None}, "max_rollback"),
    ({"window": 4, "max_rollback": 1.5}, "max_rollback"),
    ({"window": 4.0}, "window"),
    ({"capacity": 2**62}, "capacity"),
    ({"capacity": 2**70}, "capacity"),
    ({"capacity": 8, "dtype": 5}, "dtype"),
    ({"capacity": 8, "dtype": "int4"}, "dtype"),
    ({"capacity": 8, "value_dim": 2**70}, "value_dim"),
]


@pytest.mark.parametrize("kwargs,arg", BAD_CACHE_ARGS, ids=str)
def test_cache_constructor_messages(kwargs, arg):
    with pytest.raises(ACCEPTED) as excinfo:
        ferroattn.KVCache(1, 1, 8, **kwargs)
    assert_named_error(excinfo, arg)


def test_cache_device_of_the_wrong_kind():
    with pytest.raises((TypeError, ValueError)) as excinfo:
        ferroattn.KVCache(1, 1, 8, capacity=8, device=7)
    assert_named_error(excinfo, "device")


SHAPE_BEFORE_CONVERSION = {
    # 2^30 float64 tokens would be converted to 32 GiB of float32 before the shape check.
    "attention": "attention(big, small, small)",
    "weights": "attention_weights(big, small)",
    "linear": "linear_attention(big, small, small)",
    "varlen": "attention_varlen(big[0].transpose(1, 0, 2), small[0], small[0], [0, 4], [0, 4])",
}


@pytest.mark.parametrize("call", list(SHAPE_BEFORE_CONVERSION))
def test_shapes_are_checked_before_conversion(call):
    body = (
        "big = np.broadcast_to(np.ones((1, 1, 1, 8)), (1, 1, 2**30, 8))\n"
        "small = np.ones((1, 1, 4, 9))\n"
        f"return {SHAPE_BEFORE_CONVERSION[call]}"
    )
    res = run_isolated(body, limit_gib=2)
    assert res.get("type") == "ValueError", res
    assert names(res["msg"], "q", "k", "v"), res["msg"]


# --------------------------------------------------------------------------
# Found by the bad-input fuzzer (tests/test_fuzz.py)
# --------------------------------------------------------------------------


def test_set_num_threads_huge_is_named_error(restore_threads):
    with pytest.raises(ACCEPTED) as excinfo:
        ferroattn.set_num_threads(2**70)
    assert_named_error(excinfo, "n")


def test_rel_bias_huge_max_distance_is_named_error(rng):
    q, k, v = qkv(rng, hq=2, nq=4, nk=4, d=8)
    bias = ferroattn.T5Bias(np.zeros((8, 2), F32), max_distance=2**70)
    res = call_named(lambda: ferroattn.attention(q, k, v, rel_bias=bias), "rel_bias")
    if res is not None:
        np.testing.assert_allclose(res, ferroattn.attention(q, k, v), rtol=1e-6)


def test_bias_beyond_float32_is_refused_or_exact(rng):
    # 1e300 is a finite float64; it becomes inf in float32 and every score NaN.
    q, k, v = qkv(rng, hq=1, nq=4, nk=4, d=8)
    res = call_named(lambda: ferroattn.attention(q, k, v, bias=np.full((4, 4), 1e300)), "bias")
    if res is not None:
        # Equal huge biases leave the softmax uniform (as computed in float64).
        want = np.broadcast_to(v.astype(np.float64).mean(axis=2, keepdims=True), res.shape)
        assert rel_err(res, want) <= 1e-5


def test_rope_positions_beyond_int64_are_refused(rng):
    x = rng.standard_normal((4, 8)).astype(F32)
    pos = np.full(4, 2**64 - 1, dtype=np.uint64)
    res = call_named(lambda: ferroattn.rope(x, pos), "positions")
    if res is not None:
        # Not position -1 (what a wrap to int64 gives).
        assert not np.allclose(res, ferroattn.rope(x, np.full(4, -1)))


@pytest.mark.parametrize(
    "fn,kwargs,arg",
    [
        ("local_global_layout", {"global_blocks": -1}, "global_blocks"),
        ("local_global_layout", {"window": -2}, "window"),
        ("strided_layout", {"local": -1}, "local"),
        ("bigbird_layout", {"random_blocks": -1}, "random_blocks"),
        ("bigbird_layout", {"seed": -1}, "seed"),
        ("bigbird_layout", {"seed": "x"}, "seed"),
    ],
    ids=str,
)
def test_layout_helpers_refuse_bad_counts(fn, kwargs, arg):
    with pytest.raises(ACCEPTED) as excinfo:
        getattr(ferroattn, fn)(6, **kwargs)
    assert_named_error(excinfo, arg)


def test_layout_helper_huge_block_count_is_named_error():
    assert_isolated_named("return local_global_layout(2**40)", "n_blocks")


def test_window_cache_two_rollbacks_never_read_evicted_tokens():
    # rollback(2) is refused (the window would need an evicted token), but rollback(1) twice
    # was accepted and the next step attended to the rolled-back token in the evicted slot.
    def decoded(rolls):
        cache = ferroattn.KVCache(1, 1, 2, window=3)
        for i in range(5):
            t = np.full((1, 1, 1, 2), i, F32)
            cache.step(t, t, t)
        for n in rolls:
            call_named(lambda n=n: cache.rollback(n), "n")
        return cache

    cache = decoded([1, 1])
    n = int(cache.lengths[0])
    fresh = ferroattn.KVCache(1, 1, 2, window=3)
    for i in range(n):
        t = np.full((1, 1, 1, 2), i, F32)
        fresh.step(t, t, t)
    t = np.full((1, 1, 1, 2), 0.5, F32)
    np.testing.assert_allclose(cache.step(t, t, t), fresh.step(t, t, t), rtol=1e-6)


def test_window_one_cache_rolls_back_what_it_never_needs():
    # With window=1 a query sees only itself: rolling back needs no stored token, yet
    # rollback(2) was refused ("the window would need evicted tokens").
    cache = ferroattn.KVCache(1, 1, 2, window=1)
    for i in range(4):
        t = np.full((1, 1, 1, 2), i, F32)
        cache.step(t, t, t)
    cache.rollback(2)
    assert cache.lengths.tolist() == [2]
    t = np.full((1, 1, 1, 2), 7.0, F32)
    np.testing.assert_array_equal(cache.step(t, t, t), t)


def test_rel_bias_table_beyond_float32_is_refused_or_exact(rng):
    q, k, v = qkv(rng, hq=2, nq=4, nk=4, d=8)
    bias = ferroattn.T5Bias(np.full((8, 2), 1e300))
    res = call_named(lambda: ferroattn.attention(q, k, v, rel_bias=bias), "rel_bias")
    if res is not None:
        assert not np.isnan(res).any()


def test_set_num_threads_takes_numpy_ints_and_refuses_absurd_counts(restore_threads):
    ferroattn.set_num_threads(np.int64(1))
    assert ferroattn.get_num_threads() == 1
    # 2^31 threads cannot be started; accepting the count made the next kernel call spawn
    # threads for ~20 s before it ran.
    with pytest.raises(ValueError) as excinfo:
        ferroattn.set_num_threads(2**31)
    assert_named_error(excinfo, "n")


@pytest.mark.parametrize("value", [None, 1])
def test_return_lse_of_another_type_is_named(rng, value):
    q, k, v = qkv(rng, hq=1, nq=3, nk=3, d=4)
    # With another option the call leaves the fast path, which ignored return_lse=None.
    res = call_named(lambda: ferroattn.attention(q, k, v, window=2, return_lse=value), "return_lse")
    if res is not None:
        want = ferroattn.attention(q, k, v, window=2, return_lse=bool(value))
        assert type(res) is type(want)


def test_window_cache_attend_after_rollback_never_reads_evicted_tokens():
    # The ring holds window + max_rollback = 3 slots. After 8 tokens and rollback(1), the slot
    # of position 4 holds the rolled-back token 7; attend() over the last 2 positions (within
    # max_rollback + 1) read it for position 5's window.
    def filled(n):
        cache = ferroattn.KVCache(1, 1, 1, window=2, max_rollback=1)
        for i in range(n):
            t = np.full((1, 1, 1, 1), i, F32)
            cache.step(t, t, t)
        return cache

    cache = filled(8)
    cache.rollback(1)
    q = np.ones((1, 1, 2, 1), F32)
    try:
        got = cache.attend(q)
    except ValueError:
        return  # refusing is honest: position 4 is gone
    np.testing.assert_allclose(got, filled(7).attend(q), rtol=1e-6)
