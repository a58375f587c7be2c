"""ferroattn.linear_attention and LinearAttentionState against a float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import BF16, F16, F32, F64, OUT_RTOL

from ferroattn.linear import LinearAttentionState, linear_attention

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

FEATURE_MAPS = ["elu1", "relu"]
DTYPES = [F32, F16, BF16, F64]


# --------------------------------------------------------------------------
# Reference (float64, 4-D): the definition, one query at a time
# --------------------------------------------------------------------------


def phi(x, feature_map):
    x = np.asarray(x, dtype=np.float64)
    if feature_map == "elu1":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    assert feature_map == "relu"
    return np.maximum(x, 0.0)


def reference_linear(q, k, v, *, causal=False, feature_map="elu1", eps=1e-6):
    """out_i = φ(q_i)ᵀS / (φ(q_i)ᵀz + eps), S = Σ φ(k_j) v_jᵀ, z = Σ φ(k_j), j over all keys or
    (causal) j <= i, built up key by key."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, N, _ = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    out = np.zeros((B, Hq, N, Dv))
    for b in range(B):
        for h in range(Hq):
            fq, fk, vv = (
                phi(q[b, h], feature_map),
                phi(k[b, h // group], feature_map),
                v[b, h // group],
            )
            if not causal:
                S = sum((np.outer(fk[j], vv[j]) for j in range(M)), np.zeros((fk.shape[1], Dv)))
                z = fk.sum(axis=0)
            else:
                S, z = np.zeros((fk.shape[1], Dv)), np.zeros(fk.shape[1])
            for i in range(N):
                if causal:
                    S = S + np.outer(fk[i], vv[i])
                    z = z + fk[i]
                out[b, h, i] = fq[i] @ S / (fq[i] @ z + eps)
    return out


def reference_quadratic(q, k, v, *, causal=False, feature_map="elu1", eps=1e-6):
    """The same as an explicit masked N×M matrix: A = φ(Q)φ(K)ᵀ, out = A·V / (rowsum A + eps)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    fk = np.repeat(phi(k, feature_map), group, axis=1)
    vv = np.repeat(v, group, axis=1)
    a = phi(q, feature_map) @ np.swapaxes(fk, -1, -2)
    if causal:
        a = a * np.tril(np.ones(a.shape[-2:]))
    return (a @ vv) / (a.sum(axis=-1, keepdims=True) + eps)


def rel_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def inputs(rng, B, Hq, Hkv, N, M, D, Dv, dtype):
    """Random q, k, v in ``dtype`` (the reference then reads the rounded values)."""
    q = rng.standard_normal((B, Hq, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def to_rank(x, rank):
    return x if rank == 4 else x[0] if rank == 3 else x[0, 0]


def check(rng, B=1, Hq=2, Hkv=None, N=8, M=None, D=16, Dv=None, dtype=F32, rank=4, **opts):
    Hkv = Hq if Hkv is None else Hkv
    M = N if M is None else M
    Dv = D if Dv is None else Dv
    q, k, v = inputs(rng, B, Hq, Hkv, N, M, D, Dv, dtype)
    want = reference_linear(q, k, v, **opts)
    args = [to_rank(x, rank) for x in (q, k, v)]
    before = [a.copy() for a in args]
    out = linear_attention(*args, **opts)
    assert out.dtype == dtype and out.shape == to_rank(want, rank).shape
    err = rel_err(out, to_rank(want, rank))
    assert err <= OUT_RTOL[dtype], f"relative error {err:.3g} > {OUT_RTOL[dtype]}"
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(a, b, err_msg="input was modified")
    return out


# --------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_reference_forms_agree(rng, causal, feature_map):
    q, k, v = inputs(rng, 2, 4, 2, 9, 9, 5, 3, F64)
    a = reference_linear(q, k, v, causal=causal, feature_map=feature_map)
    b = reference_quadratic(q, k, v, causal=causal, feature_map=feature_map)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_reference_by_hand():
    # One key: every query returns its value scaled by den / (den + eps) ≈ 1.
    q = np.array([[[[1.0, -1.0]]]])
    k = np.array([[[[2.0, 0.0]]]])
    v = np.array([[[[3.0, -5.0]]]])
    fq, fk = np.array([2.0, np.exp(-1.0)]), np.array([3.0, 1.0])
    den = fq @ fk
    want = np.array([3.0, -5.0]) * den / (den + 1e-6)
    np.testing.assert_allclose(reference_linear(q, k, v)[0, 0, 0], want, rtol=1e-14)


# --------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------

SHAPES = [
    # B, Hq, Hkv, N, D, Dv
    (1, 1, 1, 1, 1, 1),
    (1, 1, 1, 2, 3, 5),
    (2, 3, 3, 17, 7, 11),
    (1, 4, 2, 63, 16, 16),  # GQA, just under a chunk
    (1, 4, 1, 64, 8, 24),  # MQA, exactly a chunk
    (2, 2, 1, 65, 40, 9),  # one past a chunk
    (1, 6, 3, 129, 33, 17),  # D and Dv not multiples of 8, three chunks
    (1, 1, 1, 300, 64, 64),  # many chunks, one unit: split into segments
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "D", "Dv"), SHAPES)
def test_shapes(rng, B, Hq, Hkv, N, D, Dv, causal, feature_map):
    check(rng, B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, Dv=Dv, causal=causal, feature_map=feature_map)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_dtypes(rng, dtype, causal, feature_map):
    check(
        rng,
        B=2,
        Hq=4,
        Hkv=2,
        N=70,
        D=24,
        Dv=12,
        dtype=dtype,
        causal=causal,
        feature_map=feature_map,
    )


@pytest.mark.parametrize(("N", "M"), [(5, 0), (1, 9), (9, 1), (70, 130), (0, 4)])
def test_cross_attention_lengths(rng, N, M):
    out = check(rng, Hq=2, Hkv=1, N=N, M=M, D=8, Dv=6)
    if M == 0:
        np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_lower_ranks(rng, rank, causal):
    Hq = 1 if rank == 2 else 3
    check(rng, B=1, Hq=Hq, N=20, D=9, Dv=4, rank=rank, causal=causal)


@pytest.mark.parametrize("eps", [1e-6, 0.5, 10.0])
def test_eps_is_used(rng, eps):
    check(rng, N=12, D=4, causal=True, eps=eps)


@given(
    seed=st.integers(0, 2**32 - 1),
    B=st.integers(1, 2),
    Hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    N=st.integers(1, 150),
    M=st.integers(0, 150),
    D=st.integers(1, 40),
    Dv=st.integers(1, 40),
    causal=st.booleans(),
    feature_map=st.sampled_from(FEATURE_MAPS),
    dtype=st.sampled_from(DTYPES),
    rank=st.sampled_from([2, 3, 4]),
)
def test_property(seed, B, Hkv, group, N, M, D, Dv, causal, feature_map, dtype, rank):
    Hq = Hkv * group
    if rank < 4:
        B = 1
    if rank == 2:
        Hq = Hkv = 1
    if causal:
        M = N
    check(
        np.random.default_rng(seed),
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        N=N,
        M=M,
        D=D,
        Dv=Dv,
        dtype=dtype,
        rank=rank,
        causal=causal,
        feature_map=feature_map,
    )


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_thread_counts(rng, restore_threads, threads, causal):
    import ferroattn

    ferroattn.set_num_threads(threads)
    # One unit, many chunks: the work is cut into as many segments as threads want.
    check(rng, B=1, Hq=2, Hkv=1, N=700, D=16, Dv=8, causal=causal)


def test_strided_inputs(rng):
    q, k, v = inputs(rng, 2, 4, 2, 40, 40, 8, 6, F32)
    # Reversed tokens, every other head, token-major memory: read in place through strides.
    qs = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)[:, ::2, ::-1]
    ks = k[:, :1, ::-1]
    vs = np.ascontiguousarray(v[:, :1, ::-1])
    want = reference_linear(qs, ks, vs, causal=True)
    assert rel_err(linear_attention(qs, ks, vs, causal=True), want) <= 1e-5


def test_relu_zero_denominator_is_finite():
    # Queries with no positive entry (or keys with none) give denominator 0: output 0, not NaN.
    q = -np.abs(np.random.default_rng(1).standard_normal((1, 1, 6, 4))).astype(np.float32)
    k = np.abs(q)
    v = np.ones((1, 1, 6, 3), np.float32)
    out = linear_attention(q, k, v, feature_map="relu")
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, 0)
    out = linear_attention(-q, -k, v, feature_map="relu", causal=True)
    np.testing.assert_array_equal(out, 0)
    # With elu1 the denominator is positive and the output is a mean of values: 1.
    np.testing.assert_allclose(linear_attention(q, k, v), 1, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_causal_future_nonfinite_does_not_leak(rng, bad):
    q, k, v = inputs(rng, 1, 2, 1, 100, 100, 8, 5, F32)
    v[0, 0, 30, 2] = bad
    k[0, 0, 40, 1] = bad
    out = linear_attention(q, k, v, causal=True)
    want = reference_linear(q[:, :, :30], k[:, :, :30], v[:, :, :30], causal=True)
    assert rel_err(out[:, :, :30], want) <= 1e-5
    assert not np.all(np.isfinite(out[:, :, 30:]))


# --------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=lambda d: d.name)
def test_out_param(rng, dtype):
    q, k, v = inputs(rng, 1, 2, 1, 30, 30, 8, 4, dtype)
    out = np.full((1, 2, 30, 4), np.nan, dtype=dtype)
    res = linear_attention(q, k, v, causal=True, out=out)
    assert res is out
    assert rel_err(out, reference_linear(q, k, v, causal=True)) <= OUT_RTOL[dtype]


def test_out_param_strided(rng):
    q, k, v = inputs(rng, 1, 2, 1, 30, 30, 8, 4, F32)
    buf = np.full((30, 2, 8), np.nan, np.float32)
    out = buf[:, :, ::2].transpose(1, 0, 2)[None]  # last axis not contiguous: via a buffer
    assert linear_attention(q, k, v, out=out) is out
    assert rel_err(out, reference_linear(q, k, v)) <= 1e-5
    assert np.all(np.isnan(buf[:, :, 1::2]))


# --------------------------------------------------------------------------
# The recurrent state
# --------------------------------------------------------------------------


def stepped(state, q, k, v, sizes):
    """Feed q/k/v (4-D) through ``state`` in consecutive pieces of ``sizes`` tokens."""
    outs, t = [], 0
    for n in sizes:
        outs.append(state.step(q[:, :, t : t + n], k[:, :, t : t + n], v[:, :, t : t + n]))
        t += n
    assert t == q.shape[2]
    return np.concatenate(outs, axis=2)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=lambda d: d.name)
def test_state_token_by_token(rng, feature_map, dtype):
    B, Hq, Hkv, N, D, Dv = 2, 4, 2, 90, 12, 7
    q, k, v = inputs(rng, B, Hq, Hkv, N, N, D, Dv, dtype)
    state = LinearAttentionState(B, Hq, D, Dv, kv_heads=Hkv, feature_map=feature_map)
    got = stepped(state, q, k, v, [1] * N)
    assert got.dtype == dtype
    parallel = linear_attention(q, k, v, causal=True, feature_map=feature_map)
    want = reference_linear(q, k, v, causal=True, feature_map=feature_map)
    assert rel_err(got, want) <= OUT_RTOL[dtype]
    # Token by token, each output equals the parallel form's row.
    tol = 1e-5 if dtype == F32 else OUT_RTOL[dtype]
    for t in range(N):
        assert rel_err(got[:, :, t], parallel[:, :, t].astype(np.float64)) <= tol, t


@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 80), min_size=1, max_size=5),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    D=st.integers(1, 20),
    Dv=st.integers(1, 20),
    feature_map=st.sampled_from(FEATURE_MAPS),
)
def test_state_in_chunks(seed, sizes, Hkv, group, D, Dv, feature_map):
    rng = np.random.default_rng(seed)
    N = sum(sizes)
    q, k, v = inputs(rng, 1, Hkv * group, Hkv, N, N, D, Dv, F32)
    state = LinearAttentionState(1, Hkv * group, D, Dv, kv_heads=Hkv, feature_map=feature_map)
    got = stepped(state, q, k, v, sizes)
    parallel = linear_attention(q, k, v, causal=True, feature_map=feature_map)
    assert rel_err(got, parallel.astype(np.float64)) <= 1e-5
    # The state holds the sums over every token fed.
    S, z = state.state
    fk = phi(k, feature_map)
    np.testing.assert_allclose(S, np.einsum("bhnd,bhne->bhde", fk, v), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, fk.sum(axis=2), rtol=1e-4, atol=1e-4)


def test_state_float64_and_ranks(rng):
    q, k, v = inputs(rng, 1, 1, 1, 10, 10, 6, 3, F64)
    want = reference_linear(q, k, v, causal=True)
    s3 = LinearAttentionState(1, 1, 6, 3)
    got3 = np.concatenate(
        [s3.step(q[0, :, t : t + 1], k[0, :, t : t + 1], v[0, :, t : t + 1]) for t in range(10)],
        axis=1,
    )
    assert got3.dtype == F64 and got3.shape == (1, 10, 3)
    assert rel_err(got3, want[0]) <= 1e-5
    s2 = LinearAttentionState(1, 1, 6, 3)
    got2 = np.concatenate(
        [
            s2.step(q[0, 0, :4], k[0, 0, :4], v[0, 0, :4]),
            s2.step(q[0, 0, 4:], k[0, 0, 4:], v[0, 0, 4:]),
        ]
    )
    assert got2.shape == (10, 3)
    assert rel_err(got2, want[0, 0]) <= 1e-5


def test_state_reset_and_copies(rng):
    q, k, v = inputs(rng, 2, 2, 2, 5, 5, 4, 3, F32)
    state = LinearAttentionState(2, 2, 4, 3)
    assert state.nbytes == 2 * 2 * (4 * 3 + 4) * 4
    first = state.step(q, k, v)
    S, z = state.state
    assert S.shape == (2, 2, 4, 3) and z.shape == (2, 2, 4) and S.dtype == z.dtype == F32
    S[...] = 123.0  # a copy: the state is unaffected
    assert not np.any(state.state[0] == 123.0)
    again = state.step(q, k, v)
    assert rel_err(again, first.astype(np.float64)) > 1e-3  # the history changed the result
    state.reset(1)
    part = state.step(q, k, v)
    np.testing.assert_allclose(part[1], first[1], rtol=1e-6, atol=1e-6)
    assert rel_err(part[0], first[0].astype(np.float64)) > 1e-3
    state.reset()
    np.testing.assert_array_equal(state.state[0], 0)
    np.testing.assert_array_equal(state.state[1], 0)
    np.testing.assert_allclose(state.step(q, k, v), first, rtol=1e-6, atol=1e-6)


def test_state_failed_step_leaves_state(rng):
    q, k, v = inputs(rng, 1, 2, 2, 3, 3, 4, 4, F32)
    state = LinearAttentionState(1, 2, 4)
    state.step(q, k, v)
    before = state.state
    with pytest.raises(ValueError, match="v must have shape"):
        state.step(q, k, v[..., :3])
    with pytest.raises(ValueError, match="k must have shape"):
        state.step(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(TypeError, match="share one dtype"):
        state.step(q, k.astype(np.float16), v)
    for a, b in zip(state.state, before, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _qkv(N=4, M=4, dtype=np.float32):
    rng = np.random.default_rng(0)
    return inputs(rng, 1, 2, 1, N, M, 8, 4, np.dtype(dtype))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"feature_map": "softmax"}, ValueError, "feature_map"),
        ({"feature_map": None}, ValueError, "feature_map"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": -1e-3}, ValueError, "eps"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"eps": float("inf")}, ValueError, "eps"),
        ({"eps": 1e-300}, ValueError, "eps"),
        ({"eps": "1e-6"}, TypeError, "eps"),
        ({"causal": "top_left"}, TypeError, "causal"),
    ],
)
def test_bad_options(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        linear_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(
        ValueError, match=r"as many queries as keys.*\(1, 2, 4, 8\).*\(1, 1, 5, 8\)"
    ):
        linear_attention(q, *_qkv(M=5)[1:], causal=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        linear_attention(q[:, :1], np.concatenate([k, k], axis=1), np.concatenate([v, v], axis=1))
    with pytest.raises(ValueError, match="head dimensions"):
        linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="k and v must agree"):
        linear_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="batch sizes"):
        linear_attention(np.concatenate([q, q]), k, v)
    with pytest.raises(ValueError, match="same number of dimensions"):
        linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="2, 3 or 4 dimensions"):
        linear_attention(q[None], k[None], v[None])
    with pytest.raises(ValueError, match="dimension must be at least 1"):
        linear_attention(q[..., :0], k[..., :0], v)


def test_bad_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="share one dtype"):
        linear_attention(q, k.astype(np.float16), v)
    with pytest.raises(TypeError, match="q has dtype int32"):
        linear_attention(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(TypeError, match="q must be a NumPy array"):
        linear_attention("q", k, v)


def test_bad_out():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"out has shape \(1, 2, 4, 3\), expected \(1, 2, 4, 4\)"):
        linear_attention(q, k, v, out=np.empty((1, 2, 4, 3), np.float32))
    with pytest.raises(TypeError, match="out has dtype float64"):
        linear_attention(q, k, v, out=np.empty((1, 2, 4, 4)))
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        linear_attention(q, k, v, out=[0.0])
    ro = np.empty((1, 2, 4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        linear_attention(q, k, v, out=ro)
    qq = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="share memory with q"):
        linear_attention(qq, k, v, out=qq[..., :4])


def test_bad_state_arguments():
    with pytest.raises(ValueError, match="heads"):
        LinearAttentionState(1, 3, 8, kv_heads=2)
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttentionState(1, 2, 8, feature_map="exp")
    with pytest.raises(ValueError, match="eps"):
        LinearAttentionState(1, 2, 8, eps=0)
    with pytest.raises(ValueError, match="head_dim"):
        LinearAttentionState(1, 2, 0)
    with pytest.raises(TypeError, match="batch"):
        LinearAttentionState(1.5, 2, 8)
    state = LinearAttentionState(2, 2, 8)
    with pytest.raises(ValueError, match="seq"):
        state.reset(2)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have shape \(batch=2"):
        state.step(q, k, v)


def test_binding_refuses_aliased_state():
    from ferroattn import _ferroattn

    q, k, v = _qkv()
    S = np.zeros((1, 1, 8, 4), np.float32)
    z = np.zeros((1, 1, 1, 8), np.float32)
    out = np.empty((1, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        _ferroattn.linear_attention(q, k, v, out, "float32", causal=True, state=(S, S[..., :1, :4]))
    with pytest.raises(ValueError, match="C-contiguous"):
        Sf = np.asfortranarray(S)
        _ferroattn.linear_attention(q, k, v, out, "float32", causal=True, state=(Sf, z))
    with pytest.raises(ValueError, match="causal"):
        _ferroattn.linear_attention(q, k, v, out, "float32", causal=False, state=(S, z))
    with pytest.raises(ValueError, match="state has"):
        _ferroattn.linear_attention(
            q, k, v, out, "float32", causal=True, state=(np.zeros((1, 1, 8, 3), np.float32), z)
        )
    with pytest.raises(ValueError, match="feature_map"):
        _ferroattn.linear_attention(q, k, v, out, "float32", feature_map="x")
    with pytest.raises(ValueError, match="eps"):
        _ferroattn.linear_attention(q, k, v, out, "float32", eps=0.0)
