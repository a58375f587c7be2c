"""ferroattn.distributed on a local Ray: ShardedKVCache and context_parallel_attention.

The references are the single-process ones: a :class:`ferroattn.KVCache` of the whole capacity
fed the same calls, and :func:`ferroattn.attention` over the whole problem. One Ray session
serves the module (starting Ray costs seconds); small shapes keep the kernels' time negligible
next to the round trips.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from optional import require

import ferroattn

ray = require("ray", "ray")

from ferroattn.distributed import (  # noqa: E402 - after the skip: it needs Ray
    ShardedKVCache,
    ShardError,
    context_parallel_attention,
)
from ferroattn.distributed._ranges import split, visible_part  # noqa: E402

B, HKV, HQ, D = 2, 2, 4, 16


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray for the whole run, shut down at its end (a session another test module
    started is used as it is)."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _calls(cache: ShardedKVCache) -> list[int]:
    return ray.get([a.calls.remote() for a in cache.actors])


# ----------------------------------------------------------------- the ranges, by brute force


def _mask(first, count, lo, hi, left, right):
    p = first + np.arange(count)[:, None]
    j = np.arange(lo, hi)[None, :]
    seen = np.ones((count, hi - lo), dtype=bool)
    if left is not None:
        seen &= j >= p - left
    if right is not None:
        seen &= j <= p + right
    return seen


def _part_mask(part, count, lo, hi):
    """What a kernel call computing ``part`` shows, in the coordinates of ``_mask``."""
    seen = np.zeros((count, hi - lo), dtype=bool)
    if part is None:
        return seen
    left, right = part.window
    a = np.arange(part.q_len)[:, None] + part.k_len - part.q_len  # bottom-right in the call
    j = np.arange(part.k_len)[None, :]
    inner = np.ones((part.q_len, part.k_len), dtype=bool)
    if left is not None:
        inner &= j >= a - left
    if right is not None:
        inner &= j <= a + right
    k0 = part.k0 - lo
    seen[part.q0 : part.q0 + part.q_len, k0 : k0 + part.k_len] = inner
    return seen


def test_visible_part_sees_what_the_whole_problem_sees():
    sides = [None, 0, 1, 3, 7]
    for first, count, lo, hi, left, right in itertools.product(
        [-3, 0, 2, 5, 9], [1, 2, 4, 6], [0, 3, 6], [4, 8, 12], sides, sides
    ):
        if hi <= lo:
            continue
        part = visible_part(first, count, lo, hi, left, right)
        want = _mask(first, count, lo, hi, left, right)
        got = _part_mask(part, count, lo, hi)
        assert np.array_equal(got, want), (first, count, lo, hi, left, right, part)
        if part is not None:
            assert all(s is None or s >= 0 for s in part.window)


def test_split_covers_in_order():
    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split(2, 4) == [(0, 1), (1, 2)]


# ------------------------------------------------------------------------ the sharded cache


def _pair(dtype="float32", window=None, shards=3, capacity=7):
    """A sharded cache and the single KVCache it must equal."""
    sharded = ShardedKVCache(shards, B, HKV, D, capacity, dtype=dtype, window=window)
    if window is None:
        single = ferroattn.KVCache(B, HKV, D, shards * capacity, dtype=dtype)
    else:  # the ring keeps what the rollbacks below need
        single = ferroattn.KVCache(B, HKV, D, dtype=dtype, window=window, max_rollback=6)
    return sharded, single


def _drive(rng, sharded, single, tol, **options):
    """The same calls on both caches, every result compared: chunks and single tokens that
    cross shard boundaries, ragged lengths, attend after append, rollbacks back across a
    boundary (one per sequence too), a reset."""

    def kv(t):
        return rng.standard_normal((2, B, HKV, t, D), dtype=np.float32)

    def q(t):
        return rng.standard_normal((B, HQ, t, D), dtype=np.float32)

    def same(a, b):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol)
        np.testing.assert_array_equal(sharded.lengths, single.lengths)

    ops = [
        ("step", 5, None),
        ("step", 4, [4, 1]),  # ragged; the first sequence crosses into shard 1
        *[("step", 1, None)] * 4,
        ("append", 6, [6, 3]),  # spans a boundary for one sequence only
        ("attend", 3, [3, 2]),  # queries of tokens on both sides of a boundary
        ("rollback", 4, None),  # back across a boundary
        ("step", 3, None),
        ("rollback", [2, 0], None),
        *[("step", 1, None)] * 3,
        ("reset", 1, None),
        ("step", 2, [2, 2]),
    ]
    for op, n, lengths in ops:
        if op == "step":
            k, v = kv(n)
            qn = q(n)
            same(
                sharded.step(qn, k, v, lengths=lengths, **options),
                single.step(qn, k, v, lengths=lengths, **options),
            )
        elif op == "append":
            k, v = kv(n)
            sharded.append(k, v, lengths=lengths)
            single.append(k, v, lengths=lengths)
        elif op == "attend":
            qn = q(n)
            same(
                sharded.attend(qn, lengths=lengths, **options),
                single.attend(qn, lengths=lengths, **options),
            )
        elif op == "rollback":
            if isinstance(n, list):
                sharded.rollback(n)
                for b, m in enumerate(n):
                    single.rollback(m, seq=b)
            else:
                sharded.rollback(n)
                single.rollback(n)
        else:
            sharded.reset(n)
            single.reset(n)
        np.testing.assert_array_equal(sharded.lengths, single.lengths)


# Both caches store the same encoded tokens (float16 rounding, and int8 with scales per token
# and head, so a shard encodes a token as the whole cache does): what differs is only the order
# of the float32 sums (per shard, then merged), ~1e-6 of the result. float16 and int8 get a
# little more room for the kernels' int8 path (queries rounded to 16 bits inside each call).
@pytest.mark.parametrize(
    ("dtype", "shards", "tol"), [("float32", 3, 1e-5), ("float16", 2, 2e-5), ("int8", 2, 2e-5)]
)
def test_sharded_equals_one_cache(rng, dtype, shards, tol):
    sharded, single = _pair(dtype, shards=shards, capacity=21 // shards + 1)
    with sharded:
        _drive(rng, sharded, single, tol)
        one = ferroattn.KVCache(B, HKV, D, 21 // shards + 1, dtype=dtype)
        assert sharded.nbytes == shards * one.nbytes
    assert sharded.closed


def test_sharded_window_softcap_scale(rng):
    sharded, single = _pair(window=4)
    with sharded:
        _drive(rng, sharded, single, 1e-5, softcap=3.0, scale=0.4)
        # Lengths are now [21, 2]: the windows of the next queries reach shard 2 (positions
        # 17-20) and shard 0 (positions 0-1); shard 1 is not asked.
        assert sharded.lengths.tolist() == [21, 2]
        before = _calls(sharded)
        sharded.attend(rng.standard_normal((B, HQ, 1, D), dtype=np.float32))
        assert np.subtract(_calls(sharded), before).tolist() == [1, 0, 1]


def test_long_chunks_through_the_object_store(rng):
    # Queries of 100 KiB and more go to the shards through one ray.put.
    sharded, single = _pair("float16", shards=2, capacity=200)
    with sharded:
        for t in (230, 150):
            q = rng.standard_normal((B, HQ, t, D), dtype=np.float32)
            k, v = rng.standard_normal((2, B, HKV, t, D), dtype=np.float32)
            got, want = sharded.step(q, k, v), single.step(q, k, v)
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
            assert got.flags.writeable
        # Tokens a shard holds past the cache's count (a call that failed on another shard
        # leaves them) are dropped by its next call.
        held = np.array([180, 180])
        stray = rng.standard_normal((B, HKV, 3, D), dtype=np.float32)
        ray.get(sharded.actors[1].run.remote(held, (stray, stray, np.array([3, 3])), None, [], {}))
        q = rng.standard_normal((B, HQ, 1, D), dtype=np.float32)
        k, v = rng.standard_normal((2, B, HKV, 1, D), dtype=np.float32)
        got, want = sharded.step(q, k, v), single.step(q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------- failures


def test_bad_input_raises_before_anything_is_sent(rng):
    with ShardedKVCache(2, B, HKV, D, 4) as cache:
        # Queries before any key see nothing: zeros, in q's dtype.
        q16 = rng.standard_normal((B, HQ, 2, D)).astype(np.float16)
        out = cache.attend(q16)
        assert out.dtype == np.float16 and out.shape == q16.shape and not out.any()
        k, v = rng.standard_normal((2, B, HKV, 3, D), dtype=np.float32)
        cache.append(k, v)
        before, lengths = _calls(cache), cache.lengths
        q = rng.standard_normal((B, HQ, 3, D), dtype=np.float32)
        bad = [
            lambda: cache.append(k[:, :1], v[:, :1]),  # wrong KV heads
            lambda: cache.append(k, v[..., :8]),  # wrong dim
            lambda: cache.append(k, v, lengths=[3]),  # lengths of the wrong size
            lambda: cache.append(np.concatenate([k, k], axis=2), np.concatenate([v, v], 2)),
            lambda: cache.step(q[:, :3], k, v),  # heads not a multiple of KV heads
            lambda: cache.step(q[:, :, :2], k, v),  # fewer queries than tokens
            lambda: cache.attend(q, scale=float("nan")),
            lambda: cache.attend(q, softcap=-1.0),
            lambda: cache.attend(q, lengths=[4, 0]),
            lambda: cache.rollback(4),
            lambda: cache.rollback([1, 2, 3]),
        ]
        for call in bad:
            with pytest.raises(ValueError):
                call()
        with pytest.raises(TypeError):
            cache.append(k.astype(np.int32), v)
        assert _calls(cache) == before
        np.testing.assert_array_equal(cache.lengths, lengths)
        # Room is counted over all shards: 3 + 5 fits the two shards of 4 exactly.
        k5, v5 = rng.standard_normal((2, B, HKV, 5, D), dtype=np.float32)
        cache.append(k5, v5)
        assert cache.lengths.tolist() == [8, 8]
    with pytest.raises(RuntimeError, match="closed"):
        cache.attend(q)


def test_constructor_checks(rng):
    with pytest.raises(ValueError, match="num_shards"):
        ShardedKVCache(0, B, HKV, D, 4)
    with pytest.raises(ValueError, match="shard_capacity"):
        ShardedKVCache(2, B, HKV, D, 0)
    with pytest.raises(TypeError, match="dtype"):
        ShardedKVCache(2, B, HKV, D, 4, dtype="int4")
    for bad in (0, -1.0, "5", True):
        with pytest.raises(ValueError, match="start_timeout"):
            ShardedKVCache(2, B, HKV, D, 4, start_timeout=bad)


def test_shards_without_room_raise_instead_of_waiting():
    # The local Ray has 2 CPUs: a shard reserving 64 is never placed.
    with pytest.raises(ShardError, match="shard 0 did not start within 1 s") as caught:
        ShardedKVCache(2, B, HKV, D, 4, actor_options={"num_cpus": 64}, start_timeout=1)
    assert caught.value.shard == 0


def test_dead_shard_raises_shard_error_naming_it(rng):
    cache = ShardedKVCache(2, B, HKV, D, 8)
    k, v = rng.standard_normal((2, B, HKV, 10, D), dtype=np.float32)
    cache.append(k, v)
    ray.kill(cache.actors[1])
    q = rng.standard_normal((B, HQ, 1, D), dtype=np.float32)
    k1, v1 = rng.standard_normal((2, B, HKV, 1, D), dtype=np.float32)
    with pytest.raises(ShardError, match="shard 1") as caught:
        cache.step(q, k1, v1)
    assert caught.value.shard == 1
    assert isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value.__cause__, ray.exceptions.RayError)
    assert cache.lengths.tolist() == [10, 10]
    cache.close()
    cache.close()
    assert cache.closed


# ------------------------------------------------------------------- context parallel prefill


@pytest.mark.parametrize(
    ("causal", "window", "nq", "nk", "shards"),
    [
        (False, None, 50, 50, 3),
        (True, None, 50, 50, 3),
        (True, None, 20, 50, 4),  # a chunk of queries at the end of longer keys
        ("top_left", None, 30, 30, 2),
        (True, 7, 50, 50, 4),
        (False, (5, 3), 40, 40, 3),
        (True, None, 60, 40, 3),  # more queries than keys: the first see nothing
    ],
)
def test_context_parallel_equals_attention(rng, causal, window, nq, nk, shards):
    q = rng.standard_normal((B, HQ, nq, D), dtype=np.float32)
    k, v = rng.standard_normal((2, B, HKV, nk, D), dtype=np.float32)
    opts = {"causal": causal, "window": window, "softcap": 4.0}
    got, got_lse = context_parallel_attention(q, k, v, num_shards=shards, return_lse=True, **opts)
    want, want_lse = ferroattn.attention(q, k, v, return_lse=True, **opts)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_lse, want_lse, atol=1e-5, rtol=1e-5)


def test_context_parallel_bshd_and_float16(rng):
    q = rng.standard_normal((1, 48, HQ, D)).astype(np.float16)  # (B, N, H, D)
    k, v = rng.standard_normal((2, 1, 48, HKV, D)).astype(np.float16)
    got = context_parallel_attention(q, k, v, num_shards=3, causal=True, layout="bshd")
    want = ferroattn.attention(q, k, v, causal=True, layout="bshd")
    assert got.dtype == np.float16 and got.shape == want.shape
    # Each partial output is rounded to float16 before the merge: up to one more float16
    # rounding (2**-11 relative) than attention's single one, on outputs of size ~1.
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)


def test_context_parallel_checks_before_sending(rng):
    q = rng.standard_normal((B, HQ, 8, D), dtype=np.float32)
    k = rng.standard_normal((B, 3, 8, D), dtype=np.float32)
    with pytest.raises(ValueError, match="multiple"):
        context_parallel_attention(q, k, k, num_shards=2)
    with pytest.raises(ValueError, match="num_shards"):
        context_parallel_attention(q, q, q, num_shards=0)
    with pytest.raises(ValueError, match="window"):
        context_parallel_attention(q, q, q, num_shards=2, window=0)
