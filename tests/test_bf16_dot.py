"""bf16 inputs and float32 ``precision=`` against the float64 reference.

Where the CPU has bf16 dot products (``ferroattn.info()["bf16_dot"]``) prefill tiles of bf16
inputs, and of float32 inputs at ``precision="high"``/``"medium"``, run on them; elsewhere (and
on the scalar and AVX2 paths, which scripts/test.sh runs these tests on too) the float32
kernels compute the same calls. The tolerances hold for both.

Tolerances, by where rounding happens (relative Frobenius error of the output):

- bf16 inputs: Q, K and V are exact in bf16 and the products are summed in float32, so the
  only rounding inside is P's, to bf16 before P·V: 2^-9 relative per weight (round to
  nearest), which moves an output, a weighted mean of the values, by at most ~2^-9 of the
  values' size; the bf16 output adds one more rounding of 2^-9. 2^-9 + 2^-9 ≈ 3.9e-3 for a
  worst-case alignment of every error; 5e-3 leaves float32's sums room.
- "high": each operand is hi + lo with both parts bf16, ~2^-17 of it left out, and lo·lo
  (~2^-18) is not computed: ~3·2^-18 ≈ 1.1e-5 relative per product at worst, independent
  signs average it down, so 1e-5 holds on the Frobenius norm (measured: ~1e-6).
- "medium": one bf16 rounding of each operand (2^-9 each) in the scores and P·V: ≤ 1e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from reference import BF16, F32, assert_lse_close, random_inputs, reference_attention, rel_err

import ferroattn

pytestmark = pytest.mark.kernel

BF16_RTOL = 5e-3
HIGH_RTOL = 1e-5
MEDIUM_RTOL = 1e-2

# Shapes that reach the blocked step with many rows (the one bf16 products take), with odd
# head dims, odd key counts, GQA groups, and a key count past one tile (128 keys).
SHAPES = [
    # (B, Hq, Hkv, Nq, Nk, D, Dv)
    (1, 2, 2, 64, 64, 64, 64),
    (1, 4, 2, 40, 131, 59, 40),
    (2, 4, 1, 33, 257, 128, 128),
    (1, 3, 3, 17, 19, 7, 9),
    (1, 8, 2, 70, 300, 111, 33),
]

OPTIONS = [
    {},
    {"causal": True},
    {"causal": "top_left"},
    {"window": (20, 3)},
    {"softcap": 5.0},
    {"alibi": True},
    {"sinks": True},
    {"mask": True},
    {"bias": True},
    {"kv_lengths": True},
]


def _case(rng, shape, dtype, opts):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = random_inputs(rng, (b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv), dtype)
    kw = dict(opts)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = ferroattn.alibi_slopes(hq)
    if kw.pop("sinks", False):
        kw["sinks"] = rng.standard_normal(hq).astype(np.float32)
    if kw.pop("mask", False):
        kw["mask"] = rng.random((b, hq, nq, nk)) < 0.7
    if kw.pop("bias", False):
        kw["bias"] = rng.standard_normal((b, 1, nq, nk)).astype(np.float32)
    if kw.pop("kv_lengths", False):
        kw["kv_lengths"] = rng.integers(1, nk + 1, size=b)
    return q, k, v, kw


def _reference(q, k, v, **kw):
    return reference_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), **kw
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_bf16_inputs_match_the_reference_on_the_rounded_inputs(shape, opts):
    rng = np.random.default_rng(zlib.crc32(repr((shape, opts)).encode()))
    q, k, v, kw = _case(rng, shape, BF16, opts)
    out, lse = ferroattn.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = _reference(q, k, v, **kw)
    assert out.dtype == BF16
    err = rel_err(out.astype(np.float64), ref)
    assert err <= BF16_RTOL, f"relative error {err:.2e}"
    # Scores are exact products of bf16 values summed in float32: the LSE is as precise as
    # float32 inputs give it.
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("precision,rtol", [("high", HIGH_RTOL), ("medium", MEDIUM_RTOL)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_float32_precision_within_its_tolerance(shape, opts, precision, rtol):
    rng = np.random.default_rng(zlib.crc32(repr((shape, opts, precision)).encode()))
    q, k, v, kw = _case(rng, shape, F32, opts)
    out = ferroattn.attention(q, k, v, precision=precision, **kw)
    ref, _ = _reference(q, k, v, **kw)
    err = rel_err(out, ref)
    assert err <= rtol, f"relative error {err:.2e} at precision={precision}"


@pytest.mark.parametrize("causal", [False, True])
def test_highest_is_the_default_and_the_global_setting_applies(causal):
    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, (1, 4, 80, 64), (1, 2, 150, 64), (1, 2, 150, 64), F32)
    base = ferroattn.attention(q, k, v, causal=causal)
    np.testing.assert_array_equal(
        ferroattn.attention(q, k, v, causal=causal, precision="highest"), base
    )
    medium = ferroattn.attention(q, k, v, causal=causal, precision="medium")
    try:
        ferroattn.set_float32_precision("medium")
        assert ferroattn.get_float32_precision() == "medium"
        np.testing.assert_array_equal(ferroattn.attention(q, k, v, causal=causal), medium)
        # The per-call argument wins over the global setting.
        np.testing.assert_array_equal(
            ferroattn.attention(q, k, v, causal=causal, precision="highest"), base
        )
    finally:
        ferroattn.set_float32_precision("highest")
    if ferroattn.info()["bf16_dot"]:
        assert not np.array_equal(medium, base)


def test_precision_reaches_varlen_the_cache_and_the_layer():
    rng = np.random.default_rng(9)
    n, h, d = 96, 4, 32
    q, k, v = random_inputs(rng, (n, h, d), (n, h, d), (n, h, d), F32)
    cu = [0, 40, 96]
    got = ferroattn.attention_varlen(q, k, v, cu, cu, causal=True, precision="high")
    want = ferroattn.attention_varlen(q, k, v, cu, cu, causal=True)
    assert rel_err(got, want) <= HIGH_RTOL
    q4, k4, v4 = (x.transpose(1, 0, 2)[None] for x in (q, k, v))
    cache = ferroattn.KVCache(1, h, d, capacity=128)
    step = cache.step(q4, k4, v4, precision="medium")
    assert rel_err(step, ferroattn.attention(q4, k4, v4, causal=True)) <= MEDIUM_RTOL
    cache2 = ferroattn.KVCache(1, h, d, capacity=128)
    cache2.append(k4, v4)
    again = cache2.attend(q4, precision="medium")
    assert rel_err(again, step) <= MEDIUM_RTOL
    w = rng.standard_normal((h * d, h * d)).astype(np.float32) / np.sqrt(h * d)
    layer = ferroattn.SelfAttention(w, w, w, w, num_heads=h, precision="high")
    x = rng.standard_normal((1, n, h * d)).astype(np.float32)
    plain = ferroattn.SelfAttention(w, w, w, w, num_heads=h)
    assert rel_err(layer.forward(x), plain.forward(x)) <= HIGH_RTOL


@pytest.mark.parametrize("bad", ["low", "HIGH", "", 3, None])
def test_an_invalid_precision_is_refused_by_name(bad):
    q = np.ones((1, 1, 4, 8), np.float32)
    if bad is not None:
        with pytest.raises(ValueError, match="precision"):
            ferroattn.attention(q, q, q, precision=bad)
        with pytest.raises(ValueError, match="precision"):
            ferroattn.KVCache(1, 1, 8, capacity=8).attend(q, precision=bad)
    with pytest.raises(ValueError, match="precision"):
        ferroattn.set_float32_precision(bad)
    assert ferroattn.get_float32_precision() == "highest"


def test_the_switch_turns_bf16_products_off():
    code = (
        "import ferroattn, json; i = ferroattn.info(); print(json.dumps([i['bf16_dot'], i['amx']]))"
    )
    env = dict(os.environ, FERROATTN_BF16DOT="0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[false, false]"
    info = ferroattn.info()
    assert info["amx"] is False
    uses = info["isa"] == "avx512" and "avx512bf16" in info["cpu_features"]
    if os.environ.get("FERROATTN_BF16DOT", "").strip() != "0":
        assert info["bf16_dot"] == uses
