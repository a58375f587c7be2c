"""Plain float64 NumPy reference for ferroattn, plus test helpers.

Nothing in here imports ferroattn: it is the one independent oracle every test
compares against (tests/test_reference.py checks it against other formulations).
It favours clarity over speed (explicit visibility mask, one softmax per query
row) and covers every option: causal / window / kv_lengths, softcap, masks,
biases, ALiBi, T5 relative buckets, sinks and block-sparse layouts.
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


def t5_bucket(rel, *, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's ``_relative_position_bucket`` (Hugging Face transformers), in NumPy.

    ``rel`` is ``key position - query position``.
    """
    rel = np.asarray(rel, dtype=np.int64)
    bucket = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(np.int64) * num_buckets
        dist = np.abs(rel)
    else:
        dist = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = dist < max_exact
    # log of a distance >= max_exact only matters where not is_small; avoid log(0)
    ratio = np.log(np.maximum(dist, 1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (ratio * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return bucket + np.where(is_small, dist, large)


def block_mask(block_layout, block_size, hq):
    """The dense (Hq, Nq, Nk) boolean mask equivalent to a block layout."""
    lay = np.asarray(block_layout, dtype=bool)
    if lay.ndim == 2:
        lay = lay[None]
    dense = np.kron(lay, np.ones((1, block_size, block_size), dtype=bool))
    return np.broadcast_to(dense, (hq, *dense.shape[1:]))


def reference(
    q,
    k,
    v=None,
    *,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    softcap=None,
    mask=None,
    bias=None,
    alibi_slopes=None,
    rel_bias=None,
    sinks=None,
    block_layout=None,
    block_size=None,
):
    """float64 attention with every option ferroattn has, on 4-D bhsd arrays.

    Returns ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq), weights (B, Hq, Nq, Nk))``; ``out`` is
    None when ``v`` is None.  Written row by row from the documented rules:

    - query i may see key j where ``visibility_mask`` (causal, window, kv_lengths) allows it,
      and ``mask`` (broadcast to (B, Hq, Nq, Nk)) and the block layout (its ``np.kron``
      boolean mask) are true;
    - its score is ``scale * q.k``, soft-capped, plus ``bias`` (broadcast), minus
      ``alibi_slopes[h] * |j - p|``, plus ``rel_bias.table[bucket(j - p), h]`` (any object
      with ``table`` (buckets, Hq), ``bidirectional`` and ``max_distance``, such as
      ``ferroattn.T5Bias``), where p is the query's position (see ``visibility_mask``);
    - a sink adds ``exp(sinks[h])`` to the softmax denominator and nothing to the output;
    - a row that sees no key has output 0, weights 0 and lse ``sinks[h]`` (-inf without).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    assert q.ndim == k.ndim == 4 and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    shape4 = (B, Hq, Nq, Nk)
    allowed = np.ones((1, 1, 1, 1), dtype=bool)  # broadcast to (B, Hq, Nq, Nk) below
    if mask is not None:
        allowed = allowed & np.asarray(mask, dtype=bool)
    if block_layout is not None:
        allowed = allowed & block_mask(block_layout, block_size, Hq)[None]
    allowed = np.broadcast_to(allowed, shape4)
    extra = np.broadcast_to(0.0 if bias is None else np.asarray(bias, dtype=np.float64), shape4)
    sink = np.full(Hq, -np.inf) if sinks is None else np.asarray(sinks, dtype=np.float64)

    if v is not None:
        v = np.asarray(v, dtype=np.float64)
        assert v.ndim == 4 and v.shape[:3] == k.shape[:3]
        out = np.zeros((B, Hq, Nq, v.shape[3]))
    else:
        out = None
    lse = np.full((B, Hq, Nq), -np.inf)
    weights = np.zeros(shape4)
    for b in range(B):
        k_len = Nk if kv_lengths is None else int(kv_lengths[b])
        vis = visibility_mask(Nq, Nk, k_len, causal=causal, window=window)
        pos = np.arange(Nq) + (0 if causal == "top_left" else k_len - Nq)
        rel = np.arange(Nk)[None, :] - pos[:, None]  # key index - query position
        if rel_bias is not None:
            table = np.asarray(rel_bias.table, dtype=np.float64)
            buckets = t5_bucket(
                rel,
                bidirectional=rel_bias.bidirectional,
                num_buckets=table.shape[0],
                max_distance=rel_bias.max_distance,
            )
        for h in range(Hq):
            hk = h // group
            s = scale * (q[b, h] @ k[b, hk].T)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            s = s + extra[b, h]
            if alibi_slopes is not None:
                s = s - float(alibi_slopes[h]) * np.abs(rel)
            if rel_bias is not None:
                s = s + table[buckets, h]
            m = vis & allowed[b, h]
            for i in range(Nq):
                seen = np.flatnonzero(m[i])
                if seen.size == 0:
                    lse[b, h, i] = sink[h]  # -inf without sinks; output stays 0
                    continue
                row = s[i, seen]
                top = max(row.max(), sink[h])
                e = np.exp(row - top)
                z = e.sum() + math.exp(sink[h] - top)
                weights[b, h, i, seen] = e / z
                lse[b, h, i] = top + math.log(z)
                if out is not None:
                    out[b, h, i] = (e / z) @ v[b, hk][seen]
    return out, lse, weights


def reference_attention(q, k, v, **opts):
    """float64 attention on 4-D bhsd arrays: ``(out, lse)`` of :func:`reference`.

    out: (B, Hq, Nq, Dv) float64, lse: (B, Hq, Nq) float64 (natural log, -inf
    for rows without a visible key; such rows have output 0).
    """
    out, lse, _ = reference(q, k, v, **opts)
    return out, lse


def reference_weights(q, k, **opts):
    """float64 softmax probabilities (B, Hq, Nq, Nk) for 4-D bhsd q, k (see :func:`reference`)."""
    return reference(q, k, None, **opts)[2]


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
