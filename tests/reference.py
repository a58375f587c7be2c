"""Plain float64 NumPy reference for ferroattn, plus test helpers.

Nothing in here imports ferroattn: it is the independent oracle the tests
compare against.  It favours clarity over speed (explicit visibility mask,
one softmax per query row).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

# Relative Frobenius tolerance of the output, per input dtype.  For float16 and
# bfloat16 the reference is computed on the (already rounded) inputs, so the
# tolerance only has to absorb float32 accumulation plus the final rounding of
# the output to the storage dtype.
OUT_RTOL = {F32: 1e-5, F64: 1e-5, F16: 2e-3, BF16: 1e-2}
LSE_TOL = 1e-5  # absolute, scaled by max(1, |lse|)


# --------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------


def _window_sides(window):
    """Normalise ``window`` into (left, right) where None means unbounded."""
    if window is None:
        return None, None
    if isinstance(window, (int, np.integer)):
        return int(window) - 1, 0
    left, right = window
    left = None if left is None or left == -1 else int(left)
    right = None if right is None or right == -1 else int(right)
    return left, right


def visibility_mask(q_len, n_keys, k_len, *, causal=False, window=None):
    """Boolean (q_len, n_keys) matrix: True where query i may see key j.

    Written straight from the rules: keys j >= k_len are never visible; query i
    sits at position p = i + (k_len - q_len) (bottom-right alignment) or p = i
    (causal="top_left"); causal keeps j <= p; window (left, right) keeps
    p - left <= j <= p + right.
    """
    left, right = _window_sides(window)
    i = np.arange(q_len)[:, None]
    j = np.arange(n_keys)[None, :]
    p = i if causal == "top_left" else i + (k_len - q_len)
    mask = j < k_len
    if causal is True or causal in ("bottom_right", "top_left"):
        mask = mask & (j <= p)
    if left is not None:
        mask = mask & (j >= p - left)
    if right is not None:
        mask = mask & (j <= p + right)
    return np.broadcast_to(mask, (q_len, n_keys))


def _scores(qh, kh, scale, softcap):
    s = scale * (qh @ kh.T)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    return s


def _check_4d(q, k, v):
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    assert q.ndim == k.ndim == v.ndim == 4
    assert q.shape[0] == k.shape[0] == v.shape[0]
    assert q.shape[3] == k.shape[3]
    assert k.shape[:3] == v.shape[:3]
    assert q.shape[1] % k.shape[1] == 0
    return q, k, v


def reference_attention(
    q,
    k,
    v,
    *,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    softcap=None,
):
    """float64 attention on 4-D bhsd arrays.  Returns (out, lse).

    out: (B, Hq, Nq, Dv) float64, lse: (B, Hq, Nq) float64 (natural log, -inf
    for rows without a visible key; such rows have output 0).
    """
    q, k, v = _check_4d(q, k, v)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    out = np.zeros((B, Hq, Nq, Dv))
    lse = np.full((B, Hq, Nq), -np.inf)
    for b in range(B):
        k_len = Nk if kv_lengths is None else int(kv_lengths[b])
        mask = visibility_mask(Nq, Nk, k_len, causal=causal, window=window)
        for h in range(Hq):
            hk = h // group
            s = _scores(q[b, h], k[b, hk], scale, softcap)
            for i in range(Nq):
                visible = np.flatnonzero(mask[i])
                if visible.size == 0:
                    continue
                row = s[i, visible]
                m = row.max()
                e = np.exp(row - m)
                z = e.sum()
                out[b, h, i] = (e / z) @ v[b, hk][visible]
                lse[b, h, i] = m + math.log(z)
    return out, lse


def reference_weights(
    q, k, *, causal=False, window=None, scale=None, kv_lengths=None, softcap=None
):
    """float64 softmax probabilities (B, Hq, Nq, Nk) for 4-D bhsd q, k."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    w = np.zeros((B, Hq, Nq, Nk))
    for b in range(B):
        k_len = Nk if kv_lengths is None else int(kv_lengths[b])
        mask = visibility_mask(Nq, Nk, k_len, causal=causal, window=window)
        for h in range(Hq):
            s = _scores(q[b, h], k[b, h // group], scale, softcap)
            for i in range(Nq):
                visible = np.flatnonzero(mask[i])
                if visible.size == 0:
                    continue
                e = np.exp(s[i, visible] - s[i, visible].max())
                w[b, h, i, visible] = e / e.sum()
    return w


def reference_varlen(q, k, v, cu_q, cu_k, **opts):
    """Reference for packed (total, H, D) inputs: one reference call per sequence.

    Returns (out (total_q, Hq, Dv), lse (Hq, total_q)).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    total_q, Hq, _ = q.shape
    Dv = v.shape[2]
    out = np.zeros((total_q, Hq, Dv))
    lse = np.full((Hq, total_q), -np.inf)
    for s in range(len(cu_q) - 1):
        q0, q1 = int(cu_q[s]), int(cu_q[s + 1])
        k0, k1 = int(cu_k[s]), int(cu_k[s + 1])
        if q1 == q0:
            continue
        o, l_ = reference_attention(
            q[q0:q1].transpose(1, 0, 2)[None],
            k[k0:k1].transpose(1, 0, 2)[None],
            v[k0:k1].transpose(1, 0, 2)[None],
            **opts,
        )
        out[q0:q1] = o[0].transpose(1, 0, 2)
        lse[:, q0:q1] = l_[0]
    return out, lse


# --------------------------------------------------------------------------
# Layout / rank helpers
# --------------------------------------------------------------------------


def from_bhsd(x, layout="bhsd", rank=4):
    """Turn a 4-D bhsd array into the given layout and rank (a view)."""
    assert x.ndim == 4
    if layout == "bshd":
        x = x.transpose(0, 2, 1, 3)
    if rank == 4:
        return x
    if rank == 3:
        assert x.shape[0] == 1
        return x[0]
    assert rank == 2 and x.shape[:2] == (1, 1)
    return x[0, 0]


def to_bhsd(x, layout="bhsd"):
    """Turn an array of any supported rank/layout back into 4-D bhsd (a view)."""
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
        if layout == "bshd":
            x = x.transpose(0, 2, 1, 3)
    elif layout == "bshd":
        x = x.transpose(0, 2, 1, 3)
    return x


def lse_to_rank(lse, rank):
    """(B, H, N) reference lse -> the shape ferroattn returns for that rank."""
    if rank == 4:
        return lse
    if rank == 3:
        return lse[0]
    return lse[0, 0]


# --------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------


def rel_err(a, b):
    """||a - b||_F / max(||b||_F, tiny), computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = np.linalg.norm((a - b).ravel())
    den = max(np.linalg.norm(b.ravel()), np.finfo(np.float64).tiny)
    return num / den


def random_inputs(rng, shape_q, shape_k, shape_v, dtype=F32, mag=1.0):
    """Standard-normal q, k, v in ``dtype`` (values rounded to it)."""
    dtype = np.dtype(dtype)
    arrays = []
    for shape in (shape_q, shape_k, shape_v):
        x = (rng.standard_normal(shape) * mag).astype(np.float32)
        arrays.append(x.astype(dtype))
    return arrays


def assert_out_close(actual, expected, dtype, rtol=None):
    """Output check: dtype, shape, no NaN, relative Frobenius error."""
    dtype = np.dtype(dtype)
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a64 = actual.astype(np.float64)
    assert not np.isnan(a64).any(), "NaN in output"
    tol = OUT_RTOL[dtype] if rtol is None else rtol
    err = rel_err(a64, expected)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


def assert_lse_close(actual, expected, tol=LSE_TOL):
    """lse check: float32, shape, -inf exactly where expected, abs tolerance."""
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.dtype == np.float32, actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.astype(np.float64)
    assert not np.isnan(a).any(), "NaN in lse"
    masked = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(a), masked, err_msg="-inf pattern")
    diff = np.abs(a[~masked] - expected[~masked])
    bound = tol * np.maximum(1.0, np.abs(expected[~masked]))
    bad = diff > bound
    assert not bad.any(), f"lse off by up to {diff.max():.3e} at {np.argwhere(~masked)[bad][:5]}"


def assert_masked_rows_zero(out_bhsd, lse_ref):
    """Rows with no visible key must be exactly 0 (not NaN, not garbage)."""
    rows = np.isneginf(lse_ref)
    if rows.any():
        vals = np.asarray(out_bhsd, dtype=np.float64)[rows]
        assert np.all(vals == 0.0), "fully masked rows must be exactly 0"
