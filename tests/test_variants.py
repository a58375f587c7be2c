"""Attention variants: mask, bias, ALiBi, T5 relative bias, sinks, block-sparse layouts.

Everything is checked against ``reference.reference``, the suite's float64 oracle, which adds
the extra score terms and the sink explicitly, row by row.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    BF16,
    F16,
    F32,
    assert_lse_close,
    assert_out_close,
    block_mask,
    from_bhsd,
    lse_to_rank,
    reference,
    rel_err,
    t5_bucket,
    to_bhsd,
)

import ferroattn

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

VARIANTS = ["mask", "bias", "alibi", "t5", "t5_decoder", "sinks", "block", "all"]


def make_variant(name, rng, *, B, Hq, Nq, Nk, bs=4):
    """Keyword options for one variant (or all of them) for a (B, Hq, Nq, Nk) problem."""
    opts = {}
    if name in ("mask", "all"):
        m = rng.random((B, 1, Nq, Nk)) < 0.7
        m[0, 0, 0, :] = False  # one row that sees nothing
        opts["mask"] = m
    if name in ("bias", "all"):
        opts["bias"] = (2.0 * rng.standard_normal((Hq, Nq, Nk))).astype(np.float32)
    if name in ("alibi", "all"):
        opts["alibi_slopes"] = ferroattn.alibi_slopes(Hq)
    if name in ("t5", "all"):
        table = rng.standard_normal((32, Hq)).astype(np.float32)
        opts["rel_bias"] = ferroattn.T5Bias(table, bidirectional=True, max_distance=20)
    if name == "t5_decoder":
        table = rng.standard_normal((8, Hq)).astype(np.float32)
        opts["rel_bias"] = ferroattn.T5Bias(table, bidirectional=False, max_distance=10)
    if name in ("sinks", "all"):
        opts["sinks"] = (2.0 * rng.standard_normal(Hq)).astype(np.float32)
    if name in ("block", "all"):
        lay = rng.random((Hq, Nq // bs, Nk // bs)) < 0.6
        if Nq // bs > 1:
            lay[:, -1, :] = False  # a row of blocks with nothing
        opts["block_layout"] = lay
        opts["block_size"] = bs
    return opts


def inputs(rng, B, Hq, Hkv, Nq, Nk, D, Dv, dtype=F32):
    arrays = []
    for shape in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)):
        arrays.append(rng.standard_normal(shape).astype(np.float32).astype(dtype))
    return arrays


def check(q, k, v, *, dtype=F32, layout="bhsd", rank=4, weights=True, **opts):
    """ferroattn (out, lse, and optionally weights) against the reference; returns out."""
    exp_out, exp_lse, exp_w = reference(q, k, v, **opts)
    args = [np.ascontiguousarray(from_bhsd(x, layout, rank)) for x in (q, k, v)]
    out, lse = ferroattn.attention(*args, layout=layout, return_lse=True, **opts)
    assert_out_close(out, from_bhsd(exp_out, layout, rank), dtype)
    assert_lse_close(lse, lse_to_rank(exp_lse, rank))
    out4 = to_bhsd(out, layout).astype(np.float64)
    dead = exp_w.sum(axis=-1) == 0  # rows that see no key
    assert np.all(out4[dead] == 0.0), "rows that see no key must be exactly 0"
    if weights:
        w = ferroattn.attention_weights(args[0], args[1], layout=layout, **opts)
        exp_wr = exp_w if rank == 4 else exp_w.reshape(exp_w.shape[4 - rank :])
        assert_out_close(w, exp_wr, dtype)
        assert np.all(w.reshape(exp_w.shape)[exp_w == 0] == 0), "hidden entries must be 0"
    return out, lse


# --------------------------------------------------------------------------
# Each variant alone and combined with causal, window, GQA, kv_lengths
# --------------------------------------------------------------------------

COMBOS = [
    # B, Nq, Nk, options
    (2, 12, 20, {}),
    (2, 12, 20, {"causal": True}),
    (2, 20, 12, {"causal": "bottom_right"}),
    (2, 20, 12, {"causal": "top_left"}),
    (2, 12, 20, {"causal": "top_left"}),
    (2, 16, 24, {"window": (3, 2)}),
    (2, 16, 16, {"window": 5, "causal": True}),
    (2, 24, 16, {"window": (None, 1), "causal": "top_left"}),
    (2, 12, 20, {"kv_lengths": [20, 7]}),
    (2, 8, 20, {"kv_lengths": [0, 13], "causal": True}),
    (2, 20, 8, {"kv_lengths": [5, 8], "window": (2, 2)}),
    (2, 12, 12, {"softcap": 4.0, "scale": 0.4}),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[1]}x{c[2]}-{c[3]}")
def test_variant_combined_fp32(rng, variant, combo):
    B, Nq, Nk, base = combo
    Hq, Hkv = 4, 2
    q, k, v = inputs(rng, B, Hq, Hkv, Nq, Nk, 12, 7)
    opts = {**base, **make_variant(variant, rng, B=B, Hq=Hq, Nq=Nq, Nk=Nk)}
    check(q, k, v, **opts)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "combo",
    [(2, 12, 20, {"causal": True}), (2, 20, 12, {"window": (4, 1), "kv_lengths": [9, 12]})],
    ids=lambda c: f"{c[1]}x{c[2]}-{c[3]}",
)
def test_variant_half_precision(rng, dtype, variant, combo):
    B, Nq, Nk, base = combo
    q, k, v = inputs(rng, B, 4, 1, Nq, Nk, 16, 16, dtype)
    opts = {**base, **make_variant(variant, rng, B=B, Hq=4, Nq=Nq, Nk=Nk)}
    check(q, k, v, dtype=dtype, **opts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_multi_tile(rng, variant):
    """Several query and key tiles, with GQA and bottom-right causal."""
    B, Hq, Hkv, Nq, Nk = 1, 2, 1, 136, 328
    q, k, v = inputs(rng, B, Hq, Hkv, Nq, Nk, 20, 9)
    opts = make_variant(variant, rng, B=B, Hq=Hq, Nq=Nq, Nk=Nk, bs=8)
    check(q, k, v, causal=True, weights=False, **opts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_decode_split_keys(rng, restore_threads, variant):
    """One query over many keys: the keys are split between threads and merged after."""
    ferroattn.set_num_threads(4)
    B, Hq, Hkv, Nq, Nk = 1, 2, 1, 4, 2048
    q, k, v = inputs(rng, B, Hq, Hkv, Nq, Nk, 16, 16)
    opts = make_variant(variant, rng, B=B, Hq=Hq, Nq=Nq, Nk=Nk, bs=4)
    check(q, k, v, causal=True, weights=False, **opts)


@pytest.mark.parametrize("Nq", [1, 4, 136], ids=lambda n: f"Nq{n}")
def test_mask_and_bias_in_whole_tiles(rng, restore_threads, Nq):
    """Masks and biases that are all-true / all-false / all-zero over whole 128-key tiles of
    some rows and mixed elsewhere: the per-tile shortcuts must match the reference, also when
    the keys are split between threads."""
    ferroattn.set_num_threads(3)
    B, Hq, Hkv, Nk = 1, 4, 2, 1100
    q, k, v = inputs(rng, B, Hq, Hkv, Nq, Nk, 24, 16)
    tile = np.arange(Nk) // 128
    kind = rng.integers(0, 3, size=(Nq, tile.max() + 1))  # 0 hidden, 1 visible, 2 random
    mask = np.where(kind[:, tile] == 2, rng.random((Nq, Nk)) < 0.5, kind[:, tile] == 1)
    zero = rng.random((Nq, tile.max() + 1))[:, tile] < 0.5
    bias = np.where(zero, 0.0, rng.standard_normal((Nq, Nk))).astype(np.float32)
    for opts in ({"mask": mask}, {"bias": bias}, {"mask": mask, "bias": bias}):
        check(q, k, v, weights=Nq == 4, **opts)
        check(q, k, v, causal=True, weights=False, **opts)


# --------------------------------------------------------------------------
# Hypothesis over shapes
# --------------------------------------------------------------------------


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    size = st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65, 129, 300, 333]))
    Nq = draw(size)
    Nk = draw(size)
    D = draw(st.sampled_from([1, 3, 5, 13, 16, 20, 33]))
    Dv = draw(st.sampled_from([1, 7, 16, 24]))
    opts = {}
    causal = draw(st.sampled_from([False, True, "top_left"]))
    if causal:
        opts["causal"] = causal
    window = draw(
        st.one_of(
            st.none(),
            st.integers(1, 20),
            st.tuples(st.one_of(st.none(), st.integers(0, 20)), st.integers(0, 20)),
        )
    )
    if window is not None:
        opts["window"] = window
    if draw(st.booleans()):
        opts["kv_lengths"] = draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B))
    return B, Hq, Hkv, Nq, Nk, D, Dv, opts


@given(
    problem=problems(),
    which=st.sets(st.sampled_from(["mask", "bias", "alibi", "t5", "sinks"]), min_size=1),
    seed=st.integers(0, 2**32 - 1),
    bidirectional=st.booleans(),
    buckets=st.integers(4, 40),
    max_distance=st.integers(21, 200),
)
def test_hypothesis_variants(problem, which, seed, bidirectional, buckets, max_distance):
    B, Hq, Hkv, Nq, Nk, D, Dv, opts = problem
    rng = np.random.default_rng(seed)
    q, k, v = inputs(rng, B, Hq, Hkv, Nq, Nk, D, Dv)
    if "mask" in which:
        shape = [(Nq, Nk), (B, 1, Nq, Nk), (1, Hq, 1, Nk), (Hq, Nq, 1)][seed % 4]
        opts["mask"] = rng.random(shape) < 0.8
    if "bias" in which:
        shape = [(B, Hq, Nq, Nk), (Nq, Nk), (Hq, 1, Nk), (B, 1, Nq, 1)][seed % 4]
        opts["bias"] = rng.standard_normal(shape).astype(np.float32)
    if "alibi" in which:
        opts["alibi_slopes"] = rng.uniform(0.0, 0.5, Hq).astype(np.float32)
    if "t5" in which:
        table = rng.standard_normal((buckets, Hq)).astype(np.float32)
        opts["rel_bias"] = ferroattn.T5Bias(table, bidirectional, max_distance)
    if "sinks" in which:
        opts["sinks"] = (3.0 * rng.standard_normal(Hq)).astype(np.float32)
    check(q, k, v, weights=Nq * Nk <= 4096, **opts)


@given(
    nbq=st.integers(1, 6),
    nbk=st.integers(1, 6),
    bs=st.sampled_from([1, 3, 8, 64]),
    per_head=st.booleans(),
    causal=st.sampled_from([False, True, "top_left"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_block_sparse(nbq, nbk, bs, per_head, causal, seed):
    rng = np.random.default_rng(seed)
    Hq, Hkv, Nq, Nk = 4, 2, nbq * bs, nbk * bs
    q, k, v = inputs(rng, 1, Hq, Hkv, Nq, Nk, 11, 6)
    lay = rng.random((Hq, nbq, nbk) if per_head else (nbq, nbk)) < 0.5
    check(
        q,
        k,
        v,
        causal=causal,
        block_layout=lay,
        block_size=bs,
        sinks=rng.standard_normal(Hq) if seed % 2 else None,
        weights=Nq * Nk <= 4096,
    )


# --------------------------------------------------------------------------
# mask / bias broadcasting, ranks and layouts
# --------------------------------------------------------------------------

NQ, NK = 6, 9
BROADCAST = {
    2: [(NQ, NK), (1, NK), (NQ, 1), (NK,), (1, 1, NQ, NK), (1, 1)],
    3: [(NQ, NK), (3, NQ, NK), (3, 1, NK), (1, NQ, 1), (NK,), (3, 1, 1)],
    4: [(2, 1, NQ, NK), (2, 3, 1, NK), (1, 3, NQ, 1), (NQ, NK), (3, NQ, NK), (2, 3, NQ, NK)],
}
RANK_LAYOUTS = [(2, "bhsd"), (3, "bhsd"), (3, "bshd"), (4, "bhsd"), (4, "bshd")]


@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS)
@pytest.mark.parametrize("which", range(6))
def test_mask_and_bias_broadcast(rng, rank, layout, which):
    B, Hq = {2: (1, 1), 3: (1, 3), 4: (2, 3)}[rank]
    q, k, v = inputs(rng, B, Hq, Hq, NQ, NK, 8, 5)
    mshape = BROADCAST[rank][which]
    bshape = BROADCAST[rank][-1 - which]
    mask = rng.random(mshape) < 0.6
    bias = rng.standard_normal(bshape).astype(np.float32)
    check(q, k, v, layout=layout, rank=rank, mask=mask, bias=bias, causal=True)


@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS)
def test_all_variants_ranks_and_layouts(rng, rank, layout):
    B, Hq = {2: (1, 1), 3: (1, 3), 4: (2, 3)}[rank]
    Nq, Nk = 8, 12
    q, k, v = inputs(rng, B, Hq, Hq, Nq, Nk, 8, 5)
    opts = make_variant("all", rng, B=B, Hq=Hq, Nq=Nq, Nk=Nk)
    if rank < 4:  # B = 1: drop the leading axes (a 2-D / 3-D mask)
        opts["mask"] = opts["mask"].reshape(opts["mask"].shape[4 - rank :])
    if rank == 2:  # Hq = 1
        opts["bias"] = opts["bias"][0]
    check(q, k, v, layout=layout, rank=rank, window=(3, None), **opts)


def test_strided_and_broadcast_views_are_read_correctly(rng):
    B, Hq, Nq, Nk = 2, 3, 10, 14
    q, k, v = inputs(rng, B, Hq, Hq, Nq, Nk, 8, 8)
    big = rng.standard_normal((Hq, 2 * Nq, Nk + 3)).astype(np.float32)
    bias = big[:, ::2, 3:]  # strided, non-contiguous view
    mask = np.asfortranarray(rng.random((Nq, Nk)) < 0.7)  # Fortran order
    mask_b = np.broadcast_to(mask, (B, Hq, Nq, Nk))  # zero strides
    bias_t = rng.standard_normal((Nk, Nq)).astype(np.float32).T  # transposed view
    check(q, k, v, bias=bias, mask=mask_b)
    check(q, k, v, bias=bias_t, mask=mask)
    check(q, k, v, bias=bias[:, ::-1], mask=mask[::-1])  # negative row strides


@pytest.mark.parametrize("which", ["bias", "mask", "both"])
def test_negative_key_strides(rng, which):
    """mask / bias reversed along the key axis (negative last stride) read correctly."""
    q, k, v = inputs(rng, 1, 2, 2, 6, 10, 8, 8)
    bias = rng.standard_normal((2, 6, 10)).astype(np.float32)[..., ::-1]
    mask = (rng.random((6, 10)) < 0.7)[:, ::-1]
    opts = {
        "bias": {"bias": bias},
        "mask": {"mask": mask},
        "both": {"bias": bias, "mask": mask},
    }[which]
    check(q, k, v, causal="top_left", **opts)


def test_bias_is_added_after_scale_and_softcap(rng):
    q, k, v = inputs(rng, 1, 2, 2, 5, 7, 8, 8)
    bias = (5.0 * rng.standard_normal((5, 7))).astype(np.float32)
    out = ferroattn.attention(q, k, v, bias=bias, softcap=1.5, scale=2.0)
    exp, _, _ = reference(q, k, v, bias=bias, softcap=1.5, scale=2.0)
    assert_out_close(out, exp, F32)
    # the test can tell: the bias inside the softcap gives a clearly different result
    s = 2.0 * np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64))
    s = 1.5 * np.tanh((s + bias) / 1.5)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    wrong = (p / p.sum(axis=-1, keepdims=True)) @ v.astype(np.float64)
    assert rel_err(out, wrong) > 1e-2


def test_alibi_matches_explicit_bias(rng):
    """ALiBi equals the bias −slope·|pos − j| written out (bottom-right and top-left)."""
    Hq, Nq, Nk = 4, 7, 11
    q, k, v = inputs(rng, 1, Hq, 2, Nq, Nk, 8, 8)
    slopes = ferroattn.alibi_slopes(Hq)
    for causal, off in ((False, Nk - Nq), (True, Nk - Nq), ("top_left", 0)):
        dist = np.abs(np.arange(Nk)[None, :] - (np.arange(Nq)[:, None] + off))
        bias = (-slopes[:, None, None] * dist).astype(np.float32)
        a = ferroattn.attention(q, k, v, causal=causal, alibi_slopes=slopes)
        b = ferroattn.attention(q, k, v, causal=causal, bias=bias)
        assert rel_err(a, b) <= 1e-5, causal


def test_t5_matches_explicit_bias(rng):
    Hq, Nq, Nk = 2, 9, 40
    q, k, v = inputs(rng, 1, Hq, 1, Nq, Nk, 8, 8)
    table = rng.standard_normal((16, Hq)).astype(np.float32)
    for bidirectional in (True, False):
        t5 = ferroattn.T5Bias(table, bidirectional=bidirectional, max_distance=24)
        rel = np.arange(Nk)[None, :] - (np.arange(Nq)[:, None] + Nk - Nq)
        bucket = t5_bucket(rel, bidirectional=bidirectional, num_buckets=16, max_distance=24)
        bias = np.moveaxis(table[bucket], -1, 0)  # (Hq, Nq, Nk)
        a = ferroattn.attention(q, k, v, rel_bias=t5)
        b = ferroattn.attention(q, k, v, bias=bias)
        assert rel_err(a, b) <= 1e-5, bidirectional


# --------------------------------------------------------------------------
# Block-sparse layouts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize(
    "bs,nbq,nbk,opts",
    [
        (1, 9, 13, {}),
        (4, 5, 3, {"causal": True}),
        (16, 3, 5, {"causal": "top_left", "kv_lengths": [70, 33]}),
        (64, 3, 5, {"window": (100, 50)}),
    ],
    ids=str,
)
def test_block_sparse_equals_kron_mask(rng, per_head, bs, nbq, nbk, opts):
    Hq, Hkv = 4, 2
    Nq, Nk = nbq * bs, nbk * bs
    q, k, v = inputs(rng, 2, Hq, Hkv, Nq, Nk, 13, 8)
    lay = rng.random((Hq, nbq, nbk) if per_head else (nbq, nbk)) < 0.5
    lay[..., 0, :] = False  # a row of blocks that sees nothing
    out, lse = check(q, k, v, block_layout=lay, block_size=bs, weights=Nq * Nk < 5000, **opts)
    dense = ferroattn.attention(q, k, v, mask=block_mask(lay, bs, Hq), **opts)
    assert rel_err(out, dense) <= 1e-6
    assert np.all(out[:, :, :bs] == 0)
    assert np.all(np.isneginf(lse[:, :, :bs]))


HELPERS = {
    "local_global": lambda n: ferroattn.local_global_layout(n, window=1, global_blocks=1),
    "local_global_causal": lambda n: ferroattn.local_global_layout(
        n, window=2, global_blocks=2, causal=True
    ),
    "bigbird": lambda n: ferroattn.bigbird_layout(
        n, window=1, global_blocks=1, random_blocks=2, seed=3, causal=False
    ),
    "bigbird_causal": lambda n: ferroattn.bigbird_layout(
        n, window=1, global_blocks=1, random_blocks=1, seed=5, causal=True
    ),
    "strided": lambda n: ferroattn.strided_layout(n, local=1, stride=3, causal=True),
    "strided_bidir": lambda n: ferroattn.strided_layout(n, local=2, stride=4, causal=False),
}


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helper_layouts(rng, name):
    n, bs = 8, 16
    lay = HELPERS[name](n)
    assert isinstance(lay, np.ndarray) and lay.dtype == np.bool_ and lay.shape == (n, n)
    assert lay.diagonal().all(), "every block sees itself"
    if "causal" in name or name == "strided":
        assert not np.triu(lay, 1).any(), "causal layouts are lower triangular"
    q, k, v = inputs(rng, 1, 2, 1, n * bs, n * bs, 16, 16)
    check(q, k, v, block_layout=lay, block_size=bs, weights=False)


def test_helper_layout_definitions():
    i, j = np.indices((6, 6))
    lg = ferroattn.local_global_layout(6, window=1, global_blocks=2)
    np.testing.assert_array_equal(lg, (np.abs(i - j) <= 1) | (i < 2) | (j < 2))
    np.testing.assert_array_equal(
        ferroattn.local_global_layout(6, window=1, global_blocks=2, causal=True), np.tril(lg)
    )
    sl = ferroattn.strided_layout(6, local=1, stride=3, causal=True)
    np.testing.assert_array_equal(sl, np.tril((np.abs(i - j) <= 1) | (j % 3 == 2)))
    bb = ferroattn.bigbird_layout(6, window=1, global_blocks=1, random_blocks=2, seed=0)
    base = (np.abs(i - j) <= 1) | (i < 1) | (j < 1)
    assert np.all(bb >= base)
    assert np.all((bb & ~base).sum(axis=1) <= 2)
    again = ferroattn.bigbird_layout(6, window=1, global_blocks=1, random_blocks=2, seed=0)
    np.testing.assert_array_equal(bb, again)


# --------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------


def test_sinks_fully_masked_rows(rng):
    B, Hq, Nq, Nk = 2, 3, 6, 8
    q, k, v = inputs(rng, B, Hq, 1, Nq, Nk, 8, 8)
    sinks = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    mask = np.ones((Nq, Nk), dtype=bool)
    mask[2] = False
    out, lse = ferroattn.attention(
        q, k, v, mask=mask, kv_lengths=[Nk, 0], sinks=sinks, return_lse=True
    )
    # batch 1 sees no key at all; row 2 of batch 0 neither
    assert np.all(out[1] == 0) and np.all(out[0, :, 2] == 0)
    np.testing.assert_allclose(lse[1], np.broadcast_to(sinks[:, None], (Hq, Nq)), atol=1e-6)
    np.testing.assert_allclose(lse[0, :, 2], sinks, atol=1e-6)
    exp_out, exp_lse, _ = reference(q, k, v, mask=mask, kv_lengths=[Nk, 0], sinks=sinks)
    assert_out_close(out, exp_out, F32)
    assert_lse_close(lse, exp_lse)
    w = ferroattn.attention_weights(q, k, mask=mask, kv_lengths=[Nk, 0], sinks=sinks)
    assert np.all(w[1] == 0) and np.all(w[0, :, 2] == 0)


def test_sinks_with_empty_block_row(rng):
    q, k, v = inputs(rng, 1, 2, 2, 8, 8, 8, 8)
    lay = np.array([[True, False], [False, False]])
    sinks = np.array([1.0, -2.0])
    out, lse = ferroattn.attention(
        q, k, v, block_layout=lay, block_size=4, sinks=sinks, return_lse=True
    )
    assert np.all(out[0, :, 4:] == 0)
    np.testing.assert_allclose(lse[0, :, 4:], np.repeat(sinks[:, None], 4, 1), atol=1e-6)


@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window": 3, "kv_lengths": [5]}], ids=str)
def test_sinks_weights_sum(rng, opts):
    Hq, Nq, Nk = 4, 9, 11
    q, k, v = inputs(rng, 1, Hq, 2, Nq, Nk, 8, 8)
    sinks = (2.0 * rng.standard_normal(Hq)).astype(np.float32)
    out, lse = ferroattn.attention(q, k, v, sinks=sinks, return_lse=True, **opts)
    w = ferroattn.attention_weights(q, k, sinks=sinks, **opts).astype(np.float64)
    want = 1.0 - np.exp(sinks[None, :, None].astype(np.float64) - lse.astype(np.float64))
    np.testing.assert_allclose(w.sum(axis=-1), want, atol=2e-6)
    assert np.all(w.sum(axis=-1) < 1.0)
    # and the sink shrinks the output: out = weights @ v
    gqa_v = np.repeat(v.astype(np.float64), 2, axis=1)
    assert rel_err(out, w @ gqa_v) <= 1e-5


# --------------------------------------------------------------------------
# NaN hidden by a mask
# --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["v", "k", "kv"])
@pytest.mark.parametrize("hide", ["mask", "block"])
@pytest.mark.parametrize("Nk", [16, 320])
def test_nan_hidden_by_mask_does_not_leak(rng, where, hide, Nk):
    Hq, Nq, bs = 2, 8, 4
    j = Nk - 6  # the poisoned key
    q, k, v = inputs(rng, 1, Hq, 1, Nq, Nk, 8, 8)
    if "v" in where:
        v[0, 0, j] = np.nan
    if "k" in where:
        k[0, 0, j] = np.nan
    sees = np.arange(Nq) % 2 == 0  # even rows see the poisoned key, odd rows do not
    opts = {"sinks": np.array([0.3, -0.4]), "bias": rng.standard_normal((Nq, Nk))}
    if hide == "mask":
        mask = np.ones((Nq, Nk), dtype=bool)
        mask[~sees, j] = False
        opts["mask"] = mask
    else:
        lay = np.ones((Nq // bs, Nk // bs), dtype=bool)
        lay[1, j // bs] = False  # rows 4..7 do not see the poisoned block
        sees = np.arange(Nq) < bs
        opts.update(block_layout=lay, block_size=bs)
    clean_k, clean_v = np.nan_to_num(k), np.nan_to_num(v)
    exp, exp_lse, _ = reference(q, clean_k, clean_v, **opts)
    out, lse = ferroattn.attention(q, k, v, return_lse=True, **opts)
    hidden = ~sees
    assert np.isfinite(out[:, :, hidden]).all(), "NaN leaked into rows that cannot see it"
    assert rel_err(out[:, :, hidden], exp[:, :, hidden]) <= 1e-5
    assert np.allclose(lse[:, :, hidden], exp_lse[:, :, hidden], rtol=0, atol=1e-5)
    if "k" in where:
        w = ferroattn.attention_weights(q, k, **opts)
        assert np.isfinite(w[:, :, hidden]).all()


# --------------------------------------------------------------------------
# attention_weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "opts",
    [{"causal": True}, {"causal": "top_left", "window": (2, 3)}, {"kv_lengths": [12, 3]}],
    ids=str,
)
def test_weights_every_option(rng, variant, opts):
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 8, 12
    q, k, v = inputs(rng, B, Hq, Hkv, Nq, Nk, 8, 6)
    extra = make_variant(variant, rng, B=B, Hq=Hq, Nq=Nq, Nk=Nk)
    _, _, exp_w = reference(q, k, **opts, **extra)
    w = ferroattn.attention_weights(q, k, **opts, **extra)
    assert_out_close(w, exp_w, F32)
    out = ferroattn.attention(q, k, v, **opts, **extra)
    gqa_v = np.repeat(v.astype(np.float64), Hq // Hkv, axis=1)
    assert rel_err(w.astype(np.float64) @ gqa_v, out) <= 1e-5


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_weights_half_precision(rng, dtype):
    q, k, _ = inputs(rng, 1, 4, 2, 8, 12, 16, 4, dtype)
    extra = make_variant("all", rng, B=1, Hq=4, Nq=8, Nk=12)
    _, _, exp_w = reference(q, k, causal=True, **extra)
    w = ferroattn.attention_weights(q, k, causal=True, **extra)
    assert_out_close(w, exp_w, dtype)


# --------------------------------------------------------------------------
# ALiBi slopes
# --------------------------------------------------------------------------


def _paper_slopes(n):
    """Press et al.'s reference code: powers of two exact, others interleaved."""
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 / n * (i + 1)) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return _paper_slopes(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_values():
    np.testing.assert_array_equal(ferroattn.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(ferroattn.alibi_slopes(1), [2.0**-8])
    np.testing.assert_allclose(
        ferroattn.alibi_slopes(12),
        [2.0**-e for e in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
        rtol=1e-7,
    )
    np.testing.assert_allclose(ferroattn.alibi_slopes(3), [2**-4, 2**-8, 2**-2], rtol=1e-7)
    for n in (2, 4, 5, 6, 7, 16, 24, 32, 40, 64):
        s = ferroattn.alibi_slopes(n)
        assert s.shape == (n,)
        np.testing.assert_allclose(s, _paper_slopes(n), rtol=1e-7, err_msg=str(n))


# --------------------------------------------------------------------------
# Memory: the T5 bias is computed in the kernel, never as an N×N array
# --------------------------------------------------------------------------

_T5_RSS_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    import numpy as np
    import ferroattn

    def rss_now_kib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    n = 16384
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, n, 16), dtype=np.float32) for _ in range(3))
    table = rng.standard_normal((32, 1)).astype(np.float32)
    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    # ru_maxrss survives exec (a child starts with its parent's peak): reset the high-water
    # mark and read VmHWM instead where the kernel allows it.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        read_peak = peak_kib
    except OSError:
        read_peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    base = rss_now_kib()
    out = ferroattn.attention(
        q, k, v, window=(200, 200), rel_bias=ferroattn.T5Bias(table, max_distance=128)
    )
    peak = read_peak()
    rows = [0, 9000, n - 1]
    print(json.dumps({"growth_kib": peak - base, "rows": rows, "out": out[0, 0, rows].tolist()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, ru_maxrss in kB")
def test_t5_allocates_no_n_by_n(rng):
    proc = subprocess.run(
        [sys.executable, "-c", _T5_RSS_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mib = res["growth_kib"] / 1024
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB (N×N float32 is 1 GiB)"
    # the result is right too (spot rows, recomputed from the same seed)
    n = 16384
    g = np.random.default_rng(0)
    q, k, v = (g.standard_normal((1, 1, n, 16), dtype=np.float32) for _ in range(3))
    table = g.standard_normal((32, 1)).astype(np.float32)
    for i, got in zip(res["rows"], res["out"], strict=True):
        lo, hi = max(0, i - 200), min(n, i + 201)
        s = (k[0, 0, lo:hi].astype(np.float64) @ q[0, 0, i].astype(np.float64)) / 4.0
        s = s + table[t5_bucket(np.arange(lo, hi) - i), 0]
        e = np.exp(s - s.max())
        want = e @ v[0, 0, lo:hi].astype(np.float64) / e.sum()
        assert rel_err(got, want) <= 1e-5, i


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

FUNCS = {
    "attention": lambda q, k, v, **kw: ferroattn.attention(q, k, v, **kw),
    "attention_weights": lambda q, k, v, **kw: ferroattn.attention_weights(q, k, **kw),
}
_T = ferroattn.T5Bias


def _qkv():
    rng = np.random.default_rng(0)
    return inputs(rng, 2, 4, 2, 8, 12, 8, 8)


ERRORS = {
    # name: (options, exception, message pattern)
    "mask_float": ({"mask": np.ones((8, 12), np.float32)}, TypeError, "mask"),
    "mask_int": ({"mask": np.ones((8, 12), np.int8)}, TypeError, "mask"),
    "mask_shape": ({"mask": np.ones((8, 11), bool)}, ValueError, "mask"),
    "mask_heads": ({"mask": np.ones((3, 8, 12), bool)}, ValueError, "mask"),
    "mask_5d": ({"mask": np.ones((1, 1, 1, 8, 12), bool)}, ValueError, "mask"),
    "bias_shape": ({"bias": np.zeros((12, 8), np.float32)}, ValueError, "bias"),
    "bias_batch": ({"bias": np.zeros((3, 4, 8, 12), np.float32)}, ValueError, "bias"),
    "alibi_len": ({"alibi_slopes": np.ones(3)}, ValueError, "alibi_slopes"),
    "alibi_2d": ({"alibi_slopes": np.ones((4, 1))}, ValueError, "alibi_slopes"),
    "alibi_nan": ({"alibi_slopes": [0.5, np.nan, 0.1, 0.2]}, ValueError, "alibi_slopes"),
    "alibi_inf": ({"alibi_slopes": [0.5, np.inf, 0.1, 0.2]}, ValueError, "alibi_slopes"),
    "sinks_len": ({"sinks": np.ones(5)}, ValueError, "sinks"),
    "sinks_nan": ({"sinks": [0.0, 0.0, np.nan, 0.0]}, ValueError, "sinks"),
    "sinks_inf": ({"sinks": [0.0, -np.inf, 0.0, 0.0]}, ValueError, "sinks"),
    "rel_bias_array": ({"rel_bias": np.zeros((32, 4))}, TypeError, "rel_bias"),
    "rel_bias_tuple": ({"rel_bias": (np.zeros((32, 4)), True, 128)}, TypeError, "rel_bias"),
    "rel_bias_heads": ({"rel_bias": _T(np.zeros((32, 3)))}, ValueError, "rel_bias"),
    "rel_bias_1d": ({"rel_bias": _T(np.zeros(32))}, ValueError, "rel_bias"),
    "rel_bias_3d": ({"rel_bias": _T(np.zeros((32, 4, 1)))}, ValueError, "rel_bias"),
    "block_no_size": ({"block_layout": np.ones((2, 3), bool)}, ValueError, "block_size"),
    "size_no_block": ({"block_size": 4}, ValueError, "block_layout"),
    "block_size_q": (
        {"block_layout": np.ones((2, 4), bool), "block_size": 3},
        ValueError,
        "block_size",
    ),
    "block_size_k": (
        {"block_layout": np.ones((1, 2), bool), "block_size": 8},
        ValueError,
        "block_size",
    ),
    "block_shape": (
        {"block_layout": np.ones((2, 4), bool), "block_size": 4},
        ValueError,
        "block_layout",
    ),
    "block_heads": (
        {"block_layout": np.ones((3, 2, 3), bool), "block_size": 4},
        ValueError,
        "block_layout",
    ),
    "block_float": (
        {"block_layout": np.ones((2, 3), np.float32), "block_size": 4},
        TypeError,
        "block_layout",
    ),
    "block_int": (
        {"block_layout": np.ones((2, 3), np.int64), "block_size": 4},
        TypeError,
        "block_layout",
    ),
}


@pytest.mark.parametrize("fn", sorted(FUNCS))
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(fn, case):
    q, k, v = _qkv()
    opts, exc, pattern = ERRORS[case]
    with pytest.raises(exc, match=pattern):
        FUNCS[fn](q, k, v, **opts)


@pytest.mark.parametrize("fn", sorted(FUNCS))
def test_error_baseline_is_valid(fn):
    """The base inputs accept valid versions of every option: errors come from the change."""
    q, k, v = _qkv()
    FUNCS[fn](
        q,
        k,
        v,
        mask=np.ones((8, 12), bool),
        bias=np.zeros((4, 8, 12), np.float32),
        alibi_slopes=np.ones(4),
        sinks=np.zeros(4),
        rel_bias=_T(np.zeros((32, 4))),
        block_layout=np.ones((4, 2, 3), bool),
        block_size=4,
    )
