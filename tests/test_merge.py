"""merge_partials: attention over disjoint key ranges, merged, equals attention over all keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import (
    BF16,
    F16,
    F32,
    F64,
    assert_lse_close,
    assert_masked_rows_zero,
    assert_out_close,
    reference_attention,
    rel_err,
)

import ferroattn
from ferroattn.merge import merge_partials

# Chunk boundaries over Nk = 40 keys: 1, 2 and 3 chunks, with empty chunks among them.
SPLITS = [
    (0, 40),
    (0, 17, 40),
    (0, 0, 40),
    (0, 40, 40),
    (0, 5, 23, 40),
    (0, 11, 11, 40),
]
NK = 40


def _chunk_opts(mode, a, b, nk, kv_lengths):
    """Per-chunk options that make chunk k[a:b] see exactly the keys the full problem sees."""
    if mode == "full":
        return {}
    if mode == "causal":
        # Bottom-right causal over nk keys: query i sees global j <= i + nk - nq. For the chunk
        # (local j' = j - a, its own alignment i + (b - a) - nq) that is j' <= p' + (nk - b).
        return {"window": (None, nk - b)}
    if mode == "kv_lengths":
        lens = np.clip(np.asarray(kv_lengths) - a, 0, b - a)
        return {"kv_lengths": lens}
    raise AssertionError(mode)


def _full_opts(mode, kv_lengths):
    return {"full": {}, "causal": {"causal": True}, "kv_lengths": {"kv_lengths": kv_lengths}}[mode]


def _split_and_merge(q, k, v, bounds, mode, kv_lengths=None, attn=ferroattn.attention):
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        o, lse = attn(
            q,
            k[..., a:b, :],
            v[..., a:b, :],
            return_lse=True,
            **_chunk_opts(mode, a, b, k.shape[-2], kv_lengths),
        )
        outs.append(o)
        lses.append(lse)
    return merge_partials(outs, lses), lses


@pytest.mark.parametrize("bounds", SPLITS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize(
    ("mode", "nq"),
    [("full", 24), ("causal", 40), ("causal", 13), ("causal", 52), ("kv_lengths", 24)],
)
def test_merge_matches_unsplit(rng, bounds, mode, nq):
    B, Hq, Hkv, D, Dv = 3, 4, 2, 16, 12
    q = rng.standard_normal((B, Hq, nq, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, NK, D), dtype=np.float32) * 2.0
    v = rng.standard_normal((B, Hkv, NK, Dv), dtype=np.float32)
    kv_lengths = np.array([NK, 13, 0]) if mode == "kv_lengths" else None
    (out, lse), parts = _split_and_merge(q, k, v, bounds, mode, kv_lengths)

    full_out, full_lse = ferroattn.attention(
        q, k, v, return_lse=True, **_full_opts(mode, kv_lengths)
    )
    assert out.dtype == F32 and out.shape == full_out.shape
    assert_out_close(out, full_out.astype(F64), F32, rtol=1e-5)
    assert_lse_close(lse, full_lse.astype(F64), tol=1e-5)

    ref_out, ref_lse = reference_attention(q, k, v, **_full_opts(mode, kv_lengths))
    assert_out_close(out, ref_out, F32, rtol=1e-5)
    assert_lse_close(lse, ref_lse)
    assert_masked_rows_zero(out, ref_lse)
    chunks = list(zip(bounds, bounds[1:], strict=False))
    if mode == "causal" and any(b > a > NK - nq for a, b in chunks):
        # Sanity: a chunk starts after the first query's position, so some part saw nothing
        # for some rows that the full problem does see.
        assert any(np.isneginf(x).any() for x in parts)
    if mode == "causal" and nq > NK:
        assert np.isneginf(lse[..., : nq - NK]).all()  # rows that see no key at all


def test_merge_float64_reference_parts_exact(rng):
    """Merging float64 reference parts reproduces the float64 reference to rounding."""
    q = rng.standard_normal((2, 3, 20, 8))
    k = rng.standard_normal((2, 3, NK, 8)) * 3.0
    v = rng.standard_normal((2, 3, NK, 5))

    def ref(q, k, v, *, return_lse, **opts):
        return reference_attention(q, k, v, **opts)

    for bounds in SPLITS:
        (out, lse), _ = _split_and_merge(q, k, v, bounds, "causal", attn=ref)
        exp, exp_lse = reference_attention(q, k, v, causal=True)
        assert out.dtype == F64 and lse.dtype == F64
        assert rel_err(out, exp) < 1e-13
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(exp_lse))
        fin = np.isfinite(exp_lse)
        np.testing.assert_allclose(lse[fin], exp_lse[fin], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=str)
def test_merge_keeps_output_dtype(rng, dtype):
    q, k, v = (rng.standard_normal((2, 16, 8)).astype(np.float32).astype(dtype) for _ in range(3))
    (out, lse), _ = _split_and_merge(q, k, v, (0, 6, 16), "full")
    full_out, full_lse = ferroattn.attention(q, k, v, return_lse=True)
    assert out.dtype == dtype and lse.dtype == F32
    tol = {F16: 2e-3, BF16: 1e-2, F64: 1e-5}[dtype]
    assert_out_close(out, full_out.astype(F64), dtype, rtol=tol)
    assert_lse_close(lse, full_lse.astype(F64))


def test_merge_bshd_layout_and_stacked_input(rng):
    q = rng.standard_normal((2, 20, 4, 8), dtype=np.float32)  # (B, N, H, D)
    k = rng.standard_normal((2, 30, 4, 8), dtype=np.float32)
    v = rng.standard_normal((2, 30, 4, 8), dtype=np.float32)
    parts = [
        ferroattn.attention(q, k[:, s], v[:, s], layout="bshd", return_lse=True)
        for s in (slice(0, 12), slice(12, 30))
    ]
    outs = np.stack([o for o, _ in parts])  # (P, B, N, H, Dv)
    lses = np.stack([lse.swapaxes(-1, -2) for _, lse in parts])  # (P, B, N, H)
    out, lse = merge_partials(outs, lses)
    full, full_lse = ferroattn.attention(q, k, v, layout="bshd", return_lse=True)
    assert_out_close(out, full.astype(F64), F32)
    assert_lse_close(lse.swapaxes(-1, -2), full_lse.astype(F64))


def test_merge_is_stable_for_large_lse():
    o1 = np.full((2, 3), 1.0, np.float32)
    o2 = np.full((2, 3), 5.0, np.float32)
    for base in (1e4, -1e4, 0.0):
        l1 = np.full(2, base, np.float32)
        l2 = np.full(2, base + math.log(3.0), np.float32)
        out, lse = merge_partials([o1, o2], [l1, l2])
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
        np.testing.assert_allclose(out, 4.0, rtol=1e-5)  # 1/4 * 1 + 3/4 * 5
        np.testing.assert_allclose(lse, np.float32(base) + math.log(4.0), rtol=1e-6, atol=1e-6)


def test_merge_empty_rows_give_zero_and_neg_inf():
    o1 = np.full((3, 2), np.nan, np.float32)  # garbage where the part saw nothing
    o2 = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]], np.float32)
    l1 = np.array([-np.inf, -np.inf, -np.inf], np.float32)
    l2 = np.array([0.5, -np.inf, 0.25], np.float32)
    out, lse = merge_partials([o1, o2], [l1, l2])
    np.testing.assert_array_equal(out, [[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(lse, np.array([0.5, -np.inf, 0.25], np.float32))
    out, lse = merge_partials([o1], [l1])  # one part, nothing seen anywhere
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_merge_out_argument(rng):
    outs = [rng.standard_normal((2, 5, 4), dtype=np.float32) for _ in range(3)]
    lses = [rng.standard_normal((2, 5), dtype=np.float32) for _ in range(3)]
    expected, expected_lse = merge_partials(outs, lses)
    buf = np.empty_like(outs[0])
    got, lse = merge_partials(outs, lses, out=buf)
    assert got is buf
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(lse, expected_lse)
    first = outs[0]
    got, _ = merge_partials(outs, lses, out=first)  # in place into a part is allowed
    assert got is first
    np.testing.assert_array_equal(got, expected)


def test_merge_single_part_is_identity(rng):
    o = rng.standard_normal((3, 4), dtype=np.float32)
    lse = rng.standard_normal(3, dtype=np.float32)
    out, merged = merge_partials([o], [lse])
    np.testing.assert_allclose(out, o, rtol=1e-6)
    np.testing.assert_allclose(merged, lse, rtol=1e-6)


@pytest.mark.parametrize(
    ("outputs", "lses", "kwargs", "exc", "match"),
    [
        ([], [], {}, ValueError, "outputs must contain at least one"),
        ([np.zeros((2, 3), F32)], [], {}, ValueError, "same length"),
        ([np.zeros((2, 3), F32)] * 2, [np.zeros(2, F32)], {}, ValueError, "same length"),
        (
            [np.zeros((2, 3), F32), np.zeros((2, 4), F32)],
            [np.zeros(2, F32)] * 2,
            {},
            ValueError,
            r"outputs\[1\]",
        ),
        ([np.zeros((2, 3), F32)], [np.zeros(3, F32)], {}, ValueError, r"lses\[0\]"),
        ([np.zeros((2, 3), F32)], [np.zeros((2, 1), F32)], {}, ValueError, r"lses\[0\]"),
        (
            [np.zeros((2, 3), F32), np.zeros((2, 3), F64)],
            [np.zeros(2, F32)] * 2,
            {},
            TypeError,
            r"outputs\[1\]",
        ),
        ([np.zeros((2, 3), np.int32)], [np.zeros(2, F32)], {}, TypeError, r"outputs\[0\]"),
        ([np.zeros((2, 3), F32)], [np.zeros(2, np.int64)], {}, TypeError, r"lses\[0\]"),
        (np.float32(1.0), [np.zeros(2, F32)], {}, TypeError, "outputs"),
        ([np.array(1.0, F32)], [np.array(1.0, F32)], {}, ValueError, "at least 1"),
        (np.zeros((2, 3), F32), "ab", {}, TypeError, "lses"),
        (
            [np.zeros((2, 3), F32)],
            [np.zeros(2, F32)],
            {"out": np.zeros((2, 3), F64)},
            TypeError,
            "out",
        ),
        (
            [np.zeros((2, 3), F32)],
            [np.zeros(2, F32)],
            {"out": np.zeros((3, 2), F32)},
            ValueError,
            "out",
        ),
        ([np.zeros((2, 3), F32)], [np.zeros(2, F32)], {"out": [0.0]}, TypeError, "out"),
    ],
)
def test_merge_errors(outputs, lses, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        merge_partials(outputs, lses, **kwargs)


def test_merge_read_only_out():
    buf = np.zeros((2, 3), F32)
    buf.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        merge_partials([np.zeros((2, 3), F32)], [np.zeros(2, F32)], out=buf)
