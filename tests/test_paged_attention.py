"""ferroattn.paged_attention, paged_attention_varlen and paged_write against attention over the
gathered keys and values (and the float64 reference), for every cache dtype and block size."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    BF16,
    F16,
    F32,
    assert_lse_close,
    assert_out_close,
    reference_attention,
)

import ferroattn
from ferroattn._cache_storage import quantize_rows

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

I8 = np.dtype(np.int8)


class Paged:
    """A paged cache holding given per-sequence keys and values, with its table and the
    dequantized (or as stored) gather of every sequence, padded, for the oracle."""

    def __init__(
        self,
        rng,
        lens,
        *,
        bs,
        hkv=2,
        d=16,
        dv=None,
        dtype=F32,
        extra_blocks=3,
        share=False,
        kv_layout="nhd",
    ):
        dv = d if dv is None else dv
        self.kv_layout = kv_layout
        self.lens, self.bs, self.dtype = list(lens), bs, np.dtype(dtype)
        need = [-(-n // bs) for n in lens]
        per_row = max(need + [1]) + 1
        nb = sum(need) + extra_blocks
        ids = rng.permutation(nb)
        self.table = np.full((len(lens), per_row), -1, np.int32)
        at = 0
        for b, n in enumerate(need):
            self.table[b, :n] = ids[at : at + n]
            at += n
        if share and len(lens) > 1 and need[0] > 1 and need[1] > 1:
            # Sequence 1 shares sequence 0's first block (a common prefix).
            self.table[1, 0] = self.table[0, 0]
        shape_k, shape_v = (nb, bs, hkv, d), (nb, bs, hkv, dv)
        k = rng.standard_normal(shape_k).astype(np.float32)
        v = rng.standard_normal(shape_v).astype(np.float32)
        self.k_scale = self.v_scale = None
        if self.dtype == I8:
            self.k, self.k_scale = quantize_rows(k)
            self.v, self.v_scale = quantize_rows(v)
            kf = self.k.astype(np.float32) * self.k_scale[..., None]
            vf = self.v.astype(np.float32) * self.v_scale[..., None]
        else:
            self.k, self.v = k.astype(self.dtype), v.astype(self.dtype)
            kf, vf = self.k.astype(np.float32), self.v.astype(np.float32)
        self.kf, self.vf = kf, vf
        if kv_layout == "hnd":  # the same blocks, head-major
            self.k, self.v = (np.ascontiguousarray(a.swapaxes(1, 2)) for a in (self.k, self.v))
            if self.k_scale is not None:
                self.k_scale = np.ascontiguousarray(self.k_scale.swapaxes(1, 2))
                self.v_scale = np.ascontiguousarray(self.v_scale.swapaxes(1, 2))
        n_max = per_row * bs
        self.k_gather = np.zeros((len(lens), hkv, n_max, d), np.float32)
        self.v_gather = np.zeros((len(lens), hkv, n_max, dv), np.float32)
        for b, n in enumerate(lens):
            for t in range(n):
                blk = self.table[b, t // bs]
                self.k_gather[b, :, t] = kf[blk, t % bs]
                self.v_gather[b, :, t] = vf[blk, t % bs]

    @property
    def scales(self):
        return {"k_scale": self.k_scale, "v_scale": self.v_scale, "kv_layout": self.kv_layout}

    def run(self, q, **opts):
        return ferroattn.paged_attention(
            q, self.k, self.v, self.table, self.lens, **self.scales, **opts
        )


def _queries(rng, b, hq, nq, d, dtype=F32):
    return rng.standard_normal((b, hq, nq, d)).astype(np.float32).astype(dtype)


def _expected(cache, q, **opts):
    """attention over the gathered keys and values (float32 queries where the cache is not
    q's dtype), as kernels compute it."""
    q32 = q.astype(np.float32)
    return ferroattn.attention(
        q32, cache.k_gather, cache.v_gather, kv_lengths=cache.lens, return_lse=True, **opts
    )


def _check(cache, q, rtol=None, **opts):
    opts.setdefault("causal", True)
    out, lse = cache.run(q, return_lse=True, **opts)
    exp, exp_lse = _expected(cache, q, **opts)
    assert out.dtype == q.dtype and out.shape == exp.shape
    tol = {F32: 2e-6, F16: 2e-3, BF16: 1e-2}[np.dtype(q.dtype)] if rtol is None else rtol
    if cache.dtype == I8:
        # With VNNI, int8 caches take integer products of queries and probabilities rounded
        # to 16 bits (as KVCache's int8 storage does): far below int8's own rounding.
        tol = max(tol, 1e-4)
    assert_out_close(out, exp.astype(np.float64), q.dtype, rtol=tol)
    assert_lse_close(lse, exp_lse.astype(np.float64), tol=1e-5)
    # And the float64 reference, over the same (stored) values.
    ref, ref_lse = reference_attention(
        q.astype(np.float64),
        cache.k_gather.astype(np.float64),
        cache.v_gather.astype(np.float64),
        kv_lengths=cache.lens,
        **opts,
    )
    assert_out_close(out, ref, q.dtype, rtol=max(tol, 1e-5))
    assert_lse_close(lse, ref_lse)
    return out, lse


KV_LAYOUTS = ["nhd", "hnd"]


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("bs", [1, 16, 64])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, I8])
@pytest.mark.parametrize("nq", [1, 3, 20])
def test_paged_equals_gathered_attention(rng, bs, dtype, nq, kv_layout):
    cache = Paged(rng, [37, 130, 5, 64], bs=bs, dtype=dtype, share=True, kv_layout=kv_layout)
    q_dtype = F32 if dtype == I8 else dtype
    _check(cache, _queries(rng, 4, 4, nq, 16, q_dtype))


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("dtype", [F16, I8])
def test_float32_queries_over_narrow_caches(rng, dtype, kv_layout):
    cache = Paged(rng, [300, 129], bs=16, hkv=2, d=32, dtype=dtype, kv_layout=kv_layout)
    _check(cache, _queries(rng, 2, 8, 1, 32), rtol=2e-6)


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("bs", [16, 64])
def test_long_decode_splits_keys_over_blocks(rng, bs, kv_layout):
    """One sequence, one query: split-K cuts the keys into parts that cross blocks."""
    cache = Paged(rng, [2000], bs=bs, hkv=1, d=64, dtype=F16, kv_layout=kv_layout)
    _check(cache, _queries(rng, 1, 4, 1, 64, F16))
    cache = Paged(rng, [3001], bs=bs, hkv=1, d=32, kv_layout=kv_layout)
    _check(cache, _queries(rng, 1, 1, 1, 32))


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("bs", [16, 48, 256])
@pytest.mark.parametrize("dtype", [F16, I8])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_tiles_span_blocks(rng, bs, dtype, group, kv_layout):
    """Decode over 128-wide heads (int8's integer paths included): the typed step reads whole
    tiles of small blocks, a block at a time, requesting the blocks ahead."""
    cache = Paged(rng, [1500, 333], bs=bs, hkv=2, d=128, dtype=dtype, kv_layout=kv_layout)
    _check(cache, _queries(rng, 2, 2 * group, 1, 128))


@pytest.mark.parametrize(
    "opts",
    [
        {"window": 20},
        {"window": (7, 3), "causal": False},
        {"softcap": 5.0},
        {"causal": False},
        {"causal": "top_left"},
        {"scale": 0.3},
        {"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]},
        {"sinks": [0.5, -1.0, 2.0, 0.0]},
    ],
    ids=lambda o: next(iter(o)),
)
@pytest.mark.parametrize("dtype", [F32, I8])
def test_options_mean_what_attention_means(rng, opts, dtype):
    cache = Paged(rng, [90, 33, 140], bs=16, dtype=dtype)
    _check(cache, _queries(rng, 3, 4, 9, 16), **opts)
    _check(cache, _queries(rng, 3, 4, 1, 16), **opts)


def test_gqa_and_value_width(rng):
    cache = Paged(rng, [50, 77], bs=16, hkv=2, d=40, dv=24)
    _check(cache, _queries(rng, 2, 8, 4, 40))
    cache = Paged(rng, [50, 77], bs=8, hkv=1, d=24, dv=40, dtype=F16)
    _check(cache, _queries(rng, 2, 3, 2, 24, F16))


def test_sequence_shorter_than_queries_sees_nothing_first(rng):
    cache = Paged(rng, [3, 40], bs=16)
    q = _queries(rng, 2, 4, 6, 16)
    out, lse = _check(cache, q)
    assert np.all(out[0, :, :3] == 0) and np.all(np.isneginf(lse[0, :, :3]))
    empty = Paged(rng, [0, 5], bs=4)
    out, lse = _check(empty, q)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))


def test_bshd_layout_and_out(rng):
    cache = Paged(rng, [40, 70], bs=16, dtype=F16)
    q = _queries(rng, 2, 4, 5, 16, F16)
    exp = cache.run(q)
    qs = np.ascontiguousarray(q.transpose(0, 2, 1, 3))
    got = cache.run(qs, layout="bshd")
    np.testing.assert_array_equal(got, exp.transpose(0, 2, 1, 3))
    out = np.full_like(exp, np.nan)
    assert cache.run(q, out=out) is out
    np.testing.assert_array_equal(out, exp)
    res, lse = cache.run(qs, layout="bshd", return_lse=True)
    assert lse.shape == (2, 4, 5)


def test_float64_queries_come_back_float64(rng):
    cache = Paged(rng, [40], bs=16)
    q = _queries(rng, 1, 2, 2, 16).astype(np.float64)
    out = cache.run(q)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, cache.run(q.astype(np.float32)), rtol=1e-6, atol=1e-6)


def _cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16, I8])
def test_varlen_equals_per_sequence_calls(rng, dtype, kv_layout):
    lens, nq = [37, 130, 5, 64, 20], [3, 0, 5, 1, 20]
    cache = Paged(rng, lens, bs=16, dtype=dtype, share=True, kv_layout=kv_layout)
    q_dtype = F32 if dtype == I8 else dtype
    q = rng.standard_normal((sum(nq), 4, 16)).astype(np.float32).astype(q_dtype)
    cu = _cu(nq)
    out, lse = ferroattn.paged_attention_varlen(
        q,
        cache.k,
        cache.v,
        cache.table,
        lens,
        cu,
        return_lse=True,
        sinks=[0.1, 0.2, 0.3, 0.4],
        **cache.scales,
    )
    assert out.shape == (sum(nq), 4, 16) and lse.shape == (4, sum(nq))
    for s, n in enumerate(nq):
        if n == 0:
            continue
        qs = q[cu[s] : cu[s + 1]].transpose(1, 0, 2)[None]
        one, one_lse = ferroattn.paged_attention(
            qs,
            cache.k,
            cache.v,
            cache.table[s : s + 1],
            lens[s : s + 1],
            return_lse=True,
            sinks=[0.1, 0.2, 0.3, 0.4],
            **cache.scales,
        )
        np.testing.assert_array_equal(out[cu[s] : cu[s + 1]], one[0].transpose(1, 0, 2))
        np.testing.assert_array_equal(lse[:, cu[s] : cu[s + 1]], one_lse[0])


def test_varlen_with_no_sequences(rng):
    cache = Paged(rng, [5], bs=4)
    q = np.zeros((0, 4, 16), np.float32)
    out = ferroattn.paged_attention_varlen(q, cache.k, cache.v, np.zeros((0, 2), np.int32), [], [0])
    assert out.shape == (0, 4, 16)


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.integers(0, 90), min_size=1, max_size=4),
    bs=st.sampled_from([1, 2, 5, 16, 32]),
    nq=st.integers(1, 12),
    group=st.sampled_from([1, 2, 3]),
    d=st.sampled_from([8, 17, 40]),
    causal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes(lens, bs, nq, group, d, causal, seed):
    rng = np.random.default_rng(seed)
    cache = Paged(rng, lens, bs=bs, hkv=2, d=d)
    _check(cache, _queries(rng, len(lens), 2 * group, nq, d), causal=causal)


# --- paged_write -------------------------------------------------------------------------


def _blocks(shape, dtype, kv_layout):
    """Zeroed ``(num_blocks, block_size, Hkv, ·)`` blocks (or scales without the last axis) in
    ``kv_layout``, returned with their token-major view."""
    a = np.zeros(shape if kv_layout == "nhd" else (shape[0], shape[2], shape[1], *shape[3:]), dtype)
    return a, (a if kv_layout == "nhd" else a.swapaxes(1, 2))


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16, I8])
def test_write_then_read_matches_kv_cache_storage(rng, dtype, kv_layout):
    nb, bs, hkv, d = 6, 4, 2, 16
    kc_given, kc = _blocks((nb, bs, hkv, d), dtype, kv_layout)
    vc_given, vc = _blocks((nb, bs, hkv, d), dtype, kv_layout)
    scales, given = {}, {}
    if dtype == I8:
        for name in ("k_scale", "v_scale"):
            given[name], scales[name] = _blocks((nb, bs, hkv), np.float32, kv_layout)
    k = rng.standard_normal((5, hkv, d)).astype(np.float32)
    v = rng.standard_normal((5, hkv, d)).astype(np.float32)
    slots = np.array([9, -1, 0, 23, 4], np.int64)
    ferroattn.paged_write(kc_given, vc_given, k, v, slots, **given, kv_layout=kv_layout)
    # An int8 KVCache holds the same bytes for the same tokens.
    cache = ferroattn.KVCache(1, hkv, d, 8, dtype="int8" if dtype == I8 else dtype)
    cache.append(k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
    for t, s in enumerate(slots):
        if s < 0:
            continue
        blk, off = divmod(int(s), bs)
        if dtype == I8:
            kq, ks = quantize_rows(k[t])
            np.testing.assert_array_equal(kc[blk, off], kq)
            np.testing.assert_array_equal(scales["k_scale"][blk, off], ks)
            np.testing.assert_array_equal(
                kc[blk, off].astype(np.float32) * scales["k_scale"][blk, off, :, None],
                cache.keys(0)[:, t],
            )
        else:
            np.testing.assert_array_equal(kc[blk, off], k[t].astype(dtype))
            np.testing.assert_array_equal(vc[blk, off], v[t].astype(dtype))
            np.testing.assert_array_equal(cache.keys(0)[:, t], k[t].astype(dtype))
    untouched = np.ones(nb * bs, bool)
    untouched[slots[slots >= 0]] = False
    assert np.all(kc.reshape(nb * bs, hkv, d)[untouched].astype(np.float32) == 0)


def test_write_then_attend_equals_attention(rng):
    nb, bs, hkv, d = 10, 16, 2, 32
    kc, vc = np.zeros((nb, bs, hkv, d), F16), np.zeros((nb, bs, hkv, d), F16)
    n = 70
    table = np.array([[7, 2, 9, 0, 4, -1]], np.int32)
    pos = np.arange(n)
    slots = table[0, pos // bs].astype(np.int64) * bs + pos % bs
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    ferroattn.paged_write(kc, vc, k, v, slots)
    q = rng.standard_normal((1, 4, 1, d)).astype(np.float32)
    got = ferroattn.paged_attention(q, kc, vc, table, [n])
    k16 = k.astype(F16).astype(np.float32).transpose(1, 0, 2)[None]
    v16 = v.astype(F16).astype(np.float32).transpose(1, 0, 2)[None]
    np.testing.assert_allclose(
        got, ferroattn.attention(q, k16, v16, causal=True), rtol=1e-5, atol=1e-6
    )


def test_write_bfloat16_inputs(rng):
    kc = np.zeros((2, 4, 1, 8), BF16)
    x = rng.standard_normal((3, 1, 8)).astype(BF16)
    ferroattn.paged_write(kc, kc.copy(), x, x, [0, 7, 3])
    np.testing.assert_array_equal(kc[1, 3], x[1])


# --- errors --------------------------------------------------------------------------------


def _small(rng, dtype=F32):
    return Paged(rng, [20, 9], bs=8, dtype=dtype)


def _snapshot(*arrays):
    return [a.copy() for a in arrays if a is not None]


@pytest.mark.parametrize(
    "table, lens, match",
    [
        ([[0, 1, 99], [2, -1, -1]], [20, 9], r"block_table\[0, 2\] = 99"),
        ([[0, 1, 3], [-1, 5, -1]], [20, 9], r"block_table\[1, 0\] = -1"),
        ([[0, 1, 3], [2, -1, -1]], [25, 9], r"seq_lens\[0\] = 25 needs 4 blocks"),
        ([[0, 1, 3]], [20], "block_table has 1 rows for 2 sequences"),
        ([[0, 1, 3], [2, 4, 5]], [20, -1], "seq_lens must not be negative"),
        ([[0.0, 1, 3], [2, 4, 5]], [20, 9], "block_table must be a 2-D array of integers"),
    ],
)
def test_bad_tables(rng, table, lens, match):
    c = _small(rng)
    q = _queries(rng, 2, 4, 1, 16)
    with pytest.raises(ValueError, match=match):
        ferroattn.paged_attention(q, c.k, c.v, np.asarray(table), lens)


def test_bad_caches_and_queries(rng):
    c = _small(rng)
    q = _queries(rng, 2, 4, 1, 16)
    with pytest.raises(TypeError, match="share one dtype"):
        ferroattn.paged_attention(q, c.k, c.v.astype(F16), c.table, c.lens)
    with pytest.raises(TypeError, match="share one dtype"):
        ferroattn.paged_attention(
            q, c.k.astype(np.float64), c.v.astype(np.float64), c.table, c.lens
        )
    with pytest.raises(ValueError, match="agree in blocks"):
        ferroattn.paged_attention(q, c.k, c.v[:, :4], c.table, c.lens)
    with pytest.raises(ValueError, match="num_blocks, block_size, Hkv, D"):
        ferroattn.paged_attention(q, c.k[0], c.v[0], c.table, c.lens)
    with pytest.raises(ValueError, match="head dimensions"):
        ferroattn.paged_attention(q[..., :8], c.k, c.v, c.table, c.lens)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ferroattn.paged_attention(q[:, :3], c.k, c.v, c.table, c.lens)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        ferroattn.paged_attention(q.astype(np.int32), c.k, c.v, c.table, c.lens)
    with pytest.raises(ValueError, match="k_scale and v_scale go with int8"):
        ferroattn.paged_attention(
            q, c.k, c.v, c.table, c.lens, k_scale=np.ones((5, 8, 2), np.float32)
        )
    i8 = _small(rng, I8)
    with pytest.raises(ValueError, match="int8 caches need k_scale"):
        ferroattn.paged_attention(q, i8.k, i8.v, i8.table, i8.lens)
    with pytest.raises(ValueError, match="v_scale must have shape"):
        ferroattn.paged_attention(
            q, i8.k, i8.v, i8.table, i8.lens, k_scale=i8.k_scale, v_scale=i8.v_scale[:1]
        )
    with pytest.raises(ValueError, match="window"):
        c.run(q, window=0)
    with pytest.raises(ValueError, match="sinks"):
        c.run(q, sinks=[1.0])
    with pytest.raises(TypeError, match="return_lse"):
        c.run(q, return_lse=1)
    with pytest.raises(ValueError, match="out has shape"):
        c.run(q, out=np.zeros((2, 4, 2, 16), np.float32))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ferroattn.paged_attention_varlen(q[:, :, 0], c.k, c.v, c.table, c.lens, [0, 2, 1])


def test_head_major_caches_are_checked_in_their_layout(rng):
    c = Paged(rng, [20, 9], bs=8, kv_layout="hnd")
    i8 = Paged(rng, [20, 9], bs=8, dtype=I8, kv_layout="hnd")
    q = _queries(rng, 2, 4, 1, 16)
    with pytest.raises(ValueError, match=r"kv_layout must be 'nhd' or 'hnd', got 'bshd'"):
        ferroattn.paged_attention(q, c.k, c.v, c.table, c.lens, kv_layout="bshd")
    with pytest.raises(ValueError, match=r"num_blocks, Hkv, block_size, D"):
        ferroattn.paged_attention(q, c.k[0], c.v[0], c.table, c.lens, kv_layout="hnd")
    with pytest.raises(ValueError, match="agree in blocks"):
        ferroattn.paged_attention(q, c.k, c.v[:, :1], c.table, c.lens, kv_layout="hnd")
    with pytest.raises(ValueError, match="int8 caches need k_scale .num_blocks, Hkv, block_size"):
        ferroattn.paged_attention(q, i8.k, i8.v, i8.table, i8.lens, kv_layout="hnd")
    nhd_scale = np.ascontiguousarray(i8.v_scale.swapaxes(1, 2))
    with pytest.raises(ValueError, match=r"v_scale must have shape \(\d+, 2, 8\)"):
        ferroattn.paged_attention(
            q, i8.k, i8.v, i8.table, i8.lens, k_scale=i8.k_scale, v_scale=nhd_scale, kv_layout="hnd"
        )
    # The same blocks read as the wrong layout are refused by shape (here: Hkv=8, D=16).
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ferroattn.paged_attention(q, c.k, c.v, c.table, c.lens, kv_layout="nhd")
    kc, vc, k, v, _ = _write_args(rng, kv_layout="hnd")
    with pytest.raises(ValueError, match=r"\(T, Hkv, D\)"):
        ferroattn.paged_write(kc, vc, k, v, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="kv_layout must be"):
        ferroattn.paged_write(kc, vc, k, v, [0, 1, 2, 3], kv_layout=None)


def _write_args(rng, dtype=F32, kv_layout="nhd"):
    nb, bs, hkv, d = 3, 4, 2, 8
    kc, _ = _blocks((nb, bs, hkv, d), dtype, kv_layout)
    vc, _ = _blocks((nb, bs, hkv, d), dtype, kv_layout)
    scales = {}
    if dtype == I8:
        scales = {
            n: _blocks((nb, bs, hkv), np.float32, kv_layout)[0] for n in ("k_scale", "v_scale")
        }
    if kv_layout == "hnd":
        scales["kv_layout"] = kv_layout
    k = rng.standard_normal((4, hkv, d)).astype(np.float32)
    return kc, vc, k, k.copy(), scales


@pytest.mark.parametrize("kv_layout", KV_LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, I8])
@pytest.mark.parametrize(
    "slots, error, match",
    [
        ([0, 5, 5, -1], ValueError, "names slot 5 more than once"),
        ([0, 12, 1, 2], ValueError, r"slot_mapping\[1\] = 12 is not a slot"),
        ([0, -2, 1, 2], ValueError, r"slot_mapping\[1\] = -2"),
        ([0, 1, 2], ValueError, "3 entries for 4 tokens"),
        ([[0, 1, 2, 3]], ValueError, "1-D array of integers"),
    ],
)
def test_write_errors_change_nothing(rng, dtype, slots, error, match, kv_layout):
    kc, vc, k, v, args = _write_args(rng, dtype, kv_layout)
    arrays = [kc, vc, *(a for a in args.values() if isinstance(a, np.ndarray))]
    before = _snapshot(*arrays)
    with pytest.raises(error, match=match):
        ferroattn.paged_write(kc, vc, k, v, slots, **args)
    for a, b in zip(before, arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def test_write_refusals(rng):
    kc, vc, k, v, _ = _write_args(rng)
    with pytest.raises(ValueError, match=r"\(T, Hkv, D\)"):
        ferroattn.paged_write(kc, vc, k[:, :1], v, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="share one dtype"):
        ferroattn.paged_write(kc, vc, k, v.astype(F16), [0, 1, 2, 3])
    kc.flags.writeable = False
    with pytest.raises(ValueError, match="k_cache is read-only"):
        ferroattn.paged_write(kc, vc, k, v, [0, 1, 2, 3])
    kc, vc, k, v, scales = _write_args(rng, I8)
    with pytest.raises(ValueError, match="int8 caches need k_scale"):
        ferroattn.paged_write(kc, vc, k, v, [0, 1, 2, 3])
    scales["v_scale"].flags.writeable = False
    with pytest.raises(ValueError, match="v_scale is read-only"):
        ferroattn.paged_write(kc, vc, k, v, [0, 1, 2, 3], **scales)
    assert not kc.any()


def test_bfloat16_is_ml_dtypes():
    assert BF16 == np.dtype(ml_dtypes.bfloat16)
