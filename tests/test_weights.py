"""ferroattn.attention_weights against the reference softmax probabilities."""

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
    OUT_RTOL,
    assert_out_close,
    from_bhsd,
    random_inputs,
    reference_attention,
    reference_weights,
)

import ferroattn

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

CAUSALS = [False, True, "bottom_right", "top_left"]


def _f64(*xs):
    return [x.astype(np.float64) for x in xs]


def check_weights(
    rng, *, B=1, Hq=2, Hkv=None, Nq=8, Nk=8, D=16, dtype=F32, layout="bhsd", rank=4, **opts
):
    Hkv = Hq if Hkv is None else Hkv
    q, k, v = random_inputs(rng, (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, 5), dtype)
    exp = reference_weights(*_f64(q, k), **opts)
    args = [np.ascontiguousarray(from_bhsd(x, layout, rank)) for x in (q, k)]
    w = ferroattn.attention_weights(*args, layout=layout, **opts)
    exp_r = exp if rank == 4 else (exp[0] if rank == 3 else exp[0, 0])
    assert_out_close(w, exp_r, dtype)  # always head-major (B, Hq, Nq, Nk)
    w4 = w.astype(np.float64).reshape(exp.shape)
    # masked entries are exactly 0
    assert np.all(w4[exp == 0] == 0), "masked entries must be exactly 0"
    # rows sum to 1, or 0 for fully masked rows
    sums = w4.sum(axis=-1)
    expected_sums = exp.sum(axis=-1)
    np.testing.assert_allclose(sums, expected_sums, rtol=0, atol=OUT_RTOL[np.dtype(dtype)])
    assert np.all(sums[expected_sums == 0] == 0)
    return q, k, v, w


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 1, 1), (2, 4, 2, 9, 13, 8), (1, 6, 1, 17, 5, 32), (1, 2, 2, 70, 130, 64)],
    ids=str,
)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": True},
        {"causal": "top_left", "window": (2, 1)},
        {"window": 4, "softcap": 2.0},
        {"window": (-1, 3), "scale": 0.9},
        {"kv_lengths": "mixed", "causal": True},
    ],
    ids=str,
)
def test_weights_match_reference(rng, shape, opts):
    B, Hq, Hkv, Nq, Nk, D = shape
    opts = dict(opts)
    if opts.get("kv_lengths") == "mixed":
        opts["kv_lengths"] = list(rng.integers(0, Nk + 1, size=B))
    check_weights(rng, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, **opts)


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
def test_weights_dtypes(rng, dtype):
    _, _, _, w = check_weights(rng, B=2, Hq=2, Nq=7, Nk=9, dtype=dtype, causal=True)
    assert w.dtype == dtype


@pytest.mark.parametrize(
    "layout_rank",
    [("bhsd", 4), ("bshd", 4), ("bhsd", 3), ("bshd", 3), ("bhsd", 2)],
    ids=str,
)
def test_weights_layouts_are_head_major(rng, layout_rank):
    layout, rank = layout_rank
    B, Hq, Hkv = (2, 4, 2) if rank == 4 else ((1, 4, 2) if rank == 3 else (1, 1, 1))
    _, _, _, w = check_weights(
        rng, B=B, Hq=Hq, Hkv=Hkv, Nq=6, Nk=11, layout=layout, rank=rank, causal=True
    )
    expected = {4: (B, Hq, 6, 11), 3: (Hq, 6, 11), 2: (6, 11)}[rank]
    assert w.shape == expected


def test_fully_masked_rows_are_zero(rng):
    q, k, _ = random_inputs(rng, (2, 2, 8, 4), (2, 1, 3, 4), (2, 1, 3, 4))
    w = ferroattn.attention_weights(q, k, causal=True, kv_lengths=[3, 0])
    assert not np.isnan(w).any()
    assert np.all(w[0, :, :5] == 0)  # bottom-right: p = i - 5
    assert np.all(w[1] == 0)  # kv_lengths = 0
    np.testing.assert_allclose(w[0, :, 5:].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize(
    "opts",
    [{}, {"causal": True, "window": (3, 0)}, {"kv_lengths": [4, 0, 20], "softcap": 1.5}],
    ids=str,
)
def test_weights_times_v_equals_attention(rng, dtype, opts):
    B, Hq, Hkv, Nq, Nk = 3, 4, 2, 9, 20
    q, k, v = random_inputs(rng, (B, Hq, Nq, 16), (B, Hkv, Nk, 16), (B, Hkv, Nk, 8), dtype)
    w = ferroattn.attention_weights(q, k, **opts)
    out = ferroattn.attention(q, k, v, **opts)
    v_rep = np.repeat(v.astype(np.float64), Hq // Hkv, axis=1)  # h -> h // group
    wv = np.einsum("bhqk,bhkd->bhqd", w.astype(np.float64), v_rep)
    assert_out_close(out, wv, dtype, rtol=2 * OUT_RTOL[np.dtype(dtype)])
    exp, _ = reference_attention(*_f64(q, k, v), **opts)
    assert_out_close(out, exp, dtype)


def test_weights_non_contiguous(rng):
    q = rng.standard_normal((1, 2, 14, 16)).astype(np.float32)[:, :, ::-2]
    k = rng.standard_normal((1, 9, 2, 16)).astype(np.float32).transpose(0, 2, 1, 3)
    w = ferroattn.attention_weights(q, k, causal=True)
    exp = reference_weights(*_f64(q, k), causal=True)
    assert_out_close(w, exp, F32)


@given(
    seed=st.integers(0, 2**32 - 1),
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    Nq=st.integers(1, 40),
    Nk=st.one_of(st.integers(1, 40), st.sampled_from([64, 65, 130])),
    D=st.sampled_from([1, 3, 8, 32, 64]),
    causal=st.sampled_from(CAUSALS),
    window=st.one_of(
        st.none(),
        st.integers(1, 10),
        st.tuples(
            st.one_of(st.none(), st.just(-1), st.integers(0, 10)),
            st.one_of(st.none(), st.just(-1), st.integers(0, 10)),
        ),
    ),
    softcap=st.one_of(st.none(), st.floats(0.5, 20.0)),
    dtype=st.sampled_from([F32, F16, BF16, F64]),
    layout=st.sampled_from(["bhsd", "bshd"]),
)
def test_property_weights(seed, B, Hkv, group, Nq, Nk, D, causal, window, softcap, dtype, layout):
    check_weights(
        np.random.default_rng(seed),
        B=B,
        Hq=Hkv * group,
        Hkv=Hkv,
        Nq=Nq,
        Nk=Nk,
        D=D,
        dtype=dtype,
        layout=layout,
        causal=causal,
        window=window,
        softcap=softcap,
    )
