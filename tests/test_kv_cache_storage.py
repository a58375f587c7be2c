"""KVCache's storage read in place: slots, spans of positions, attention by slot, reordering.

What a caller that tracks positions itself (the transformers cache) relies on.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import reference_attention, rel_err

import ferroattn

pytestmark = pytest.mark.kernel

F32 = np.float32


def _filled(rng, n, *, window=None, dtype="float32", b=2, hk=2, d=16):
    cache = ferroattn.KVCache(b, hk, d, None if window else 64, dtype=dtype, window=window)
    k = rng.standard_normal((b, hk, n, d), dtype=F32)
    v = rng.standard_normal((b, hk, n, d), dtype=F32)
    for i in range(n):  # one token at a time, as decoding writes them
        cache.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    return cache, k, v


def test_span_is_a_view_without_window(rng):
    cache, k, v = _filled(rng, 9)
    ks, vs = cache.span(2, 7)
    np.testing.assert_array_equal(ks, k[:, :, 2:7])
    np.testing.assert_array_equal(vs, v[:, :, 2:7])
    assert np.shares_memory(ks, cache.keys(0))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_span_of_a_ring_is_in_position_order(rng, dtype):
    cache, k, v = _filled(rng, 13, window=5, dtype=dtype)
    ks, vs = cache.span(8, 13)
    assert ks.dtype == F32
    tol = 1e-6 if dtype == "float32" else 2e-2
    assert rel_err(ks, k[:, :, 8:13]) < tol and rel_err(vs, v[:, :, 8:13]) < tol
    for seq in range(2):
        np.testing.assert_array_equal(ks[seq], cache.keys(seq))
    with pytest.raises(ValueError, match="left the window"):
        cache.span(7, 13)
    with pytest.raises(ValueError, match="not stored"):
        cache.span(10, 14)


def test_slot_wraps_in_a_ring():
    cache = ferroattn.KVCache(1, 1, 8, window=4)
    assert [cache.slot(p) for p in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert ferroattn.KVCache(1, 1, 8, 16).slot(11) == 11


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_attend_slots_reads_a_ring_in_place(rng, dtype):
    # A decode query over the whole ring: slot order does not change the result.
    cache, k, v = _filled(rng, 11, window=4, dtype=dtype)
    q = rng.standard_normal((2, 4, 1, 16), dtype=F32)
    got = cache.attend_slots(q, [(0, 0, 1, 0, 4), (1, 0, 1, 0, 4)])
    ref, _ = reference_attention(q, k[:, :, 7:], v[:, :, 7:])
    assert rel_err(got, ref) < (1e-5 if dtype == "float32" else 2e-2)


def test_attend_slots_with_key_ranges_and_causal(rng):
    cache, k, v = _filled(rng, 10)
    q = rng.standard_normal((2, 4, 3, 16), dtype=F32)
    out = np.full((2, 4, 3, 16), np.nan, dtype=F32)
    # Sequence 0: keys 3..10 with its last two queries; sequence 1: not named (zeros).
    got = cache.attend_slots(q, [(0, 1, 2, 3, 7)], causal=True, window=4, softcap=20.0, out=out)
    assert got is out
    ref, _ = reference_attention(
        q[:1, :, 1:], k[:1, :, 3:], v[:1, :, 3:], causal=True, window=4, softcap=20.0
    )
    assert rel_err(got[:1, :, 1:], ref) < 1e-5
    assert not got[:1, :, :1].any() and not got[1].any()


def test_reorder_moves_sequences_with_their_lengths(rng):
    cache, k, _ = _filled(rng, 6, b=3)
    cache.append(k[:1, :1, :1].repeat(3, 0).repeat(2, 1), k[:, :, :1], lengths=[1, 0, 0])
    cache.reorder([2, 0, 0])
    assert cache.lengths.tolist() == [6, 7, 7]
    np.testing.assert_array_equal(cache.keys(1), cache.keys(2))
    with pytest.raises(ValueError, match="index"):
        cache.reorder([0, 3, 1])
    with pytest.raises(ValueError, match="index"):
        cache.reorder([0, 1])
