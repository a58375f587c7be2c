"""ferroattn.attention_varlen against per-sequence reference calls."""

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
    assert_lse_close,
    assert_out_close,
    reference_attention,
    reference_varlen,
)

import ferroattn

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _make(rng, q_lens, k_lens, Hq=4, Hkv=2, D=16, Dv=None, dtype=F32):
    Dv = D if Dv is None else Dv
    tq, tk = int(sum(q_lens)), int(sum(k_lens))

    def normal(s):
        return rng.standard_normal(s).astype(np.float32).astype(dtype)

    return normal((tq, Hq, D)), normal((tk, Hkv, D)), normal((tk, Hkv, Dv))


def check_varlen(rng, q_lens, k_lens, *, dtype=F32, Hq=4, Hkv=2, D=16, Dv=None, **opts):
    q, k, v = _make(rng, q_lens, k_lens, Hq, Hkv, D, Dv, dtype)
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    exp, exp_lse = reference_varlen(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        cu_q,
        cu_k,
        **opts,
    )
    res = ferroattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert_out_close(out, exp, dtype)
    assert_lse_close(lse, exp_lse)
    masked = np.isneginf(exp_lse)  # (Hq, total_q)
    assert np.all(out.astype(np.float64).transpose(1, 0, 2)[masked] == 0)
    return out, lse


LENGTHS = [
    ([5], [5]),
    ([3, 7, 1], [3, 7, 1]),
    ([4, 9, 2], [10, 3, 2]),  # Nq != Nk per sequence, both directions
    ([0, 5, 0, 3], [4, 0, 0, 6]),  # empty q, empty k, both empty
    ([70, 1, 130], [130, 65, 1]),  # multi-tile
    ([1, 1, 1, 1, 1], [17, 1, 33, 2, 64]),  # decode-like
]


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": True},
        {"causal": "top_left"},
        {"window": 3},
        {"window": (4, 1), "causal": "bottom_right"},
        {"window": (-1, 2)},
        {"softcap": 3.0, "scale": 0.4},
    ],
    ids=str,
)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_varlen_matches_reference(rng, lengths, opts):
    check_varlen(rng, *lengths, **opts)


@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=str)
def test_varlen_dtypes(rng, dtype):
    out, lse = check_varlen(rng, [6, 0, 40], [9, 4, 70], dtype=dtype, D=32, Dv=24, causal=True)
    assert out.dtype == dtype
    assert lse.dtype == np.float32


def test_varlen_shapes_and_gqa(rng):
    out, lse = check_varlen(rng, [3, 5], [4, 6], Hq=6, Hkv=1, D=8, Dv=3)
    assert out.shape == (8, 6, 3)
    assert lse.shape == (6, 8)


def test_varlen_empty_sequences_give_masked_rows(rng):
    """A sequence with queries but no keys: its rows are 0 with lse -inf."""
    out, lse = check_varlen(rng, [3, 4], [0, 5])
    assert np.all(out[:3] == 0)
    assert np.all(np.isneginf(lse[:, :3]))
    assert np.isfinite(lse[:, 3:]).all()


def test_varlen_all_queries_empty(rng):
    q, k, v = _make(rng, [0, 0], [3, 2])
    out, lse = ferroattn.attention_varlen(q, k, v, _cu([0, 0]), _cu([3, 2]), return_lse=True)
    assert out.shape == (0, 4, 16)
    assert lse.shape == (4, 0)


def test_varlen_equals_padded_attention(rng):
    """Each sequence equals a plain attention call on that slice."""
    q_lens, k_lens = [5, 8, 2], [7, 8, 11]
    q, k, v = _make(rng, q_lens, k_lens)
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    out = ferroattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, window=(3, 0))
    for s in range(3):
        qs = q[cu_q[s] : cu_q[s + 1]]
        ks, vs = k[cu_k[s] : cu_k[s + 1]], v[cu_k[s] : cu_k[s + 1]]
        one = ferroattn.attention(qs, ks, vs, layout="bshd", causal=True, window=(3, 0))
        exp, _ = reference_attention(
            *(x.astype(np.float64).transpose(1, 0, 2)[None] for x in (qs, ks, vs)),
            causal=True,
            window=(3, 0),
        )
        assert_out_close(one, exp[0].transpose(1, 0, 2), F32)
        assert_out_close(out[cu_q[s] : cu_q[s + 1]], exp[0].transpose(1, 0, 2), F32)


@pytest.mark.parametrize(
    "make",
    [list, lambda x: np.asarray(x, np.int64), lambda x: np.asarray(x, np.int32)],
    ids=["list", "int64", "int32"],
)
def test_varlen_cu_seqlens_array_likes(rng, make):
    q, k, v = _make(rng, [2, 3], [4, 1])
    exp, _ = reference_varlen(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        [0, 2, 5],
        [0, 4, 5],
    )
    out = ferroattn.attention_varlen(q, k, v, make([0, 2, 5]), make([0, 4, 5]))
    assert_out_close(out, exp, F32)


def test_varlen_out(rng):
    q, k, v = _make(rng, [3, 0, 6], [5, 2, 6], Dv=8)
    cu_q, cu_k = _cu([3, 0, 6]), _cu([5, 2, 6])
    big = np.full((9, 8, 10), 7.0, dtype=np.float32)
    out = big[:, ::2, 1:9]
    res, lse = ferroattn.attention_varlen(
        q, k, v, cu_q, cu_k, causal=True, out=out, return_lse=True
    )
    assert res is out
    exp, exp_lse = reference_varlen(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        cu_q,
        cu_k,
        causal=True,
    )
    assert_out_close(np.ascontiguousarray(out), exp, F32)
    assert_lse_close(lse, exp_lse)
    assert np.all(big[:, 1::2] == 7.0) and np.all(big[..., 0] == 7.0)
    assert np.all(big[..., 9] == 7.0)


def test_varlen_non_contiguous(rng):
    q = rng.standard_normal((12, 4, 32)).astype(np.float32)[::-1, :, ::2]
    k = rng.standard_normal((2, 9, 16)).astype(np.float32).transpose(1, 0, 2)
    v = rng.standard_normal((9, 2, 8)).astype(np.float32)[::-1]
    cu_q, cu_k = _cu([7, 5]), _cu([4, 5])
    exp, _ = reference_varlen(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        cu_q,
        cu_k,
        causal=True,
    )
    out = ferroattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert_out_close(out, exp, F32)


def test_varlen_nan_in_other_sequence_does_not_leak(rng):
    q, k, v = _make(rng, [4, 4], [5, 5])
    cu_q, cu_k = _cu([4, 4]), _cu([5, 5])
    exp, _ = reference_varlen(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), cu_q, cu_k
    )
    k[5:] = np.nan  # keys of sequence 1 only
    v[5:] = np.nan
    out = ferroattn.attention_varlen(q, k, v, cu_q, cu_k)
    assert not np.isnan(out[:4]).any()
    assert_out_close(np.ascontiguousarray(out[:4]), exp[:4], F32)


@st.composite
def varlen_cases(draw):
    S = draw(st.integers(1, 5))
    lens = st.one_of(st.integers(0, 12), st.sampled_from([31, 64, 65, 130]))
    q_lens = draw(st.lists(lens, min_size=S, max_size=S))
    k_lens = draw(st.lists(lens, min_size=S, max_size=S))
    Hkv = draw(st.integers(1, 3))
    opts = {
        "causal": draw(st.sampled_from([False, True, "bottom_right", "top_left"])),
        "window": draw(
            st.one_of(
                st.none(),
                st.integers(1, 20),
                st.tuples(
                    st.one_of(st.none(), st.just(-1), st.integers(0, 20)),
                    st.one_of(st.none(), st.just(-1), st.integers(0, 20)),
                ),
            )
        ),
    }
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 30.0))
    D = draw(st.sampled_from([1, 4, 7, 16, 32, 64]))
    return {
        "q_lens": q_lens,
        "k_lens": k_lens,
        "Hkv": Hkv,
        "Hq": Hkv * draw(st.integers(1, 3)),
        "D": D,
        "Dv": draw(st.sampled_from([D, 3, 8])),
        "dtype": draw(st.sampled_from([F32, F16, BF16])),
        **opts,
    }


@given(case=varlen_cases(), seed=st.integers(0, 2**32 - 1))
def test_property_varlen(case, seed):
    case = dict(case)
    q_lens, k_lens = case.pop("q_lens"), case.pop("k_lens")
    check_varlen(np.random.default_rng(seed), q_lens, k_lens, **case)
