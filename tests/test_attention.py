"""ferroattn.attention against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    BF16,
    F16,
    F32,
    F64,
    LSE_TOL,
    assert_lse_close,
    assert_masked_rows_zero,
    assert_out_close,
    from_bhsd,
    lse_to_rank,
    random_inputs,
    reference_attention,
    to_bhsd,
    visibility_mask,
)

import ferroattn

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

ALL_DTYPES = [F32, F16, BF16, F64]
CAUSALS = [False, True, "bottom_right", "top_left"]


def _ref(q, k, v, **opts):
    return reference_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), **opts
    )


def check_case(
    rng,
    *,
    B=1,
    Hq=2,
    Hkv=None,
    Nq=8,
    Nk=8,
    D=16,
    Dv=None,
    dtype=F32,
    layout="bhsd",
    rank=4,
    mag=1.0,
    rtol=None,
    lse_tol=LSE_TOL,
    **opts,
):
    """Random inputs -> ferroattn (with lse) vs reference; returns (out, lse)."""
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    q, k, v = random_inputs(rng, (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), dtype, mag)
    exp_out, exp_lse = _ref(q, k, v, **opts)
    args = [np.ascontiguousarray(from_bhsd(x, layout, rank)) for x in (q, k, v)]
    before = [a.copy() for a in args]
    res = ferroattn.attention(*args, layout=layout, return_lse=True, **opts)
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert_out_close(out, from_bhsd(exp_out, layout, rank), dtype, rtol)
    assert_lse_close(lse, lse_to_rank(exp_lse, rank), lse_tol)
    assert_masked_rows_zero(to_bhsd(out, layout), exp_lse)
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(a, b, err_msg="input was modified")
    return out, lse


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------

SHAPES = [
    # B, Hq, Hkv, Nq, Nk, D, Dv
    (1, 1, 1, 1, 1, 1, 1),
    (1, 1, 1, 1, 1, 7, 7),
    (2, 4, 4, 5, 7, 7, 7),  # MHA, odd sizes
    (2, 4, 2, 9, 13, 32, 32),  # GQA
    (1, 8, 1, 17, 9, 64, 64),  # MQA, Nq > Nk
    (1, 2, 1, 130, 130, 64, 64),  # more than one tile
    (1, 2, 2, 257, 257, 80, 80),
    (1, 1, 1, 1, 257, 128, 128),  # decode-like
    (1, 2, 1, 3, 130, 256, 256),
    (2, 3, 3, 7, 5, 32, 16),  # Dv < D
    (1, 2, 2, 33, 65, 16, 48),  # Dv > D
    (1, 1, 1, 64, 64, 1, 5),  # D = 1
    (1, 6, 2, 129, 1, 80, 80),  # Nk = 1
    (3, 6, 3, 31, 130, 7, 1),  # Dv = 1
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(rng, shape):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    check_case(rng, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv)


@pytest.mark.parametrize("shape", SHAPES[:8], ids=lambda s: "x".join(map(str, s)))
def test_shapes_causal(rng, shape):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    check_case(rng, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, causal=True)


def test_return_lse_false_gives_bare_array(rng):
    q, k, v = random_inputs(rng, (1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8))
    out = ferroattn.attention(q, k, v)
    assert isinstance(out, np.ndarray)
    out2, _ = ferroattn.attention(q, k, v, return_lse=True)
    exp, _ = _ref(q, k, v)
    assert_out_close(out, exp, F32)
    assert_out_close(out2, exp, F32)


def test_gqa_head_mapping(rng):
    """Query head h must read kv head h // (Hq // Hkv), not h % Hkv."""
    B, Hq, Hkv, N, D = 1, 6, 2, 5, 8
    q, k, v = random_inputs(rng, (B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, D))
    out = ferroattn.attention(q, k, v)
    group = Hq // Hkv
    for h in range(Hq):
        exp, _ = _ref(q[:, h : h + 1], k[:, h // group][:, None], v[:, h // group][:, None])
        assert_out_close(np.ascontiguousarray(out[:, h : h + 1]), exp, F32)


# --------------------------------------------------------------------------
# Options: causal / window / kv_lengths / softcap / scale
# --------------------------------------------------------------------------

WINDOWS = [
    None,
    1,
    4,
    (2, 0),
    (0, 3),
    (3, 5),
    (-1, 2),
    (2, -1),
    (None, 1),
    (1, None),
    (-1, -1),
    (0, 0),
    (None, None),
]


@pytest.mark.parametrize("use_kv_lengths", [False, True], ids=["full", "kvlen"])
@pytest.mark.parametrize("nq_nk", [(9, 13), (13, 9), (11, 11)], ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", CAUSALS, ids=str)
def test_mask_options(rng, causal, window, nq_nk, use_kv_lengths):
    Nq, Nk = nq_nk
    opts = {"causal": causal, "window": window}
    B = 1
    if use_kv_lengths:
        B = 4
        opts["kv_lengths"] = [0, Nk, int(rng.integers(1, Nk)), 1]
    check_case(rng, B=B, Hq=2, Hkv=1, Nq=Nq, Nk=Nk, D=8, Dv=5, **opts)


@pytest.mark.parametrize("Nk", [64, 65, 130, 257])
@pytest.mark.parametrize("window", [None, 16, (40, 3), (-1, 7), (70, -1)], ids=str)
@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=str)
def test_mask_options_multi_tile(rng, causal, window, Nk):
    B = 3
    kvl = [Nk, Nk // 2 + 1, Nk - 63 if Nk > 63 else 1]
    check_case(
        rng,
        B=B,
        Hq=2,
        Hkv=2,
        Nq=70,
        Nk=Nk,
        D=32,
        causal=causal,
        window=window,
        kv_lengths=kvl,
    )


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("Nk", [2047, 2052, 5000])
@pytest.mark.parametrize(
    "opts",
    [{}, {"softcap": 5.0}, {"window": 3001}, {"kv_lengths": [4099, 2]}, {"Dv": 48}],
    ids=["plain", "softcap", "window", "kvlen", "dv48"],
)
def test_one_query_per_kv_head_over_long_keys(rng, dtype, Nk, opts):
    # A task of one row (no GQA, one query) with float keys reads them in runs of 2048: runs
    # that end inside the keys, a short last run, a window start inside a run, a key width
    # that is not a multiple of the vector, keys cut short by kv_lengths, and a value width
    # the path does not take (48: the tiles of the general path).
    opts = dict(opts)
    Dv = opts.pop("Dv", 64)
    if "kv_lengths" in opts:
        opts["kv_lengths"] = [min(n, Nk) for n in opts["kv_lengths"]]
    check_case(rng, B=2, Hq=3, Nq=1, Nk=Nk, D=72, Dv=Dv, dtype=dtype, **opts)


@pytest.mark.parametrize("softcap", [None, 0.5, 5.0, 30.0], ids=str)
@pytest.mark.parametrize("scale", [None, 0.05, 1.7, 0.0, -0.5], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=str)
def test_softcap_and_scale(rng, softcap, scale, causal):
    check_case(
        rng,
        B=2,
        Hq=4,
        Hkv=2,
        Nq=12,
        Nk=19,
        D=16,
        Dv=8,
        mag=2.0,
        softcap=softcap,
        scale=scale,
        causal=causal,
    )


def test_scale_default_is_inverse_sqrt_d(rng):
    q, k, v = random_inputs(rng, (1, 2, 9, 20), (1, 2, 11, 20), (1, 2, 11, 20))
    a = ferroattn.attention(q, k, v)
    b = ferroattn.attention(q, k, v, scale=1.0 / np.sqrt(20))
    c = ferroattn.attention(q, k, v, scale=1.0)
    exp, _ = _ref(q, k, v, scale=1.0)
    assert_out_close(a, b.astype(np.float64), F32)
    assert_out_close(c, exp, F32)
    assert np.abs(a - c).max() > 1e-3  # the default is not scale=1


def test_causal_true_equals_bottom_right(rng):
    q, k, v = random_inputs(rng, (2, 2, 7, 8), (2, 2, 12, 8), (2, 2, 12, 8))
    a = ferroattn.attention(q, k, v, causal=True)
    b = ferroattn.attention(q, k, v, causal="bottom_right")
    c = ferroattn.attention(q, k, v, causal="top_left")
    assert_out_close(a, b.astype(np.float64), F32)
    # with Nq != Nk the alignments differ
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize(
    "make",
    [
        list,
        tuple,
        lambda x: np.asarray(x, dtype=np.int32),
        lambda x: np.asarray(x, dtype=np.int64),
        lambda x: np.asarray(x, dtype=np.uint32),
    ],
    ids=["list", "tuple", "int32", "int64", "uint32"],
)
def test_kv_lengths_array_likes(rng, make):
    B, Nk = 4, 11
    kvl = [3, 0, Nk, 7]
    q, k, v = random_inputs(rng, (B, 2, 5, 8), (B, 1, Nk, 8), (B, 1, Nk, 8))
    exp, exp_lse = _ref(q, k, v, kv_lengths=kvl, causal=True)
    out, lse = ferroattn.attention(q, k, v, kv_lengths=make(kvl), causal=True, return_lse=True)
    assert_out_close(out, exp, F32)
    assert_lse_close(lse, exp_lse)


def test_kv_lengths_ignores_keys_beyond_length(rng):
    """Garbage (huge values) past kv_lengths must not leak into the output."""
    B, Nk = 2, 20
    kvl = [5, 13]
    q, k, v = random_inputs(rng, (B, 2, 6, 8), (B, 2, Nk, 8), (B, 2, Nk, 8))
    exp, _ = _ref(q, k, v, kv_lengths=kvl)
    for b, n in enumerate(kvl):
        k[b, :, n:] = 1e4
        v[b, :, n:] = -1e4
    out = ferroattn.attention(q, k, v, kv_lengths=kvl)
    assert_out_close(out, exp, F32)


# --------------------------------------------------------------------------
# Fully masked rows
# --------------------------------------------------------------------------


def _assert_rows_masked(out, lse, rows):
    """out[..., rows, :] == 0 and lse[..., rows] == -inf, everything else finite."""
    assert np.all(out[..., rows, :] == 0)
    assert np.all(np.isneginf(lse[..., rows]))
    assert not np.isnan(out).any()
    assert not np.isnan(lse).any()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_bottom_right_more_queries_than_keys(rng, dtype):
    Nq, Nk = 10, 4
    q, k, v = random_inputs(rng, (1, 2, Nq, 8), (1, 2, Nk, 8), (1, 2, Nk, 8), dtype)
    out, lse = ferroattn.attention(q, k, v, causal=True, return_lse=True)
    # p = i - 6: rows 0..5 see nothing
    _assert_rows_masked(out, lse, slice(0, Nq - Nk))
    exp, exp_lse = _ref(q, k, v, causal=True)
    assert_out_close(out, exp, dtype)
    assert_lse_close(lse, exp_lse)
    # top-left alignment: every row sees key 0
    out, lse = ferroattn.attention(q, k, v, causal="top_left", return_lse=True)
    assert np.isfinite(lse).all()
    exp, exp_lse = _ref(q, k, v, causal="top_left")
    assert_out_close(out, exp, dtype)
    assert_lse_close(lse, exp_lse)


def test_window_without_causal_masks_leading_rows(rng):
    Nq, Nk = 10, 3
    q, k, v = random_inputs(rng, (1, 1, Nq, 4), (1, 1, Nk, 4), (1, 1, Nk, 4))
    out, lse = ferroattn.attention(q, k, v, window=(2, 0), return_lse=True)
    # p = i - 7 -> rows with p < 0 see nothing
    _assert_rows_masked(out, lse, slice(0, 7))
    exp, exp_lse = _ref(q, k, v, window=(2, 0))
    assert_out_close(out, exp, F32)
    assert_lse_close(lse, exp_lse)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_kv_lengths_zero_everything_masked(rng, dtype):
    q, k, v = random_inputs(rng, (2, 2, 5, 8), (2, 1, 6, 8), (2, 1, 6, 3), dtype)
    out, lse = ferroattn.attention(q, k, v, kv_lengths=[0, 0], return_lse=True)
    assert out.dtype == dtype and out.shape == (2, 2, 5, 3)
    _assert_rows_masked(out, lse, slice(None))
    assert lse.shape == (2, 2, 5)


def test_masked_rows_overwrite_out(rng):
    """Fully masked rows must be written as 0 into a NaN-filled out=."""
    q, k, v = random_inputs(rng, (2, 2, 9, 8), (2, 2, 4, 8), (2, 2, 4, 8))
    out = np.full((2, 2, 9, 8), np.nan, dtype=np.float32)
    res, lse = ferroattn.attention(
        q, k, v, causal=True, kv_lengths=[4, 0], out=out, return_lse=True
    )
    assert res is out
    exp, exp_lse = _ref(q, k, v, causal=True, kv_lengths=[4, 0])
    assert_out_close(out, exp, F32)
    assert_masked_rows_zero(out, exp_lse)
    assert_lse_close(lse, exp_lse)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": True},
        {"causal": "top_left", "window": (3, 1), "softcap": 4.0},
        {"window": 5, "kv_lengths": [7, 30], "scale": 0.3},
    ],
    ids=["plain", "causal", "topleft-window-softcap", "window-kvlen-scale"],
)
@pytest.mark.parametrize("shape", [(2, 4, 2, 13, 30, 32, 24), (2, 2, 1, 70, 130, 64, 64)])
def test_dtypes(rng, dtype, opts, shape):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    check_case(rng, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype, **opts)


def test_float64_is_computed_and_returned_as_float64(rng):
    q, k, v = (rng.standard_normal((1, 2, 6, 8)) for _ in range(3))
    out, lse = ferroattn.attention(q, k, v, return_lse=True)
    assert out.dtype == np.float64
    assert lse.dtype == np.float32
    exp, exp_lse = _ref(q, k, v)
    assert_out_close(out, exp, F64)
    assert_lse_close(lse, exp_lse)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_half_precision_uses_float32_accumulation(rng, dtype):
    """Long rows: a half-precision accumulator would blow the tolerance."""
    Nk, D = 1024, 128
    q, k, v = random_inputs(rng, (1, 1, 4, D), (1, 1, Nk, D), (1, 1, Nk, D), dtype)
    v = (np.abs(v.astype(np.float32)) + 1).astype(dtype)  # mean far from 0
    exp, exp_lse = _ref(q, k, v)
    out, lse = ferroattn.attention(q, k, v, return_lse=True)
    assert_out_close(out, exp, dtype)
    assert_lse_close(lse, exp_lse)


# --------------------------------------------------------------------------
# Layouts and ranks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize(
    "layout_rank",
    [("bhsd", 4), ("bshd", 4), ("bhsd", 3), ("bshd", 3), ("bhsd", 2)],
    ids=str,
)
@pytest.mark.parametrize("causal", [False, True], ids=str)
def test_layouts_and_ranks(rng, layout_rank, causal, dtype):
    layout, rank = layout_rank
    B = 2 if rank == 4 else 1
    Hq, Hkv = (4, 2) if rank >= 3 else (1, 1)
    out, lse = check_case(
        rng,
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Nq=11,
        Nk=17,
        D=16,
        Dv=12,
        layout=layout,
        rank=rank,
        causal=causal,
        dtype=dtype,
    )
    assert out.ndim == rank
    expected_out_shape = {
        ("bhsd", 4): (B, Hq, 11, 12),
        ("bshd", 4): (B, 11, Hq, 12),
        ("bhsd", 3): (Hq, 11, 12),
        ("bshd", 3): (11, Hq, 12),
        ("bhsd", 2): (11, 12),
    }[layout_rank]
    assert out.shape == expected_out_shape
    expected_lse_shape = {4: (B, Hq, 11), 3: (Hq, 11), 2: (11,)}[rank]
    assert lse.shape == expected_lse_shape


def test_bshd_matches_bhsd(rng):
    q, k, v = random_inputs(rng, (2, 11, 4, 16), (2, 7, 2, 16), (2, 7, 2, 8))
    a, la = ferroattn.attention(q, k, v, layout="bshd", causal=True, return_lse=True)
    t = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
    b, lb = ferroattn.attention(*t, causal=True, return_lse=True)
    assert a.shape == (2, 11, 4, 8)
    assert_out_close(a.transpose(0, 2, 1, 3), b.astype(np.float64), F32)
    assert_lse_close(la, lb.astype(np.float64))


def test_default_layout_is_bhsd(rng):
    q, k, v = random_inputs(rng, (1, 3, 5, 8), (1, 3, 9, 8), (1, 3, 9, 8))
    a = ferroattn.attention(q, k, v)
    b = ferroattn.attention(q, k, v, layout="bhsd")
    assert_out_close(a, b.astype(np.float64), F32)


# --------------------------------------------------------------------------
# Memory layouts of the inputs
# --------------------------------------------------------------------------


def _view(kind, rng, shape, dtype):
    """An array of `shape` whose memory layout is of the given kind."""
    B, H, N, D = shape

    def normal(s):
        return rng.standard_normal(s).astype(np.float32).astype(dtype)

    if kind == "contiguous":
        return normal(shape)
    if kind == "reversed_seq":
        return normal(shape)[:, :, ::-1]
    if kind == "reversed_all":
        return normal(shape)[::-1, ::-1, ::-1, ::-1]
    if kind == "reversed_d":
        return normal(shape)[..., ::-1]
    if kind == "step2":
        return normal((B, 2 * H, 2 * N, 2 * D))[:, ::2, ::2, ::2]
    if kind == "step2_negative":
        return normal((B, H, 2 * N, 2 * D))[:, :, ::-2, ::-2]
    if kind == "transposed":  # stored as (B, N, H, D)
        return normal((B, N, H, D)).transpose(0, 2, 1, 3)
    if kind == "fortran":
        return np.asfortranarray(normal(shape))
    if kind == "offset_slice":
        return normal((B + 1, H + 1, N + 3, D + 5))[1:, :-1, 2:-1, 3:-2]
    raise AssertionError(kind)


VIEW_KINDS = [
    "contiguous",
    "reversed_seq",
    "reversed_all",
    "reversed_d",
    "step2",
    "step2_negative",
    "transposed",
    "fortran",
    "offset_slice",
]


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_non_contiguous_inputs(rng, kind, dtype):
    q = _view(kind, rng, (2, 4, 9, 16), dtype)
    k = _view(kind, rng, (2, 2, 70, 16), dtype)
    v = _view(kind, rng, (2, 2, 70, 12), dtype)
    assert q.shape == (2, 4, 9, 16) and v.shape == (2, 2, 70, 12)
    copies = [x.copy() for x in (q, k, v)]
    out, lse = ferroattn.attention(q, k, v, causal=True, return_lse=True)
    exp, exp_lse = _ref(*copies, causal=True)
    assert_out_close(out, exp, dtype)
    assert_lse_close(lse, exp_lse)
    for x, c in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(x, c)


def test_mixed_memory_layouts(rng):
    q = _view("reversed_seq", rng, (1, 4, 33, 24), F32)
    k = _view("step2_negative", rng, (1, 2, 40, 24), F32)
    v = _view("transposed", rng, (1, 2, 40, 8), F32)
    out, lse = ferroattn.attention(q, k, v, window=(5, 2), kv_lengths=[31], return_lse=True)
    exp, exp_lse = _ref(q, k, v, window=(5, 2), kv_lengths=[31])
    assert_out_close(out, exp, F32)
    assert_lse_close(lse, exp_lse)


def test_non_contiguous_bshd(rng):
    base = rng.standard_normal((2, 4, 14, 16)).astype(np.float32)  # (B, H, N, D)
    q = base.transpose(0, 2, 1, 3)[:, ::-1]  # (B, N, H, D) view, reversed N
    k = np.asfortranarray(rng.standard_normal((2, 9, 2, 16)).astype(np.float32))
    v = rng.standard_normal((2, 18, 2, 20)).astype(np.float32)[:, ::2, :, ::2]
    out = ferroattn.attention(q, k, v, layout="bshd", causal=True)
    t = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
    exp, _ = _ref(*t, causal=True)
    assert_out_close(out, exp.transpose(0, 2, 1, 3), F32)


def test_broadcast_zero_stride_inputs(rng):
    """Zero strides (np.broadcast_to) are just another non-contiguous layout."""
    kb = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)
    vb = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)
    k = np.broadcast_to(kb, (3, 2, 12, 8))
    v = np.broadcast_to(vb, (3, 2, 12, 8))
    q = rng.standard_normal((3, 2, 5, 8)).astype(np.float32)
    out = ferroattn.attention(q, k, v)
    exp, _ = _ref(q, np.array(k), np.array(v))
    assert_out_close(out, exp, F32)


# --------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
def test_out_contiguous(rng, dtype):
    q, k, v = random_inputs(rng, (2, 4, 9, 16), (2, 2, 13, 16), (2, 2, 13, 8), dtype)
    out = np.empty((2, 4, 9, 8), dtype=dtype)
    res = ferroattn.attention(q, k, v, causal=True, out=out)
    assert res is out
    exp, _ = _ref(q, k, v, causal=True)
    assert_out_close(out, exp, dtype)


def test_out_with_return_lse(rng):
    q, k, v = random_inputs(rng, (1, 2, 9, 16), (1, 2, 13, 16), (1, 2, 13, 16))
    out = np.empty_like(q)
    res, lse = ferroattn.attention(q, k, v, out=out, return_lse=True)
    assert res is out
    exp, exp_lse = _ref(q, k, v)
    assert_out_close(out, exp, F32)
    assert_lse_close(lse, exp_lse)


@pytest.mark.parametrize("negative", [False, True], ids=["pos", "neg"])
def test_out_strided_view_into_bigger_array(rng, negative):
    B, Hq, Nq, Dv = 2, 4, 9, 8
    q, k, v = random_inputs(rng, (B, Hq, Nq, 16), (B, 2, 70, 16), (B, 2, 70, Dv))
    sentinel = 12345.0
    big = np.full((B, Hq + 1, 2 * Nq, Dv + 3), sentinel, dtype=np.float32)
    out = big[:, 1:, ::2, 1 : Dv + 1]
    if negative:
        out = out[:, ::-1, :, ::-1]
    assert out.shape == (B, Hq, Nq, Dv) and not out.flags.c_contiguous
    res = ferroattn.attention(q, k, v, causal=True, kv_lengths=[70, 3], out=out)
    assert res is out
    exp, _ = _ref(q, k, v, causal=True, kv_lengths=[70, 3])
    assert_out_close(np.ascontiguousarray(out), exp, F32)
    untouched = np.ones(big.shape, dtype=bool)
    untouched[:, 1:, ::2, 1 : Dv + 1] = False
    assert np.all(big[untouched] == sentinel), "out= wrote outside its view"


@pytest.mark.parametrize(
    "layout_rank", [("bshd", 4), ("bhsd", 3), ("bshd", 3), ("bhsd", 2)], ids=str
)
def test_out_other_layouts_and_ranks(rng, layout_rank):
    layout, rank = layout_rank
    B, Hq, Hkv = (2, 4, 2) if rank == 4 else ((1, 4, 2) if rank == 3 else (1, 1, 1))
    q, k, v = random_inputs(rng, (B, Hq, 7, 8), (B, Hkv, 10, 8), (B, Hkv, 10, 6))
    exp, _ = _ref(q, k, v, causal=True)
    args = [np.ascontiguousarray(from_bhsd(x, layout, rank)) for x in (q, k, v)]
    exp = from_bhsd(exp, layout, rank)
    out = np.empty(exp.shape, dtype=np.float32)
    res = ferroattn.attention(*args, layout=layout, causal=True, out=out)
    assert res is out
    assert_out_close(out, exp, F32)


# --------------------------------------------------------------------------
# NaN isolation
# --------------------------------------------------------------------------


def test_nan_in_query_row_stays_in_that_row(rng):
    q, k, v = random_inputs(rng, (2, 4, 9, 16), (2, 2, 70, 16), (2, 2, 70, 8))
    exp, _ = _ref(q, k, v, causal=True)
    qn = q.copy()
    qn[1, 2, 4, 3] = np.nan
    out = ferroattn.attention(qn, k, v, causal=True)
    assert np.isnan(out[1, 2, 4]).all()
    keep = np.ones(out.shape[:3], dtype=bool)
    keep[1, 2, 4] = False
    assert not np.isnan(out[keep]).any()
    got = np.where(keep[..., None], out, 0.0)
    want = np.where(keep[..., None], exp, 0.0)
    assert_out_close(got.astype(np.float32), want, F32)


@pytest.mark.parametrize("where", ["k", "v", "kv"])
def test_nan_beyond_kv_lengths_is_ignored(rng, where):
    B, Nk = 3, 70
    kvl = [5, 64, 0]
    q, k, v = random_inputs(rng, (B, 2, 9, 16), (B, 1, Nk, 16), (B, 1, Nk, 8))
    exp, exp_lse = _ref(q, k, v, kv_lengths=kvl)
    for b, n in enumerate(kvl):
        if "k" in where:
            k[b, :, n:] = np.nan
        if "v" in where:
            v[b, :, n:] = np.nan
    out, lse = ferroattn.attention(q, k, v, kv_lengths=kvl, return_lse=True)
    assert_out_close(out, exp, F32)
    assert_lse_close(lse, exp_lse)


@pytest.mark.parametrize("where", ["k", "v", "kv"])
@pytest.mark.parametrize(
    "opts",
    [{"causal": True}, {"causal": "top_left"}, {"window": (1, 0)}, {"window": (0, 2)}],
    ids=str,
)
@pytest.mark.parametrize("Nk", [12, 130])
def test_nan_in_masked_key_does_not_leak(rng, opts, where, Nk):
    B, Hq, Hkv, Nq = 1, 4, 2, 12
    q, k, v = random_inputs(rng, (B, Hq, Nq, 16), (B, Hkv, Nk, 16), (B, Hkv, Nk, 8))
    exp, _ = _ref(q, k, v, **opts)
    bad_j = [0, 5, Nk - 1]
    for j in bad_j:
        if "k" in where:
            k[0, 0, j, 1] = np.nan
        if "v" in where:
            v[0, 0, j, 2] = np.nan
    out = ferroattn.attention(q, k, v, **opts)
    mask = visibility_mask(Nq, Nk, Nk, **opts)
    sees_bad = mask[:, bad_j].any(axis=1)  # (Nq,)
    group = Hq // Hkv
    affected = np.zeros((B, Hq, Nq), dtype=bool)
    for h in range(Hq):
        if h // group == 0:
            affected[0, h] = sees_bad
    assert (~affected).any()
    keep = ~affected
    assert not np.isnan(out[keep]).any(), "NaN leaked from a masked key"
    got = np.where(keep[..., None], out, 0.0).astype(np.float32)
    want = np.where(keep[..., None], exp, 0.0)
    assert_out_close(got, want, F32)


# --------------------------------------------------------------------------
# Large magnitudes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"softcap": 50.0}], ids=str)
def test_large_scores_no_overflow(rng, dtype, opts):
    """Scores of O(100..1000) overflow a naive exp; results must still match.

    The float32 tolerance is loosened (1e-4) because a float32 dot product of
    this magnitude carries an absolute score error of ~1e-5, which softmax
    turns into a relative weight error of the same size.
    """
    q, k, v = random_inputs(rng, (1, 2, 40, 64), (1, 2, 130, 64), (1, 2, 130, 16), dtype)
    q = (q.astype(np.float32) * 100).astype(dtype)
    exp, exp_lse = _ref(q, k, v, **opts)
    assert np.nanmax(np.abs(exp_lse)) > 40  # the scores really are large
    out, lse = ferroattn.attention(q, k, v, return_lse=True, **opts)
    assert np.isfinite(out.astype(np.float64)).all()
    assert np.isfinite(lse).all()
    rtol = 1e-4 if dtype == F32 else None
    assert_out_close(out, exp, dtype, rtol=rtol)
    assert_lse_close(lse, exp_lse)


def test_large_negative_scores_no_underflow_to_nan(rng):
    """All scores hugely negative: exp underflows without max subtraction."""
    q = np.ones((1, 1, 3, 8), dtype=np.float32) * 100
    k = -np.abs(rng.standard_normal((1, 1, 20, 8))).astype(np.float32) * 100 - 10
    v = rng.standard_normal((1, 1, 20, 4)).astype(np.float32)
    exp, exp_lse = _ref(q, k, v)
    out, lse = ferroattn.attention(q, k, v, return_lse=True)
    assert np.isfinite(out).all()
    assert_out_close(out, exp, F32, rtol=1e-4)
    assert_lse_close(lse, exp_lse)


# --------------------------------------------------------------------------
# Property-based
# --------------------------------------------------------------------------

SEQ = st.one_of(st.integers(1, 20), st.sampled_from([31, 32, 33, 63, 64, 65, 127, 128, 129, 130]))
DIMS = st.sampled_from([1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 64, 80, 96, 128])
SIDE = st.one_of(st.none(), st.just(-1), st.integers(0, 40))
WINDOW = st.one_of(st.none(), st.integers(1, 40), st.tuples(SIDE, SIDE))


@st.composite
def attention_cases(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    Nq, Nk = draw(SEQ), draw(SEQ)
    D = draw(DIMS)
    Dv = draw(st.one_of(st.just(D), DIMS))
    layout = draw(st.sampled_from(["bhsd", "bshd"]))
    ranks = [4]
    if B == 1:
        ranks.append(3)
        if Hq == 1 and layout == "bhsd":
            ranks.append(2)
    rank = draw(st.sampled_from(ranks))
    opts = {
        "causal": draw(st.sampled_from(CAUSALS)),
        "window": draw(WINDOW),
    }
    if rank == 4 and draw(st.booleans()):
        opts["kv_lengths"] = draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.25, 60.0))
    if draw(st.booleans()):
        # keep |scores| moderate so the float32 tolerance stays meaningful
        opts["scale"] = draw(st.floats(-2.0, 2.0)) / np.sqrt(D)
    return {
        "B": B,
        "Hq": Hq,
        "Hkv": Hkv,
        "Nq": Nq,
        "Nk": Nk,
        "D": D,
        "Dv": Dv,
        "layout": layout,
        "rank": rank,
        "dtype": draw(st.sampled_from(ALL_DTYPES)),
        "mag": draw(st.sampled_from([0.1, 1.0, 2.0])),
        **opts,
    }


@given(case=attention_cases(), seed=st.integers(0, 2**32 - 1))
def test_property_matches_reference(case, seed):
    check_case(np.random.default_rng(seed), **case)
