"""KVCache: decoding through the cache equals attention over the whole sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import BF16, reference_attention, rel_err

import ferroattn

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

F32 = np.float32


def _qkv(rng, b=2, hq=4, hk=2, n=29, d=16, dv=None):
    dv = d if dv is None else dv
    q = rng.standard_normal((b, hq, n, d), dtype=F32)
    k = rng.standard_normal((b, hk, n, d), dtype=F32)
    v = rng.standard_normal((b, hk, n, dv), dtype=F32)
    return q, k, v


def _decode(cache, q, k, v, chunk):
    n = q.shape[2]
    outs = [
        cache.step(q[:, :, i : i + chunk], k[:, :, i : i + chunk], v[:, :, i : i + chunk])
        for i in range(0, n, chunk)
    ]
    return np.concatenate(outs, axis=2)


def _reference_sinks(q, k, v, window, sinks, scale=None):
    """float64 causal sliding-window attention where the first ``sinks`` keys stay visible."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, hq, n, d = q.shape
    group = hq // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for b in range(b_):
        for h in range(hq):
            for i in range(n):
                js = [j for j in range(i + 1) if j > i - window or j < sinks]
                s = np.array([q[b, h, i] @ k[b, h // group, j] for j in js]) * scale
                p = np.exp(s - s.max())
                out[b, h, i] = (p / p.sum()) @ v[b, h // group][js]
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 29])
@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 3), (4, 1)])
def test_decoding_equals_one_causal_forward(rng, chunk, hq, hk):
    q, k, v = _qkv(rng, hq=hq, hk=hk, dv=24)
    cache = ferroattn.KVCache(2, hk, 16, 40, value_dim=24)
    got = _decode(cache, q, k, v, chunk)
    want, _ = reference_attention(q, k, v, causal=True)
    assert rel_err(got, want) <= 1e-5
    assert cache.lengths.tolist() == [29, 29]


def test_append_then_attend_and_options(rng):
    q, k, v = _qkv(rng)
    cache = ferroattn.KVCache(2, 2, 16, 64)
    cache.append(k[:, :, :20], v[:, :, :20])
    got = cache.attend(q[:, :, 12:20], scale=0.3, softcap=2.0)
    want, _ = reference_attention(
        q[:, :, :20], k[:, :, :20], v[:, :, :20], causal=True, scale=0.3, softcap=2.0
    )
    assert rel_err(got, want[:, :, 12:20]) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 29])
@pytest.mark.parametrize("window,sinks", [(5, 0), (8, 0), (8, 3), (1, 0), (4, 2), (40, 2)])
def test_window_ring_buffer_equals_sliding_window(rng, chunk, window, sinks):
    q, k, v = _qkv(rng)
    cache = ferroattn.KVCache(2, 2, 16, window=window, sinks=sinks)
    got = _decode(cache, q, k, v, chunk)
    want = _reference_sinks(q, k, v, window, sinks)
    assert rel_err(got, want) <= 1e-5
    # Memory stays O(window): the same cache for a much longer history is no bigger.
    assert cache.nbytes == 2 * 2 * 2 * (sinks + window) * 16 * 4


def test_window_without_sinks_matches_attention_window(rng):
    q, k, v = _qkv(rng, n=40)
    cache = ferroattn.KVCache(2, 2, 16, window=7)
    got = _decode(cache, q, k, v, 1)
    want, _ = reference_attention(q, k, v, causal=True, window=7)
    assert rel_err(got, want) <= 1e-5


def test_ragged_batch_matches_separate_sequences(rng):
    q, k, v = _qkv(rng, b=3, n=12)
    cache = ferroattn.KVCache(3, 2, 16, 32)
    lens = np.array([12, 5, 0])
    cache.append(k, v, lengths=lens)
    assert cache.lengths.tolist() == [12, 5, 0]
    # One more token each, then queries for it.
    q1, k1, v1 = _qkv(rng, b=3, n=1)
    got = cache.step(q1, k1, v1)
    for b in range(3):
        n = lens[b]
        kb = np.concatenate([k[b : b + 1, :, :n], k1[b : b + 1]], axis=2)
        vb = np.concatenate([v[b : b + 1, :, :n], v1[b : b + 1]], axis=2)
        want, _ = reference_attention(q1[b : b + 1], kb, vb, causal=True)
        assert rel_err(got[b : b + 1], want) <= 1e-5


def test_ragged_step_zero_fills_padding_queries(rng):
    q, k, v = _qkv(rng, b=2, n=4)
    cache = ferroattn.KVCache(2, 2, 16, 8)
    got = cache.step(q, k, v, lengths=[4, 2])
    assert np.all(got[1, :, 2:] == 0)
    want, _ = reference_attention(q[1:, :, :2], k[1:, :, :2], v[1:, :, :2], causal=True)
    assert rel_err(got[1:, :, :2], want) <= 1e-5


def test_reset_reuses_a_slot(rng):
    q, k, v = _qkv(rng, n=6)
    cache = ferroattn.KVCache(2, 2, 16, 8)
    cache.append(k, v)
    cache.reset(1)
    assert cache.lengths.tolist() == [6, 0]
    got = cache.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], lengths=[0, 2])
    want, _ = reference_attention(q[1:, :, :2], k[1:, :, :2], v[1:, :, :2], causal=True)
    assert rel_err(got[1:, :, :2], want) <= 1e-5
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


@pytest.mark.parametrize("window", [None, 6])
def test_rollback_then_reappend_equals_never_appended(rng, window):
    q, k, v = _qkv(rng, n=12)
    kw = {"window": window, "max_rollback": 3} if window else {"capacity": 16}
    a = ferroattn.KVCache(2, 2, 16, **kw)
    b = ferroattn.KVCache(2, 2, 16, **kw)
    _decode(a, q[:, :, :8], k[:, :, :8], v[:, :, :8], 1)
    _decode(b, q[:, :, :8], k[:, :, :8], v[:, :, :8], 1)
    # Draft three tokens of garbage into `a`, then reject them.
    junk = rng.standard_normal((2, 2, 3, 16), dtype=F32) * 10
    a.step(q[:, :, :3], junk, junk)
    a.rollback(3)
    assert a.lengths.tolist() == b.lengths.tolist()
    got = _decode(a, q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], 1)
    want = _decode(b, q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], 1)
    assert rel_err(got, want) <= 1e-6


def test_window_rollback_beyond_slack_is_refused(rng):
    _, k, v = _qkv(rng, n=12)
    cache = ferroattn.KVCache(2, 2, 16, window=4, max_rollback=1)
    cache.append(k, v)
    with pytest.raises(ValueError, match="max_rollback"):
        cache.rollback(5)
    assert cache.lengths.tolist() == [12, 12]
    cache.rollback(2)
    assert cache.lengths.tolist() == [10, 10]


@pytest.mark.parametrize("dtype,tol", [("float16", 3e-3), ("bfloat16", 2e-2), ("int8", 4e-2)])
def test_low_precision_caches_stay_close_to_float32(rng, dtype, tol):
    q, k, v = _qkv(rng, n=33, d=64)
    exact = ferroattn.KVCache(2, 2, 64, 40)
    low = ferroattn.KVCache(2, 2, 64, 40, dtype=dtype)
    assert low.dtype == dtype
    want = _decode(exact, q, k, v, 4)
    got = _decode(low, q, k, v, 4)
    assert got.dtype == np.float32
    assert rel_err(got, want) <= tol


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_low_precision_kernel_is_exact_on_what_is_stored(rng, dtype):
    # What the cache stores (dequantized) through the float64 reference must match the
    # kernel's result to float32 accuracy: conversion in the kernel adds no error.
    q, k, v = _qkv(rng, b=1, n=21, d=40)
    cache = ferroattn.KVCache(1, 2, 40, 32, dtype=dtype)
    cache.append(k, v)
    got = cache.attend(q)
    ks, vs = cache.keys(0)[None], cache.values(0)[None]
    assert ks.shape == (1, 2, 21, 40)
    want, _ = reference_attention(q, ks.astype(np.float64), vs.astype(np.float64), causal=True)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize(
    "group,t", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (8, 1), (3, 2), (4, 2)]
)
@pytest.mark.parametrize("d,n", [(1, 7), (3, 130), (20, 261), (33, 300), (64, 130), (128, 515)])
def test_decode_rows_match_reference_on_what_is_stored(rng, dtype, group, t, d, n):
    # The decode kernel's shapes: 1 to 8 query rows per KV head, key tiles that end inside a
    # group of four keys, head dims off every vector width; with t = 2 the last tile is
    # partly hidden from the first query, so both decode tile paths meet in one call.
    q = rng.standard_normal((1, 2 * group, t, d), dtype=F32)
    k = rng.standard_normal((1, 2, n, d), dtype=F32)
    v = rng.standard_normal((1, 2, n, d), dtype=F32)
    cache = ferroattn.KVCache(1, 2, d, n, dtype=dtype)
    cache.append(k, v)
    ks, vs = cache.keys(0)[None].astype(np.float64), cache.values(0)[None].astype(np.float64)
    # On AVX-512 CPUs with VNNI, int8 keys meet queries rounded to 16 bits (measured: ~3e-5),
    # two orders of magnitude below the int8 rounding of the cache itself.
    tol = 1e-4 if dtype == "int8" else 1e-5
    for softcap in (None, 3.0):
        got = cache.attend(q, softcap=softcap)
        want, _ = reference_attention(q, ks, vs, causal=True, softcap=softcap)
        assert rel_err(got, want) <= tol, (softcap, rel_err(got, want))


@pytest.mark.parametrize("n", [2047, 2052, 5001])
@pytest.mark.parametrize("d,dv", [(64, 32), (32, 96), (128, 288), (20, 64)])
def test_int8_one_row_over_long_keys(rng, n, d, dv):
    # One query row per KV head over an int8 cache reads K and V in runs of 2048 keys, each
    # value row whole, 256 columns at a time: runs that end inside the keys, a short last run
    # with an odd last key, value widths of one, three and nine 32-column strips, and a key
    # width the integer dot products do not take (20).
    q = rng.standard_normal((1, 2, 1, d), dtype=F32)
    k = rng.standard_normal((1, 2, n, d), dtype=F32)
    v = rng.standard_normal((1, 2, n, dv), dtype=F32)
    cache = ferroattn.KVCache(1, 2, d, n, dtype="int8", value_dim=dv)
    cache.append(k, v)
    ks, vs = cache.keys(0)[None].astype(np.float64), cache.values(0)[None].astype(np.float64)
    for softcap in (None, 3.0):
        got = cache.attend(q, softcap=softcap)
        want, _ = reference_attention(q, ks, vs, causal=True, softcap=softcap)
        # As in the test above: queries and probabilities rounded to 16 bits on VNNI CPUs.
        assert rel_err(got, want) <= 1e-4, (softcap, rel_err(got, want))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("d,dv", [(20, 32), (33, 64), (7, 128)])
def test_decode_rows_with_key_dims_off_the_vector_width(rng, dtype, group, d, dv):
    # Value rows a whole number of vector pairs wide take the decode kernel, whose key dot
    # products then end in a tail of columns past the last full vector.
    q, k, v = (
        rng.standard_normal(shape, dtype=F32).astype(dtype)
        for shape in ((1, 2 * group, 1, d), (1, 2, 300, d), (1, 2, 300, dv))
    )
    got = ferroattn.attention(q, k, v)
    want, _ = reference_attention(*(x.astype(np.float64) for x in (q, k, v)))
    assert rel_err(got.astype(np.float64), want) <= (1e-5 if dtype == np.float32 else 4e-3)


def test_int8_quantization_is_per_token_and_head(rng):
    _, k, v = _qkv(rng, b=1, n=5)
    k[0, 1, 3] *= 1000  # one loud token must not coarsen the others
    cache = ferroattn.KVCache(1, 2, 16, 8, dtype="int8")
    cache.append(k, v)
    back = cache.keys(0)
    err = np.abs(back - k[0]) / np.abs(k[0]).max(axis=-1, keepdims=True)
    assert err.max() <= 0.5 / 127 + 1e-6
    assert cache.nbytes == 2 * (1 * 2 * 8 * 16) + 2 * (1 * 2 * 8 * 4)


def _plain_int8(x):
    """Per row: scale = max |x| / 127, values rounded half to even, clipped to ±127."""
    x = np.asarray(x, dtype=F32)
    scale = (np.abs(x).max(axis=-1) / F32(127)).astype(F32)
    safe = np.where(scale > 0, scale, F32(1))
    return np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8), scale


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("in_dtype", [F32, np.float16])
def test_int8_storage_is_plain_rounding(rng, general, in_dtype):
    _, k, v = _qkv(rng, b=2, n=7, d=40)
    k[0, 0, 0] = 0.0  # a row of zeros: scale 0, values 0
    k[1, 1, 2] = 0.0
    k[1, 1, 2, :8] = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]  # scale 1: exact ties
    k, v = k.astype(in_dtype), v.astype(in_dtype)
    cache = ferroattn.KVCache(2, 2, 40, 8, dtype="int8")
    cache.append(k, v, lengths=[7, 7] if general else None)
    for stored, scales, x in ((cache._k, cache._ks, k), (cache._v, cache._vs, v)):
        want_q, want_s = _plain_int8(x)
        np.testing.assert_array_equal(stored[:, :, :7], want_q)
        np.testing.assert_array_equal(scales[:, :, :7], want_s)
    assert cache._k[1, 1, 2, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("q_dtype", [F32, np.float16])
def test_plain_decode_path_equals_general_path(rng, dtype, q_dtype):
    # Calls without lengths or score terms take a short path; passing lengths sends the
    # same call through the general one. Both must store and return the same bits.
    q, k, v = _qkv(rng, b=2, hq=4, hk=2, n=9, dv=24)
    q = q.astype(q_dtype)
    plain, general = (ferroattn.KVCache(2, 2, 16, 12, value_dim=24, dtype=dtype) for _ in "ab")

    def not_here(*args, **kwargs):
        pytest.fail("the plain path fell back to the general one")

    # Only the general path checks its inputs this way or runs through `_run`.
    plain._run = plain._check_kv = plain._check_q = not_here
    plain.append(k[:, :, :5], v[:, :, :5])
    general.append(k[:, :, :5], v[:, :, :5], lengths=[5, 5])
    for c in (plain, general):
        c.rollback(2, seq=1)  # ragged: 5 and 3 tokens
    options = ({}, {"scale": 0.3}, {"softcap": 2.0}, {"scale": np.float32(0.25)})
    for i, opts in zip(range(5, 9), options, strict=True):
        t = slice(i, i + 1)
        got = plain.step(q[:, :, t], k[:, :, t], v[:, :, t], **opts)
        want = general.step(q[:, :, t], k[:, :, t], v[:, :, t], lengths=[1, 1], **opts)
        assert got.dtype == want.dtype == q_dtype
        np.testing.assert_array_equal(got, want)
    assert plain.lengths.tolist() == general.lengths.tolist() == [9, 7]
    np.testing.assert_array_equal(
        plain.attend(q[:, :, :3]), general.attend(q[:, :, :3], lengths=[3, 3])
    )
    for name in ("_k", "_v") + (("_ks", "_vs") if dtype == "int8" else ()):
        np.testing.assert_array_equal(getattr(plain, name), getattr(general, name))


def test_plain_path_leaves_other_inputs_to_the_general_one(rng):
    q, k, v = _qkv(rng, b=1, n=6, d=32)
    cache = ferroattn.KVCache(1, 2, 32, 8)
    cache.append(k, v)
    want = cache.attend(q[:, :, :2])
    # float64 (computed in float32), a strided last axis, and a list: all converted first.
    np.testing.assert_array_equal(cache.attend(q[:, :, :2].astype(np.float64)), want)
    wide = np.zeros((1, 4, 2, 64), F32)
    wide[..., ::2] = q[:, :, :2]
    np.testing.assert_array_equal(cache.attend(wide[..., ::2]), want)
    np.testing.assert_array_equal(cache.attend(q[:, :, :2].tolist()), want)
    with pytest.raises(TypeError, match="share one dtype"):
        cache.append(k[:, :, :1], v[:, :, :1].astype(np.float16))
    with pytest.raises(TypeError, match="scale"):
        cache.attend(q[:, :, :1], scale="big")
    with pytest.raises(ValueError, match="softcap"):
        cache.attend(q[:, :, :1], softcap=-1.0)
    assert cache.lengths.tolist() == [6]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("window", [None, 6])
def test_out_receives_the_result(rng, dtype, window):
    q, k, v = _qkv(rng, n=9, dv=24)
    a, b = (ferroattn.KVCache(2, 2, 16, 12, value_dim=24, dtype=dtype, window=window) for _ in "ab")
    for c in (a, b):
        c.append(k[:, :, :5], v[:, :, :5])
    # One token (the short path), then a chunk with ragged lengths (the general path), whose
    # rows past a sequence's length must come back as zeros, not as what out held.
    for t, opts in ((slice(5, 6), {}), (slice(6, 8), {"lengths": [2, 1]})):
        out = np.full((2, 4, t.stop - t.start, 24), np.nan, F32)
        got = a.step(q[:, :, t], k[:, :, t], v[:, :, t], out=out, **opts)
        assert got is out
        np.testing.assert_array_equal(got, b.step(q[:, :, t], k[:, :, t], v[:, :, t], **opts))
    out = np.full((2, 4, 1, 24), np.nan, F32)
    assert a.attend(q[:, :, 8:9], out=out) is out
    np.testing.assert_array_equal(out, b.attend(q[:, :, 8:9]))


def test_out_keeps_the_plain_path(rng):
    q, k, v = _qkv(rng, n=4)
    cache, ref = ferroattn.KVCache(2, 2, 16, 8), ferroattn.KVCache(2, 2, 16, 8)

    def not_here(*args, **kwargs):
        pytest.fail("a plain call with out= fell back to the general path")

    cache._run = cache._check_kv = cache._check_q = not_here
    for i in range(4):
        t = slice(i, i + 1)
        out = np.empty((2, 4, 1, 16), F32)
        assert cache.step(q[:, :, t], k[:, :, t], v[:, :, t], out=out) is out
        np.testing.assert_array_equal(out, ref.step(q[:, :, t], k[:, :, t], v[:, :, t]))


def _read_only(shape):
    a = np.zeros(shape, F32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize(
    "bad,err,match",
    [
        (lambda q: np.zeros(q.shape, np.float64), TypeError, "dtype float64"),
        (lambda q: np.zeros((2, 4, 2, 16), F32), ValueError, "shape"),
        (lambda q: q.tolist(), TypeError, "NumPy array"),
        (lambda q: _read_only(q.shape), ValueError, "read-only"),
        (lambda q: q, ValueError, "share memory with q"),
    ],
    ids=["dtype", "shape", "list", "read_only", "is_q"],
)
@pytest.mark.parametrize("window", [None, 6])
def test_bad_out_raises_before_anything_is_stored(rng, bad, err, match, window):
    q, k, v = _qkv(rng, n=3)
    cache = ferroattn.KVCache(2, 2, 16, 8, window=window)
    cache.append(k[:, :, :2], v[:, :, :2])
    storage = (cache._k.copy(), cache._v.copy())
    q1 = q[:, :, 2:3].copy()
    with pytest.raises(err, match=match):
        cache.step(q1, k[:, :, 2:3], v[:, :, 2:3], out=bad(q1))
    with pytest.raises(err, match=match):
        cache.attend(q1, out=bad(q1))
    assert cache.lengths.tolist() == [2, 2]
    np.testing.assert_array_equal(cache._k, storage[0])
    np.testing.assert_array_equal(cache._v, storage[1])
    np.testing.assert_array_equal(q1, q[:, :, 2:3])  # the failed calls wrote nothing


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_out_over_the_cache_storage_is_refused(rng, dtype):
    q, k, v = _qkv(rng, b=1, n=2)
    cache = ferroattn.KVCache(1, 2, 16, 32, dtype=dtype)
    cache.append(k[:, :, :1], v[:, :, :1])
    # 64 floats of the cache's own arrays, seen in the result's shape (1, 4, 1, 16).
    views = [cache._k[0, 0, :4]] if dtype == "float32" else [cache._ks, cache._vs]
    for view in views:
        saved = [a.copy() for a in cache._storage()]
        out = view.reshape(1, 4, 1, 16)
        assert np.shares_memory(out, view)
        with pytest.raises(ValueError, match="share memory with the cache"):
            cache.step(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], out=out)
        with pytest.raises(ValueError, match="share memory with the cache"):
            cache.attend(q[:, :, :1], out=out)
        for a, b in zip(cache._storage(), saved, strict=True):
            np.testing.assert_array_equal(a, b)
        assert cache.lengths.tolist() == [1]


def test_keys_values_views_and_nbytes(rng):
    _, k, v = _qkv(rng, n=5, dv=8)
    cache = ferroattn.KVCache(2, 2, 16, 10, value_dim=8)
    cache.append(k, v)
    np.testing.assert_array_equal(cache.keys(1), k[1])
    np.testing.assert_array_equal(cache.values(0), v[0])
    assert np.shares_memory(cache.keys(0), cache._k)
    assert cache.nbytes == 2 * 2 * 10 * (16 + 8) * 4


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("capacity", [3, 4096])
def test_storage_starts_on_a_page_or_huge_page(dtype, capacity):
    # NumPy's own arrays start 16 bytes past a page: every row load would span two lines.
    cache = ferroattn.KVCache(1, 2, 128, capacity, dtype=dtype, value_dim=96)
    arrays = [cache._k, cache._v] + ([cache._ks, cache._vs] if dtype == "int8" else [])
    for a in arrays:
        align = 2 << 20 if a.nbytes >= 4 << 20 else 4096
        assert a.ctypes.data % align == 0, (a.shape, a.dtype, a.ctypes.data % align)
        assert a.flags.c_contiguous and a.flags.writeable and not a.any()
    assert cache.nbytes == sum(a.nbytes for a in arrays)


def test_bfloat16_queries_keep_their_dtype(rng):
    q, k, v = _qkv(rng, b=1, n=6)
    cache = ferroattn.KVCache(1, 2, 16, 8, dtype="bfloat16")
    got = cache.step(q.astype(BF16), k.astype(BF16), v.astype(BF16))
    assert got.dtype == BF16


# ----------------------------------------------------------------- errors


def test_overflow_raises_and_leaves_cache_unchanged(rng):
    _, k, v = _qkv(rng, n=6)
    cache = ferroattn.KVCache(2, 2, 16, 8)
    cache.append(k, v)
    before = (cache.keys(0).copy(), cache.lengths)
    with pytest.raises(ValueError, match="capacity"):
        cache.append(k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="capacity"):
        cache.step(np.zeros((2, 4, 3, 16), F32), k[:, :, :3], v[:, :, :3])
    np.testing.assert_array_equal(cache.keys(0), before[0])
    assert cache.lengths.tolist() == before[1].tolist()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda c, k, v: c.append(k[:, :1], v), "k must have shape"),
        (lambda c, k, v: c.append(k, v[..., :3]), "v must have shape"),
        (lambda c, k, v: c.append(k, v[:, :, :2]), "different numbers of tokens"),
        (lambda c, k, v: c.append(k, v, lengths=[1]), "lengths"),
        (lambda c, k, v: c.append(k, v, lengths=[1, 9]), "lengths"),
        (lambda c, k, v: c.attend(np.zeros((2, 3, 1, 16), F32)), "q must have shape"),
        (lambda c, k, v: c.rollback(1), "roll back"),
        (lambda c, k, v: c.rollback(-1), "non-negative"),
        (lambda c, k, v: c.reset(5), "seq"),
        (lambda c, k, v: c.keys(2), "seq"),
        (lambda c, k, v: c.step(np.zeros((2, 4, 2, 16), F32), k, v), "different numbers"),
    ],
)
def test_errors_leave_cache_untouched(rng, call, match):
    _, k, v = _qkv(rng, n=3)
    cache = ferroattn.KVCache(2, 2, 16, 8)
    with pytest.raises(ValueError, match=match):
        call(cache, k, v)
    assert cache.lengths.tolist() == [0, 0]


def test_constructor_errors():
    with pytest.raises(ValueError, match="capacity"):
        ferroattn.KVCache(1, 1, 8)
    with pytest.raises(ValueError, match="window"):
        ferroattn.KVCache(1, 1, 8, window=0)
    with pytest.raises(ValueError, match="sinks"):
        ferroattn.KVCache(1, 1, 8, 4, sinks=2)
    with pytest.raises(TypeError, match="dtype"):
        ferroattn.KVCache(1, 1, 8, 4, dtype="int16")
    with pytest.raises(ValueError, match="head_dim"):
        ferroattn.KVCache(1, 1, 0, 4)


def test_window_attend_refuses_chunks_longer_than_the_ring(rng):
    q, k, v = _qkv(rng, n=9)
    cache = ferroattn.KVCache(2, 2, 16, window=4)
    cache.append(k, v)
    with pytest.raises(ValueError, match="step"):
        cache.attend(q[:, :, :3])


@given(
    n=st.integers(1, 40),
    chunk=st.integers(1, 9),
    window=st.one_of(st.none(), st.integers(1, 12)),
    sinks=st.integers(0, 3),
    group=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_property_cache_matches_reference(n, chunk, window, sinks, group, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b=1, hq=2 * group, hk=2, n=n, d=8)
    if window is None:
        cache = ferroattn.KVCache(1, 2, 8, n)
        want, _ = reference_attention(q, k, v, causal=True)
    else:
        cache = ferroattn.KVCache(1, 2, 8, window=window, sinks=sinks)
        want = _reference_sinks(q, k, v, window, sinks)
    got = _decode(cache, q, k, v, chunk)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("window", [None, 6])
def test_score_terms_through_the_cache_equal_attention(rng, window):
    q, k, v = _qkv(rng, b=1, hq=4, hk=2, n=19)
    terms = {
        "alibi_slopes": ferroattn.alibi_slopes(4),
        "sinks": np.array([0.5, -1.0, 2.0, 0.0], F32),
        "rel_bias": ferroattn.T5Bias(
            rng.standard_normal((16, 4)).astype(F32), bidirectional=False, max_distance=40
        ),
    }
    want = ferroattn.attention(q, k, v, causal=True, window=window, **terms)
    if window is None:
        cache = ferroattn.KVCache(1, 2, 16, 32)
    else:
        cache = ferroattn.KVCache(1, 2, 16, window=window)
    n = q.shape[2]
    got = np.concatenate(
        [
            cache.step(q[:, :, i : i + 4], k[:, :, i : i + 4], v[:, :, i : i + 4], **terms)
            for i in range(0, n, 4)
        ],
        axis=2,
    )
    assert rel_err(got, want) <= 1e-5


def test_positional_terms_refused_with_window_sinks(rng):
    q, k, v = _qkv(rng, b=1, n=3)
    cache = ferroattn.KVCache(1, 2, 16, window=4, sinks=1)
    with pytest.raises(ValueError, match="contiguous positions"):
        cache.step(q, k, v, alibi_slopes=ferroattn.alibi_slopes(4))
