"""ferroattn.rope against a float64 reference with explicit loops over pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import BF16, F16, F32, F64, OUT_RTOL, rel_err

from ferroattn.rope import rope


def reference_rope(x, positions, *, theta=10000.0, interleaved=False, rotary_dim=None):
    """float64 RoPE: one explicit rotation per feature pair.

    positions: (N,) or, for 4-D x (B, H, N, D), (B, N).
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 2:
        pos = pos[:, None, :]
    pos = np.broadcast_to(pos, x.shape[:-1])
    out = x.copy()
    for i in range(rd // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
        angle = pos * theta ** (-2.0 * i / rd)
        c, s = np.cos(angle), np.sin(angle)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def _inputs(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


# --------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------

SHAPES_AND_POSITIONS = [
    ((7, 16), "shared"),
    ((3, 7, 16), "shared"),
    ((2, 3, 7, 16), "shared"),
    ((2, 3, 7, 16), "per_sequence"),
    ((1, 2, 1, 8), "per_sequence"),
]


def _positions(rng, shape, kind, high=4096):
    n = shape[-2]
    if kind == "shared":
        return rng.integers(0, high, size=n)
    return rng.integers(0, high, size=(shape[0], n))


@pytest.mark.parametrize("shape,kind", SHAPES_AND_POSITIONS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8, 2])
def test_matches_reference_float32(rng, shape, kind, interleaved, rotary_dim):
    x = _inputs(rng, shape)
    pos = _positions(rng, shape, kind)
    got = rope(x, pos, interleaved=interleaved, rotary_dim=rotary_dim)
    want = reference_rope(x, pos, interleaved=interleaved, rotary_dim=rotary_dim)
    assert got.dtype == F32 and got.shape == x.shape
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("interleaved", [False, True])
def test_float64_is_computed_in_float64(rng, interleaved):
    x = rng.standard_normal((2, 4, 9, 32))
    pos = rng.integers(0, 10**6, size=(2, 9))
    got = rope(x, pos, theta=500000.0, interleaved=interleaved)
    want = reference_rope(x, pos, theta=500000.0, interleaved=interleaved)
    assert got.dtype == F64
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("interleaved", [False, True])
def test_large_positions_keep_their_phase(rng, interleaved):
    # Angles of ~1e6 rad in float32 would be off by ~0.06 rad; float64 angles keep 1e-6.
    x = _inputs(rng, (3, 64))
    pos = np.array([999_983, 1_000_000, 2_000_003])
    got = rope(x, pos, interleaved=interleaved)
    want = reference_rope(x, pos, interleaved=interleaved)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_half_precision_dtypes(rng, dtype, interleaved, rotary_dim):
    x = _inputs(rng, (2, 3, 11, 16), dtype)
    pos = _positions(rng, x.shape, "per_sequence")
    got = rope(x, pos, interleaved=interleaved, rotary_dim=rotary_dim)
    want = reference_rope(x.astype(np.float64), pos, interleaved=interleaved, rotary_dim=rotary_dim)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, want) <= OUT_RTOL[dtype]
    if rotary_dim is not None:
        np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_pass_through_features_are_untouched(rng):
    x = _inputs(rng, (5, 12))
    got = rope(x, np.arange(5) * 37, rotary_dim=6)
    np.testing.assert_array_equal(got[:, 6:], x[:, 6:])
    assert not np.allclose(got[1:, :6], x[1:, :6])


def test_position_zero_is_identity(rng):
    x = _inputs(rng, (2, 2, 4, 8))
    np.testing.assert_array_equal(rope(x, np.zeros(4, np.int64)), x)


def test_per_sequence_positions_apply_to_each_sequence(rng):
    x = _inputs(rng, (3, 2, 5, 8))
    pos = rng.integers(0, 100, size=(3, 5))
    got = rope(x, pos)
    for b in range(3):
        np.testing.assert_array_equal(got[b], rope(x[b], pos[b]))


def test_theta_changes_the_result(rng):
    x = _inputs(rng, (4, 8))
    pos = np.arange(4) + 1
    got = rope(x, pos, theta=100.0)
    assert rel_err(got, reference_rope(x, pos, theta=100.0)) <= 1e-6
    assert rel_err(got, reference_rope(x, pos)) > 1e-3


# --------------------------------------------------------------------------
# The two conventions, as published
# --------------------------------------------------------------------------


def test_half_split_is_hf_rotate_half(rng):
    """Hugging Face Llama: x·cos + rotate_half(x)·sin with frequencies repeated twice."""
    x = _inputs(rng, (6, 16)).astype(np.float64)
    pos = np.arange(6) * 3
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    emb = np.concatenate([pos[:, None] * inv_freq] * 2, axis=-1)
    rotate_half = np.concatenate([-x[:, 8:], x[:, :8]], axis=-1)
    want = x * np.cos(emb) + rotate_half * np.sin(emb)
    assert rel_err(rope(x, pos), want) <= 1e-12


def test_interleaved_is_complex_multiplication(rng):
    """Meta's Llama: view pairs (2i, 2i+1) as complex numbers, multiply by e^(i·angle)."""
    x = _inputs(rng, (6, 16)).astype(np.float64)
    pos = np.arange(6) * 5
    freqs = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * pos[:, None] * freqs)
    want = np.stack([z.real, z.imag], axis=-1).reshape(6, 16)
    assert rel_err(rope(x, pos, interleaved=True), want) <= 1e-12


def test_conventions_differ_by_a_feature_permutation(rng):
    x = _inputs(rng, (2, 5, 16)).astype(np.float64)
    pos = np.arange(5) + 7
    # Interleaved pair (2i, 2i+1) is half-split pair (i, i+8) after this permutation.
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])
    inter = rope(x, pos, interleaved=True)
    split = rope(x[..., perm], pos)
    np.testing.assert_allclose(inter[..., perm], split, rtol=0, atol=1e-12)
    assert not np.allclose(inter, rope(x, pos))


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

half_dims = st.integers(1, 16).map(lambda h: 2 * h)


@given(
    d=half_dims,
    interleaved=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rotation_preserves_norms(d, interleaved, data, seed):
    rng = np.random.default_rng(seed)
    rd = data.draw(st.integers(1, d // 2).map(lambda h: 2 * h))
    x = rng.standard_normal((3, 5, d))
    pos = rng.integers(-(10**5), 10**5, size=5)
    y = rope(x, pos, interleaved=interleaved, rotary_dim=rd)
    np.testing.assert_allclose(
        np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12, atol=0
    )


@given(
    d=half_dims,
    interleaved=st.booleans(),
    m=st.integers(0, 10**5),
    n=st.integers(0, 10**5),
    shift=st.integers(-(10**4), 10**4),
    seed=st.integers(0, 2**32 - 1),
)
def test_scores_depend_only_on_relative_position(d, interleaved, m, n, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, d))
    m, n = m + 10**4, n + 10**4  # keep shifted positions non-negative
    opts = {"interleaved": interleaved}
    before = rope(q, [m], **opts) @ rope(k, [n], **opts).T
    after = rope(q, [m + shift], **opts) @ rope(k, [n + shift], **opts).T
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-9 * d)


def test_scores_do_change_with_distance(rng):
    q, k = rng.standard_normal((2, 1, 32))
    near = rope(q, [5]) @ rope(k, [4]).T
    far = rope(q, [5]) @ rope(k, [40]).T
    assert abs(near - far).item() > 1e-6


# --------------------------------------------------------------------------
# Memory: out=, in place, strided input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_in_place_equals_out_of_place(rng, rotary_dim):
    x = _inputs(rng, (2, 3, 6, 8))
    pos = rng.integers(0, 50, size=(2, 6))
    want = rope(x, pos, rotary_dim=rotary_dim)
    y = x.copy()
    assert rope(y, pos, rotary_dim=rotary_dim, out=y) is y
    np.testing.assert_array_equal(y, want)


def test_out_is_written_and_returned(rng):
    x = _inputs(rng, (4, 8))
    out = np.full_like(x, np.nan)
    assert rope(x, np.arange(4), rotary_dim=4, out=out) is out
    np.testing.assert_array_equal(out, rope(x, np.arange(4), rotary_dim=4))


def test_strided_input_and_head_major_view(rng):
    base = _inputs(rng, (2, 6, 3, 16))  # (B, N, H, D) token-major
    view = base.transpose(0, 2, 1, 3)[:, :, ::2]  # (B, H, 3, D), strided
    pos = np.array([3, 1, 4])
    got = rope(view, pos)
    assert rel_err(got, reference_rope(view, pos)) <= 1e-6


def test_empty_token_axis():
    x = np.zeros((2, 0, 8), np.float32)
    assert rope(x, np.zeros(0, np.int64)).shape == (2, 0, 8)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match=r"even.*\(4, 7\)"):
        rope(np.zeros((4, 7), np.float32), np.arange(4))


@pytest.mark.parametrize("rotary_dim", [3, 0, 10, -2])
def test_bad_rotary_dim_is_refused(rotary_dim):
    with pytest.raises(ValueError, match="rotary_dim"):
        rope(np.zeros((4, 8), np.float32), np.arange(4), rotary_dim=rotary_dim)


def test_rotary_dim_must_be_an_int():
    with pytest.raises(TypeError, match="rotary_dim"):
        rope(np.zeros((4, 8), np.float32), np.arange(4), rotary_dim=4.0)


@pytest.mark.parametrize(
    "x_shape,pos_shape",
    [((4, 8), (5,)), ((2, 3, 4, 8), (3, 4)), ((3, 4, 8), (3, 4)), ((4, 8), (1, 4))],
)
def test_positions_of_the_wrong_shape(x_shape, pos_shape):
    with pytest.raises(ValueError, match="positions"):
        rope(np.zeros(x_shape, np.float32), np.zeros(pos_shape, np.int64))


def test_positions_must_be_integers():
    with pytest.raises(TypeError, match="positions"):
        rope(np.zeros((4, 8), np.float32), np.arange(4.0))


def test_x_must_be_float():
    with pytest.raises(TypeError, match="x has dtype int64"):
        rope(np.zeros((4, 8), np.int64), np.arange(4))


def test_x_needs_a_token_axis():
    with pytest.raises(ValueError, match="x must have shape"):
        rope(np.zeros(8, np.float32), np.arange(1))


@pytest.mark.parametrize("theta", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_theta(theta):
    with pytest.raises(ValueError, match="theta"):
        rope(np.zeros((4, 8), np.float32), np.arange(4), theta=theta)


def test_bad_out():
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="out has shape"):
        rope(x, np.arange(4), out=np.zeros((4, 6), np.float32))
    with pytest.raises(TypeError, match="out has dtype"):
        rope(x, np.arange(4), out=np.zeros((4, 8), np.float64))
    ro = np.zeros((4, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        rope(x, np.arange(4), out=ro)
