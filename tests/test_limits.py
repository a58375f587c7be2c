"""The rules ferroattn keeps at the edges of its inputs, beyond what ``test_reliability.py``
checks: a step with zero query heads still stores its tokens, window sides as long as the
sequence are exact, values the float32 kernels cannot hold are refused by name, a cache step
that fails after storing is undone, and the bounds of ``set_num_threads`` / ``alibi_slopes``.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import reference_attention, rel_err

import ferroattn
from ferroattn import _ferroattn
from ferroattn._args import MaskOptions

F32 = np.float32


def _tokens(rng, b, h, n, d):
    return rng.standard_normal((b, h, n, d)).astype(F32)


@pytest.mark.parametrize("kind", ["plain", "window", "int8"])
def test_step_with_zero_query_heads_stores_its_tokens(rng, kind):
    kw = {"window": 4} if kind == "window" else {"capacity": 8}
    cache = ferroattn.KVCache(2, 1, 8, dtype="int8" if kind == "int8" else "float32", **kw)
    k, v = _tokens(rng, 2, 1, 3, 8), _tokens(rng, 2, 1, 3, 8)
    out = cache.step(np.zeros((2, 0, 3, 8), F32), k, v)
    assert out.shape == (2, 0, 3, 8)
    assert cache.lengths.tolist() == [3, 3]
    assert cache.attend(np.zeros((2, 0, 1, 8), F32)).shape == (2, 0, 1, 8)
    assert cache.lengths.tolist() == [3, 3]


@pytest.mark.parametrize("causal", [False, True, "top_left"])
@pytest.mark.parametrize("nq,nk", [(9, 3), (3, 9), (5, 5)])
def test_window_sides_near_the_sequence_length_are_exact(rng, causal, nq, nk):
    # A side >= max(Nq, Nk) is passed on as unbounded; shorter ones still hide keys (with
    # top-left alignment and Nq > Nk, a side of Nk hides keys from the last queries).
    q, k, v = _tokens(rng, 1, 2, nq, 8), _tokens(rng, 1, 1, nk, 8), _tokens(rng, 1, 1, nk, 8)
    span = max(nq, nk)
    for side in (nk - 1, nk, nk + 1, span - 1, span, span + 1, 2**62, 2**63, 2**80):
        for window in ((side, 0), (0, side), (side, side)):
            got = ferroattn.attention(q, k, v, causal=causal, window=window)
            big = 10**6  # beyond any of these sequences: unbounded in the reference
            meaning = tuple(min(s, big) for s in window)
            want, _ = reference_attention(q, k, v, causal=causal, window=meaning)
            assert rel_err(got, want) <= 1e-5, (window, causal)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"scale": 1e39}, "scale"),
        ({"scale": -1e39}, "scale"),
        ({"softcap": 1e39}, "softcap"),
        ({"softcap": 1e-50}, "softcap"),
        ({"alibi_slopes": [1e300, 0.5]}, "alibi_slopes"),
        ({"sinks": [0.0, -1e300]}, "sinks"),
        ({"bias": np.full((4, 4), -1e300)}, "bias"),
        ({"return_lse": "yes"}, "return_lse"),
    ],
    ids=str,
)
def test_values_the_float32_kernels_cannot_hold_are_refused(rng, kwargs, arg):
    q, k, v = _tokens(rng, 1, 2, 4, 8), _tokens(rng, 1, 1, 4, 8), _tokens(rng, 1, 1, 4, 8)
    with pytest.raises((ValueError, TypeError), match=arg):
        ferroattn.attention(q, k, v, **kwargs)


def test_infinite_bias_still_masks(rng):
    q, k, v = _tokens(rng, 1, 1, 4, 8), _tokens(rng, 1, 1, 4, 8), _tokens(rng, 1, 1, 4, 8)
    bias = np.where(np.tril(np.ones((4, 4), bool)), 0.0, -np.inf)
    got = ferroattn.attention(q, k, v, bias=bias)
    np.testing.assert_allclose(got, ferroattn.attention(q, k, v, causal=True), rtol=1e-6)


def test_broadcast_bias_is_converted_without_expanding(rng):
    q, k, v = _tokens(rng, 1, 2, 4, 8), _tokens(rng, 1, 1, 4, 8), _tokens(rng, 1, 1, 4, 8)
    row = rng.standard_normal(4)
    bias = np.broadcast_to(row, (1, 2, 4, 4))  # float64, zero strides
    got = ferroattn.attention(q, k, v, bias=bias)
    want = ferroattn.attention(q, k, v, bias=np.ascontiguousarray(bias, dtype=F32))
    np.testing.assert_array_equal(got, want)


def test_kernel_working_memory_beyond_the_machine_is_refused_by_name():
    # Straight to the binding with a broadcast head dimension of 2**40: the kernels' scratch
    # (rows × D floats per worker) cannot be allocated; refused before the core runs.
    x = np.broadcast_to(np.ones((1, 1, 1, 1), F32), (1, 1, 1, 2**40))
    v = np.ones((1, 1, 1, 1), F32)
    out = np.empty((1, 1, 1, 1), F32)
    plain = MaskOptions(1.0, None, False, False, None, None)
    with pytest.raises(MemoryError, match="q, k and v"):
        _ferroattn.attention(x, x, v, out, "float32", plain)
    with pytest.raises(MemoryError, match="q and k"):
        _ferroattn.attention_weights(x, x, "float32", plain)
    with pytest.raises(MemoryError, match="q, k and v"):
        _ferroattn.linear_attention(x, x, v, out, "float32")


@pytest.mark.parametrize("stride", [2**62, -(2**62), 2**63 - 4])
def test_strides_no_buffer_can_span_are_refused_not_read(stride):
    # Strides NumPy takes on trust (as_strided) whose span exceeds any buffer: the binding
    # bounds arrays in 128-bit arithmetic and refuses them before reading anything.
    base = np.ones(4, F32)
    q = np.lib.stride_tricks.as_strided(base, shape=(3, 1, 1, 4), strides=(stride, 0, 0, 4))
    k = np.ones((3, 1, 1, 4), F32)
    with pytest.raises(ValueError, match="q: .*spans more memory than a buffer can hold"):
        ferroattn.attention(q, k, k)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("lengths", [None, [1, 1]])
def test_step_that_fails_after_storing_is_undone(rng, monkeypatch, window, lengths):
    kw = {"window": window} if window else {"capacity": 8}
    cache = ferroattn.KVCache(2, 1, 8, **kw)
    k, v = _tokens(rng, 2, 1, 2, 8), _tokens(rng, 2, 1, 2, 8)
    cache.append(k, v)
    keys = [cache.keys(b).copy() for b in range(2)]

    def no_memory(*args, **kwargs):
        raise MemoryError("q: simulated")

    monkeypatch.setattr(_ferroattn, "attention", no_memory)
    q = _tokens(rng, 2, 2, 1, 8)
    kw1 = {} if lengths is None else {"lengths": lengths}
    with pytest.raises(MemoryError):
        cache.step(q, k[:, :, :1], v[:, :, :1], **kw1)
    assert cache.lengths.tolist() == [2, 2]
    for b in range(2):
        np.testing.assert_array_equal(cache.keys(b), keys[b])


def test_set_num_threads_bounds(restore_threads):
    ferroattn.set_num_threads(np.int32(3))
    assert ferroattn.get_num_threads() == 3
    with pytest.raises(ValueError, match=r"\bn\b"):
        ferroattn.set_num_threads(ferroattn.MAX_THREADS + 1)
    with pytest.raises(TypeError, match=r"\bn\b"):
        ferroattn.set_num_threads(np.bool_(True))


def test_alibi_slopes_bound_and_values():
    for n in (1, 3, 5, 8, 12, 24, 80, 1000):
        low = 2 ** int(np.floor(np.log2(n)))
        want = [2.0 ** (-8.0 * (i + 1) / low) for i in range(low)]
        want += [2.0 ** (-8.0 * (i + 1) / (2 * low)) for i in range(0, 2 * low, 2)][: n - low]
        np.testing.assert_allclose(ferroattn.alibi_slopes(n), want, rtol=1e-6)
    assert ferroattn.alibi_slopes(2**20).shape == (2**20,)
    with pytest.raises(ValueError, match="num_heads"):
        ferroattn.alibi_slopes(2**20 + 1)


def test_layout_counts_beyond_the_block_count():
    n = 5
    assert ferroattn.strided_layout(n, stride=2**70, local=2**70, causal=False).all()
    assert ferroattn.local_global_layout(n, window=2**70, global_blocks=2**70).all()
    assert ferroattn.bigbird_layout(n, random_blocks=2**70, seed=2**40).all()


def test_self_attention_rope_theta_of_another_kind_is_named():
    w = np.ones((4, 4), F32)
    with pytest.raises(TypeError, match="rope_theta"):
        ferroattn.SelfAttention(w, w, w, w, num_heads=2, rope_theta="x")
