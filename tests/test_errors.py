"""Every documented error path: exception type and the argument named in the message."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ferroattn

QKV = r"\b[qkv]\b"  # shape errors must name at least one of q, k, v


def _qkv(B=2, Hq=4, Hkv=2, Nq=5, Nk=6, D=8, Dv=8, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((B, Hq, Nq, D)).astype(dtype),
        rng.standard_normal((B, Hkv, Nk, D)).astype(dtype),
        rng.standard_normal((B, Hkv, Nk, Dv)).astype(dtype),
    )


def _z(*shape):
    return np.zeros(shape, dtype=np.float32)


def test_valid_baseline_works():
    """The base inputs used below are valid: errors come from the one change."""
    q, k, v = _qkv()
    out = ferroattn.attention(q, k, v, kv_lengths=[3, 6], window=(1, 1), softcap=2.0)
    assert out.shape == (2, 4, 5, 8)


# --------------------------------------------------------------------------
# Shape errors
# --------------------------------------------------------------------------

SHAPE_CASES = {
    "rank1": (_z(8), _z(8), _z(8)),
    "rank5": (_z(1, 1, 2, 3, 4), _z(1, 1, 2, 3, 4), _z(1, 1, 2, 3, 4)),
    "rank_mismatch_k": (_z(1, 2, 3, 4), _z(2, 3, 4), _z(1, 2, 3, 4)),
    "rank_mismatch_v": (_z(2, 3, 4), _z(2, 3, 4), _z(3, 4)),
    "batch_mismatch_k": (_z(2, 2, 3, 4), _z(3, 2, 3, 4), _z(3, 2, 3, 4)),
    "batch_mismatch_v": (_z(2, 2, 3, 4), _z(2, 2, 3, 4), _z(1, 2, 3, 4)),
    "d_mismatch": (_z(1, 2, 3, 4), _z(1, 2, 3, 5), _z(1, 2, 3, 4)),
    "kv_heads_mismatch": (_z(1, 4, 3, 4), _z(1, 2, 3, 4), _z(1, 1, 3, 4)),
    "kv_len_mismatch": (_z(1, 2, 3, 4), _z(1, 2, 3, 4), _z(1, 2, 5, 4)),
    "hq_not_multiple": (_z(1, 4, 3, 4), _z(1, 3, 3, 4), _z(1, 3, 3, 4)),
    "hkv_gt_hq": (_z(1, 2, 3, 4), _z(1, 4, 3, 4), _z(1, 4, 3, 4)),
    "zero_d": (_z(1, 2, 3, 0), _z(1, 2, 3, 0), _z(1, 2, 3, 4)),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_shape_errors(name):
    q, k, v = SHAPE_CASES[name]
    with pytest.raises(ValueError, match=QKV):
        ferroattn.attention(q, k, v)


def test_shape_errors_bshd():
    # heads on axis 2 in bshd: Hq = 3, Hkv = 2 -> not a multiple
    with pytest.raises(ValueError, match=QKV):
        ferroattn.attention(_z(1, 5, 3, 4), _z(1, 5, 2, 4), _z(1, 5, 2, 4), layout="bshd")
    # k/v length mismatch on axis 1
    with pytest.raises(ValueError, match=QKV):
        ferroattn.attention(_z(1, 5, 2, 4), _z(1, 5, 2, 4), _z(1, 6, 2, 4), layout="bshd")


# --------------------------------------------------------------------------
# Option errors
# --------------------------------------------------------------------------

OPTION_CASES = [
    ("kv_lengths", [3]),
    ("kv_lengths", [3, 3, 3]),
    ("kv_lengths", [[3, 3]]),
    ("kv_lengths", [-1, 3]),
    ("kv_lengths", [3, 7]),
    ("kv_lengths", np.array([1.5, 2.0])),
    ("kv_lengths", [1.0, 2.0]),
    ("window", 0),
    ("window", -1),
    ("window", -5),
    ("window", (-2, 0)),
    ("window", (0, -3)),
    ("window", (1, 2, 3)),
    ("window", (1,)),
    ("window", ()),
    ("softcap", 0.0),
    ("softcap", -1.0),
    ("softcap", float("nan")),
    ("softcap", float("inf")),
    ("scale", float("nan")),
    ("scale", float("inf")),
    ("scale", float("-inf")),
    ("layout", "bsdh"),
    ("layout", ""),
    ("layout", "sbhd"),
    ("causal", "top"),
    ("causal", "bottom-right"),
    ("causal", ""),
]


@pytest.mark.parametrize("arg,value", OPTION_CASES, ids=str)
def test_option_errors(arg, value):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=arg):
        ferroattn.attention(q, k, v, **{arg: value})


@pytest.mark.parametrize("arg,value", OPTION_CASES, ids=str)
def test_option_errors_weights(arg, value):
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=arg):
        ferroattn.attention_weights(q, k, **{arg: value})


@pytest.mark.parametrize(
    "arg,value",
    [(a, v) for a, v in OPTION_CASES if a in ("window", "softcap", "scale", "causal")],
    ids=str,
)
def test_option_errors_varlen(arg, value):
    q, k, v = _z(5, 2, 4), _z(6, 1, 4), _z(6, 1, 4)
    with pytest.raises(ValueError, match=arg):
        ferroattn.attention_varlen(q, k, v, [0, 2, 5], [0, 3, 6], **{arg: value})


# --------------------------------------------------------------------------
# dtype / type errors
# --------------------------------------------------------------------------

BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_bad_dtype_is_type_error(dtype):
    q, k, v = (np.zeros((1, 2, 3, 4), dtype=dtype) for _ in range(3))
    with pytest.raises(TypeError):
        ferroattn.attention(q, k, v)
    with pytest.raises(TypeError):
        ferroattn.attention_weights(q, k)
    with pytest.raises(TypeError):
        ferroattn.attention_varlen(q[0], k[0], v[0], [0, 2], [0, 2])


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("other", [np.float16, ml_dtypes.bfloat16, np.float64, np.int32], ids=str)
def test_mixed_dtypes_is_type_error(which, other):
    arrays = list(_qkv())
    arrays[which] = arrays[which].astype(other)
    with pytest.raises(TypeError):
        ferroattn.attention(*arrays)


def test_mixed_dtypes_weights_and_varlen():
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        ferroattn.attention_weights(q, k.astype(np.float16))
    with pytest.raises(TypeError):
        ferroattn.attention_varlen(
            q[0].transpose(1, 0, 2),
            k[0].transpose(1, 0, 2),
            v[0].transpose(1, 0, 2).astype(np.float64),
            [0, 5],
            [0, 6],
        )


@pytest.mark.parametrize("junk", ["abc", None, 3.0, object()], ids=repr)
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_array_junk_is_type_error(junk, which):
    arrays = list(_qkv())
    arrays[which] = junk
    with pytest.raises(TypeError):
        ferroattn.attention(*arrays)


def test_non_array_junk_weights_and_varlen():
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        ferroattn.attention_weights("abc", k)
    with pytest.raises(TypeError):
        ferroattn.attention_varlen("abc", k[0], v[0], [0, 2], [0, 2])


# --------------------------------------------------------------------------
# out= errors
# --------------------------------------------------------------------------


def test_out_wrong_dtype():
    q, k, v = _qkv()
    for dt in (np.float64, np.float16, np.int32):
        with pytest.raises(TypeError, match="out"):
            ferroattn.attention(q, k, v, out=np.empty((2, 4, 5, 8), dtype=dt))


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (2, 4, 8, 5), (1, 4, 5, 8), (2, 4, 5, 8, 1)])
def test_out_wrong_shape(shape):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="out"):
        ferroattn.attention(q, k, v, out=np.empty(shape, dtype=np.float32))


def test_out_wrong_shape_layout():
    """For bshd the output is (B, N, H, Dv); a bhsd-shaped out is wrong."""
    q, k, v = (x.transpose(0, 2, 1, 3).copy() for x in _qkv(Hq=2, Hkv=2, Nq=3, Nk=3))
    with pytest.raises(ValueError, match="out"):
        ferroattn.attention(q, k, v, layout="bshd", out=np.empty((2, 2, 3, 8), np.float32))


def test_out_read_only():
    q, k, v = _qkv()
    out = np.empty((2, 4, 5, 8), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        ferroattn.attention(q, k, v, out=out)


@pytest.mark.parametrize("which", ["q", "k", "v", "q_view", "v_reversed"])
def test_out_overlapping_inputs(which):
    q, k, v = _qkv(Hq=2, Hkv=2, Nq=6, Nk=6)
    if which in ("q", "k", "v"):
        out = {"q": q, "k": k, "v": v}[which]
    elif which == "q_view":
        big = np.zeros((2, 2, 7, 8), dtype=np.float32)
        q = big[:, :, :6]
        out = big[:, :, 1:]  # overlaps q by 5 rows
    else:
        out = v[:, :, ::-1]
    q_before = q.copy()
    with pytest.raises(ValueError, match="out"):
        ferroattn.attention(q, k, v, out=out)
    np.testing.assert_array_equal(q, q_before)


def test_out_errors_varlen():
    q, k, v = _z(5, 2, 4), _z(6, 1, 4), _z(6, 1, 3)
    args = (q, k, v, [0, 2, 5], [0, 3, 6])
    with pytest.raises(TypeError, match="out"):
        ferroattn.attention_varlen(*args, out=np.empty((5, 2, 3), np.float64))
    with pytest.raises(ValueError, match="out"):
        ferroattn.attention_varlen(*args, out=np.empty((5, 2, 4), np.float32))
    ro = np.empty((5, 2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        ferroattn.attention_varlen(*args, out=ro)


# --------------------------------------------------------------------------
# varlen errors
# --------------------------------------------------------------------------


def _varlen_args():
    return _z(5, 2, 4), _z(6, 1, 4), _z(6, 1, 3)


@pytest.mark.parametrize(
    "cu",
    [[1, 2, 5], [0, 3, 2, 5], [0, 2, 4], [0, 2, 6], [0, -1, 5], [], [[0, 5]]],
    ids=str,
)
def test_bad_cu_seqlens_q(cu):
    q, k, v = _varlen_args()
    cu_k = [0, 3, 6] if len(cu) == 3 else ([0, 2, 4, 6] if len(cu) == 4 else [0, 6])
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ferroattn.attention_varlen(q, k, v, cu, cu_k)


@pytest.mark.parametrize(
    "cu",
    [[1, 2, 6], [0, 4, 3, 6], [0, 2, 5], [0, 2, 7], [0, -1, 6], [], [[0, 6]]],
    ids=str,
)
def test_bad_cu_seqlens_k(cu):
    q, k, v = _varlen_args()
    cu_q = [0, 3, 5] if len(cu) == 3 else ([0, 2, 4, 5] if len(cu) == 4 else [0, 5])
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ferroattn.attention_varlen(q, k, v, cu_q, cu)


def test_cu_seqlens_float_rejected():
    q, k, v = _varlen_args()
    with pytest.raises((TypeError, ValueError), match="cu_seqlens_q"):
        ferroattn.attention_varlen(q, k, v, np.array([0.0, 5.0]), [0, 6])
    with pytest.raises((TypeError, ValueError), match="cu_seqlens_k"):
        ferroattn.attention_varlen(q, k, v, [0, 5], np.array([0.0, 6.0]))


def test_cu_seqlens_length_mismatch():
    q, k, v = _varlen_args()
    with pytest.raises(ValueError, match="cu_seqlens"):
        ferroattn.attention_varlen(q, k, v, [0, 5], [0, 3, 6])


@pytest.mark.parametrize(
    "shapes",
    [
        ((1, 5, 2, 4), (1, 6, 1, 4), (1, 6, 1, 3)),  # 4-D
        ((5, 4), (6, 4), (6, 3)),  # 2-D
        ((5, 2, 4), (6, 1, 5), (6, 1, 3)),  # D mismatch
        ((5, 3, 4), (6, 2, 4), (6, 2, 3)),  # Hq % Hkv
        ((5, 2, 4), (6, 1, 4), (6, 2, 3)),  # k/v heads
        ((5, 2, 4), (6, 1, 4), (7, 1, 3)),  # k/v total
        ((5, 2, 0), (6, 1, 0), (6, 1, 3)),  # D == 0
    ],
    ids=["4d", "2d", "d", "heads", "kvheads", "kvtotal", "d0"],
)
def test_varlen_shape_errors(shapes):
    q, k, v = (_z(*s) for s in shapes)
    with pytest.raises(ValueError, match=QKV):
        ferroattn.attention_varlen(q, k, v, [0, 5], [0, 6])


# --------------------------------------------------------------------------
# attention_weights shape errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes",
    [((1, 2, 3, 4), (1, 2, 3, 5)), ((1, 4, 3, 4), (1, 3, 3, 4)), ((2, 2, 3, 4), (1, 2, 3, 4))],
    ids=["d", "heads", "batch"],
)
def test_weights_shape_errors(shapes):
    with pytest.raises(ValueError, match=QKV):
        ferroattn.attention_weights(_z(*shapes[0]), _z(*shapes[1]))


# --------------------------------------------------------------------------
# Fuzz: only ValueError / TypeError, never a panic or anything else
# --------------------------------------------------------------------------

SMALL = st.integers(0, 3)
ANY_WINDOW = st.one_of(
    st.none(),
    st.integers(-3, 4),
    st.tuples(st.one_of(st.none(), st.integers(-3, 4)), st.one_of(st.none(), st.integers(-3, 4))),
    st.just((1, 2, 3)),
)
ANY_FLOAT = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


@given(
    q_shape=st.lists(SMALL, min_size=1, max_size=5),
    k_shape=st.lists(SMALL, min_size=1, max_size=5),
    v_shape=st.lists(SMALL, min_size=1, max_size=5),
    causal=st.sampled_from([False, True, "top_left", "bottom_right", "nope"]),
    window=ANY_WINDOW,
    scale=ANY_FLOAT,
    softcap=ANY_FLOAT,
    kv_lengths=st.one_of(st.none(), st.lists(st.integers(-2, 5), max_size=4)),
    layout=st.sampled_from(["bhsd", "bshd", "xx"]),
    return_lse=st.booleans(),
)
def test_fuzz_attention_only_raises_documented_errors(
    q_shape, k_shape, v_shape, causal, window, scale, softcap, kv_lengths, layout, return_lse
):
    q, k, v = (np.ones(s, dtype=np.float32) for s in (q_shape, k_shape, v_shape))
    try:
        res = ferroattn.attention(
            q,
            k,
            v,
            causal=causal,
            window=window,
            scale=scale,
            softcap=softcap,
            kv_lengths=kv_lengths,
            layout=layout,
            return_lse=return_lse,
        )
    except (ValueError, TypeError):
        return
    out = res[0] if return_lse else res
    assert out.dtype == np.float32
    assert out.shape[:-1] == q.shape[:-1]


@given(
    lens=st.lists(st.integers(-1, 4), min_size=0, max_size=4),
    klens=st.lists(st.integers(-1, 4), min_size=0, max_size=4),
    tq=st.integers(0, 6),
    tk=st.integers(0, 6),
    causal=st.sampled_from([False, True, "top_left"]),
    window=ANY_WINDOW,
)
def test_fuzz_varlen_only_raises_documented_errors(lens, klens, tq, tk, causal, window):
    q, k, v = _z(tq, 2, 4), _z(tk, 1, 4), _z(tk, 1, 3)
    try:
        out = ferroattn.attention_varlen(q, k, v, lens, klens, causal=causal, window=window)
    except (ValueError, TypeError):
        return
    assert out.shape == (tq, 2, 3)
