"""PagedKVCache: block accounting, prefix sharing, all-or-nothing calls, and attention equal to
a contiguous KVCache holding the same tokens."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paged_reference import gather, paged_reference
from reference import rel_err

import ferroattn

# Run once per SIMD path by scripts/test.sh (the cache kernels depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel

F32 = np.float32
HQ, HKV, D, DV = 4, 2, 8, 12
DTYPES = ["float32", "float16", "bfloat16", "int8"]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "paged_scheduler.py"


def _tokens(rng, n, b=1):
    k = rng.standard_normal((b, HKV, n, D), dtype=F32)
    v = rng.standard_normal((b, HKV, n, DV), dtype=F32)
    return k, v


def _contiguous(dtype, k, v):
    """A one-sequence KVCache of ``dtype`` holding ``k (Hkv, n, D)``, ``v``."""
    cache = ferroattn.KVCache(1, HKV, D, max(1, k.shape[1]), dtype=dtype, value_dim=DV)
    if k.shape[1]:
        cache.append(k[None], v[None])
    return cache


def _token_major(cache):
    """``(k_cache, v_cache, k_scale, v_scale)`` as token-major views ``(num_blocks,
    block_size, Hkv, ·)``, whatever the cache's ``kv_layout`` (scales None for float caches)."""
    arrays = (cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale)
    if cache.kv_layout == "nhd":
        return arrays
    return tuple(None if a is None else a.swapaxes(1, 2) for a in arrays)


def _used_blocks(cache):
    """Every block some sequence holds (each once), checking each table's width first."""
    used = set()
    for s in cache.seq_ids:
        table, lens = cache.block_table([s])
        n = -(-int(lens[0]) // cache.block_size)
        assert (table[0, :n] >= 0).all() and (table[0, n:] == -1).all()
        used |= set(table[0, :n].tolist())
    return used


def _snapshot(cache):
    ids = cache.seq_ids
    tables = cache.block_table(ids) if ids else None
    arrays = (cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale)
    storage = [a.copy() for a in arrays if a is not None]
    return ids, tables, cache.num_free_blocks, list(cache._free), storage


def _assert_unchanged(cache, before):
    after = _snapshot(cache)
    assert after[0] == before[0]
    if before[1] is not None:
        for x, y in zip(after[1], before[1], strict=True):
            np.testing.assert_array_equal(x, y)
    assert after[2:4] == before[2:4]
    for x, y in zip(after[4], before[4], strict=True):
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def _check_against(cache, model, dtype, rng):
    """Block accounting is exact, and each sequence holds its tokens and attends as a
    contiguous KVCache of the same tokens does."""
    used = _used_blocks(cache)
    assert cache.num_blocks - cache.num_free_blocks == len(used)
    assert set(cache._free).isdisjoint(used)
    assert sorted(cache.seq_ids, key=repr) == sorted(model, key=repr)
    for s, (k, v) in model.items():
        n = k.shape[1]
        assert cache.length(s) == n
        if n == 0:
            continue
        contiguous = _contiguous(dtype, k, v)
        table, _ = cache.block_table([s])
        kc, vc, ks, vs = _token_major(cache)
        np.testing.assert_allclose(gather(kc, table[0], n, ks), contiguous.keys(0), rtol=1e-6)
        np.testing.assert_allclose(gather(vc, table[0], n, vs), contiguous.values(0), rtol=1e-6)
        for t in {1, min(n, 3)}:
            q = rng.standard_normal((1, HQ, t, D), dtype=F32)
            got = cache.attend([s], q)
            assert rel_err(got, contiguous.attend(q)) <= 1e-5


# ------------------------------------------------------------ the property

_IDS = st.sampled_from(["a", 7, (1, 2), "d"])
_APPEND = st.tuples(st.just("append"), _IDS, st.integers(1, 6), st.none() | _IDS)
_STEP = st.tuples(st.just("step"), _IDS, st.integers(1, 6))
_OPS = st.one_of(  # appends and steps weighted up: they are what the other ops act on
    _APPEND,
    _APPEND,
    _STEP,
    _STEP,
    st.tuples(st.just("add"), _IDS),
    st.tuples(st.just("fork"), _IDS, _IDS),
    st.tuples(st.just("truncate"), _IDS, st.floats(0, 1)),
    st.tuples(st.just("free"), _IDS),
)


def _run_op(cache, model, op, rng):
    """Applies ``op`` to the cache and the model; an op the model says must fail is checked
    to raise the right error and change nothing."""
    kind, s = op[0], op[1]
    known = s in model
    before = _snapshot(cache)

    def refused(error, call):
        with pytest.raises(error):
            call()
        _assert_unchanged(cache, before)

    if kind == "add":
        if known:
            return refused(ValueError, lambda: cache.add(s))
        cache.add(s)
        model[s] = _tokens(rng, 0)[0][0], _tokens(rng, 0)[1][0]
    elif kind in ("append", "step"):
        ids = [s] + ([] if kind == "step" or op[3] in (None, s) else [op[3]])
        t = op[2]
        k, v = _tokens(rng, t, len(ids))
        counts = rng.integers(0, t + 1, len(ids)) if len(ids) > 1 else np.array([t])
        if any(x not in model for x in ids):
            return refused(KeyError, lambda: cache.append(ids, k, v, lengths=counts))
        free = cache.num_free_blocks
        # New blocks needed, and at most one copy per sequence whose last block is shared.
        bs = cache.block_size
        grow = sum(
            -(-(model[x][0].shape[1] + int(c)) // bs) - -(-model[x][0].shape[1] // bs)
            for x, c in zip(ids, counts, strict=True)
            if c
        )
        try:
            if kind == "step":
                q = rng.standard_normal((1, HQ, t, D), dtype=F32)
                got = cache.step(ids, q, k, v)
            else:
                cache.append(ids, k, v, lengths=counts)
        except ValueError as e:
            assert "out of blocks" in str(e)
            assert grow + len(ids) > free, (grow, free)
            _assert_unchanged(cache, before)
            return
        assert grow <= free
        for i, x in enumerate(ids):
            c = int(counts[i])
            model[x] = (
                np.concatenate([model[x][0], k[i, :, :c]], axis=1),
                np.concatenate([model[x][1], v[i, :, :c]], axis=1),
            )
        if kind == "step":
            want = _contiguous(cache.dtype, *model[s]).attend(q)
            assert rel_err(got, want) <= 1e-5
    elif kind == "fork":
        child = op[2]
        if not known:
            return refused(KeyError, lambda: cache.fork(s, child))
        if child in model:
            return refused(ValueError, lambda: cache.fork(s, child))
        free = cache.num_free_blocks
        cache.fork(s, child)
        assert cache.num_free_blocks == free  # nothing copied at the fork
        model[child] = model[s]
    elif kind == "truncate":
        if not known:
            return refused(KeyError, lambda: cache.truncate(s, 0))
        n = model[s][0].shape[1]
        refused(ValueError, lambda: cache.truncate(s, n + 1))
        keep = int(op[2] * n)
        cache.truncate(s, keep)
        model[s] = model[s][0][:, :keep], model[s][1][:, :keep]
    elif kind == "free":
        if not known:
            return refused(KeyError, lambda: cache.free(s))
        cache.free(s)
        del model[s]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=50)
@given(
    ops=st.lists(_OPS, min_size=3, max_size=20),
    block_size=st.sampled_from([1, 3, 4]),
    num_blocks=st.integers(3, 24),
    seed=st.integers(0, 2**16),
)
def test_random_workload_matches_contiguous_caches(dtype, ops, block_size, num_blocks, seed):
    rng = np.random.default_rng(seed)
    cache = ferroattn.PagedKVCache(num_blocks, block_size, HKV, D, dtype=dtype, value_dim=DV)
    model: dict = {}
    # Sequences with tokens from the start, so that most ops find one, two of them sharing a
    # partly filled block (unless the blocks hold one token) so that appends copy it.
    start = [("add", "a"), ("add", 7), ("step", "a", 5), ("append", 7, 2, None), ("fork", "a", "d")]
    for op in start:
        _run_op(cache, model, op, rng)
    for op in ops:
        _run_op(cache, model, op, rng)
        _check_against(cache, model, dtype, rng)
    for s in list(model):
        cache.free(s)
    assert cache.num_free_blocks == num_blocks and len(cache) == 0


# ------------------------------------------------------- fork, copy on write


def _two_sequences(rng, dtype="float32", n=6, block_size=4, num_blocks=16):
    cache = ferroattn.PagedKVCache(num_blocks, block_size, HKV, D, dtype=dtype, value_dim=DV)
    cache.add("p")
    k, v = _tokens(rng, n)
    cache.append(["p"], k, v)
    cache.fork("p", "c")
    return cache, (k[0], v[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_appending_to_a_fork_never_changes_the_other_side(rng, dtype):
    cache, (k, v) = _two_sequences(rng, dtype)
    q = rng.standard_normal((1, HQ, 2, D), dtype=F32)
    parent_before = cache.attend(["p"], q)
    free = cache.num_free_blocks
    # The child appends into the shared, partly filled second block: it copies it first.
    k2, v2 = _tokens(rng, 3)
    cache.append(["c"], k2, v2)
    assert cache.num_free_blocks == free - 2  # the copy, and one new block
    np.testing.assert_array_equal(cache.attend(["p"], q), parent_before)
    child = _contiguous(dtype, np.concatenate([k, k2[0]], 1), np.concatenate([v, v2[0]], 1))
    child_before = cache.attend(["c"], q)
    assert rel_err(child_before, child.attend(q)) <= 1e-5
    # The parent is now the only user of its second block: it writes there in place.
    k3, v3 = _tokens(rng, 1)
    cache.append(["p"], k3, v3)
    assert cache.num_free_blocks == free - 2
    np.testing.assert_array_equal(cache.attend(["c"], q), child_before)
    parent = _contiguous(dtype, np.concatenate([k, k3[0]], 1), np.concatenate([v, v3[0]], 1))
    assert rel_err(cache.attend(["p"], q), parent.attend(q)) <= 1e-5


def test_two_sharers_appending_together_copy_once(rng):
    cache, _ = _two_sequences(rng)
    free = cache.num_free_blocks
    k, v = _tokens(rng, 1, 2)
    cache.append(["p", "c"], k, v)  # 6 -> 7 tokens each: inside the shared block
    assert cache.num_free_blocks == free - 1
    tables, _ = cache.block_table(["p", "c"])
    assert tables[0, 0] == tables[1, 0] and tables[0, 1] != tables[1, 1]


def test_fork_on_a_block_boundary_copies_nothing(rng):
    cache, _ = _two_sequences(rng, n=8)
    free = cache.num_free_blocks
    k, v = _tokens(rng, 1)
    cache.append(["c"], k, v)
    assert cache.num_free_blocks == free - 1  # a new block; the two full ones stay shared
    tables, _ = cache.block_table(["p", "c"])
    assert tables[0, :2].tolist() == tables[1, :2].tolist()


def test_shared_blocks_are_freed_with_their_last_user(rng):
    cache, (k, v) = _two_sequences(rng)
    q = rng.standard_normal((1, HQ, 1, D), dtype=F32)
    want = cache.attend(["c"], q)
    cache.free("p")
    assert cache.num_free_blocks == 14
    k2, v2 = _tokens(rng, 40)
    cache.add("x")
    cache.append(["x"], k2, v2)  # takes every free block
    np.testing.assert_array_equal(cache.attend(["c"], q), want)
    cache.free("c")
    cache.free("x")
    assert cache.num_free_blocks == 16


def test_truncate_gives_back_whole_blocks_only(rng):
    cache, _ = _two_sequences(rng, n=10)
    cache.free("c")
    assert cache.num_free_blocks == 13
    cache.truncate("p", 5)
    assert cache.num_free_blocks == 14 and cache.length("p") == 5
    cache.truncate("p", 4)
    assert cache.num_free_blocks == 15
    cache.truncate("p", 0)
    assert cache.num_free_blocks == 16 and cache.length("p") == 0


def test_truncating_a_fork_inside_a_shared_block_copies_on_the_next_append(rng):
    cache, (k, v) = _two_sequences(rng, n=8)
    cache.truncate("c", 6)
    k2, v2 = _tokens(rng, 1)
    cache.append(["c"], k2, v2)
    q = rng.standard_normal((1, HQ, 1, D), dtype=F32)
    assert rel_err(cache.attend(["p"], q), _contiguous("float32", k, v).attend(q)) <= 1e-5
    want = _contiguous(
        "float32", np.concatenate([k[:, :6], k2[0]], 1), np.concatenate([v[:, :6], v2[0]], 1)
    )
    assert rel_err(cache.attend(["c"], q), want.attend(q)) <= 1e-5


# ---------------------------------------------------------- out of blocks


def test_out_of_blocks_is_exact_and_all_or_nothing(rng):
    cache = ferroattn.PagedKVCache(5, 4, HKV, D, value_dim=DV)
    for s in "ab":
        cache.add(s)
    k, v = _tokens(rng, 9, 2)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="out of blocks: need 6, 5 free"):
        cache.append(["a", "b"], k, v)  # 3 blocks each
    _assert_unchanged(cache, before)
    cache.append(["a", "b"], k, v, lengths=[9, 8])  # 3 + 2 blocks: exactly what is free
    assert cache.num_free_blocks == 0
    assert cache.lengths(["a", "b"]).tolist() == [9, 8]


# ------------------------------------------------------------- error paths


def _error_cache(rng, dtype="float32"):
    cache = ferroattn.PagedKVCache(4, 4, HKV, D, dtype=dtype, value_dim=DV)
    cache.add("a")
    cache.append(["a"], *_tokens(rng, 6))
    cache.fork("a", "b")
    cache.add("c")
    return cache


def _q(t=1, b=1, h=HQ, d=D, dtype=F32):
    return np.ones((b, h, t, d), dtype=dtype)


def _kv(t=1, b=1, h=HKV, d=D, dv=DV, dtype=F32):
    return np.ones((b, h, t, d), dtype=dtype), np.ones((b, h, t, dv), dtype=dtype)


_ERRORS = {
    "out of blocks": (ValueError, lambda c: c.append(["c"], *_kv(t=12))),
    "out of blocks, step": (ValueError, lambda c: c.step(["c"], _q(t=12), *_kv(t=12))),
    "out of blocks, varlen": (
        ValueError,
        lambda c: c.step_varlen(
            ["a", "c"],
            _q(t=13)[0].swapaxes(0, 1),
            *(x[0].swapaxes(0, 1) for x in _kv(t=13)),
            [1, 12],
        ),
    ),
    "unknown id, append": (KeyError, lambda c: c.append(["z"], *_kv())),
    "unknown id, attend": (KeyError, lambda c: c.attend(["z"], _q())),
    "unknown id, fork": (KeyError, lambda c: c.fork("z", "y")),
    "unknown id, truncate": (KeyError, lambda c: c.truncate("z", 0)),
    "unknown id, free": (KeyError, lambda c: c.free("z")),
    "unknown id, length": (KeyError, lambda c: c.length("z")),
    "unhashable id": (TypeError, lambda c: c.add(["a"])),
    "duplicate add": (ValueError, lambda c: c.add("a")),
    "fork onto a known id": (ValueError, lambda c: c.fork("a", "c")),
    "an id twice in one append": (ValueError, lambda c: c.append(["c", "c"], *_kv(b=2))),
    "k heads": (ValueError, lambda c: c.append(["c"], *_kv(h=3))),
    "k dim": (ValueError, lambda c: c.append(["c"], _kv(d=D + 1)[0], _kv()[1])),
    "v dim": (ValueError, lambda c: c.append(["c"], _kv()[0], _kv(dv=D)[1])),
    "k rows": (ValueError, lambda c: c.append(["c"], *_kv(b=2))),
    "k and v tokens": (ValueError, lambda c: c.append(["c"], _kv(t=2)[0], _kv()[1])),
    "k int dtype": (TypeError, lambda c: c.append(["c"], *_kv(dtype=np.int32))),
    "k and v dtypes": (TypeError, lambda c: c.append(["c"], _kv()[0], _kv(dtype=np.float16)[1])),
    "lengths too long": (ValueError, lambda c: c.append(["c"], *_kv(), lengths=[2])),
    "lengths shape": (ValueError, lambda c: c.append(["c"], *_kv(), lengths=[1, 1])),
    "seq_ids a string": (TypeError, lambda c: c.append("c", *_kv())),
    "q heads": (ValueError, lambda c: c.step(["c"], _q(h=3), *_kv())),
    "q dim": (ValueError, lambda c: c.step(["c"], _q(d=D + 1), *_kv())),
    "q and k tokens": (ValueError, lambda c: c.step(["c"], _q(t=2), *_kv())),
    "q dtype": (TypeError, lambda c: c.step(["c"], _q(dtype=np.int64), *_kv())),
    "scale": (ValueError, lambda c: c.step(["c"], _q(), *_kv(), scale=float("nan"))),
    "alibi_slopes": (ValueError, lambda c: c.step(["c"], _q(), *_kv(), alibi_slopes=[1.0])),
    "out shape": (
        ValueError,
        lambda c: c.step(["c"], _q(), *_kv(), out=np.zeros((1, HQ, 1, D), F32)),
    ),
    "out dtype": (TypeError, lambda c: c.step(["c"], _q(), *_kv(), out=np.zeros((1, HQ, 1, DV)))),
    "more queries than tokens": (ValueError, lambda c: c.attend(["a"], _q(t=7))),
    "queries of an empty sequence": (ValueError, lambda c: c.attend(["c"], _q())),
    "q_lens sum": (
        ValueError,
        lambda c: c.step_varlen(
            ["c"], _q()[0].swapaxes(0, 1), *(x[0].swapaxes(0, 1) for x in _kv()), [2]
        ),
    ),
    "q_lens negative": (
        ValueError,
        lambda c: c.attend_varlen(["a", "b"], _q()[0].swapaxes(0, 1), [2, -1]),
    ),
    "varlen k shape": (
        ValueError,
        lambda c: c.step_varlen(["c"], _q()[0].swapaxes(0, 1), _kv()[0][0], _kv()[1][0], [1]),
    ),
    "truncate beyond the length": (ValueError, lambda c: c.truncate("a", 7)),
    "truncate negative": (ValueError, lambda c: c.truncate("a", -1)),
    "truncate by a float": (ValueError, lambda c: c.truncate("a", 2.0)),
}


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("case", list(_ERRORS))
def test_errors_leave_the_cache_unchanged(rng, case, dtype):
    cache = _error_cache(rng, dtype)
    before = _snapshot(cache)
    error, call = _ERRORS[case]
    with pytest.raises(error):
        call(cache)
    _assert_unchanged(cache, before)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_blocks": 0}, ValueError),
        ({"block_size": 1.5}, ValueError),
        ({"kv_heads": -1}, ValueError),
        ({"value_dim": 0}, ValueError),
        ({"dtype": "float64"}, TypeError),
        ({"kv_layout": "bhsd"}, ValueError),
    ],
)
def test_constructor_refuses_bad_sizes(kwargs, error):
    args = {"num_blocks": 4, "block_size": 4, "kv_heads": 2, "head_dim": 8, **kwargs}
    with pytest.raises(error, match=next(iter(kwargs))):
        ferroattn.PagedKVCache(**args)


# ------------------------------------------------ attention, options, varlen


@pytest.mark.parametrize("kv_layout", ["hnd", "nhd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attend_equals_the_float64_paged_reference(rng, dtype, kv_layout):
    cache = ferroattn.PagedKVCache(32, 5, HKV, D, dtype=dtype, value_dim=DV, kv_layout=kv_layout)
    for s, n in (("x", 23), ("y", 7)):
        cache.add(s)
        cache.append([s], *_tokens(rng, n))
    q = rng.standard_normal((2, HQ, 3, D), dtype=F32)
    table, lens = cache.block_table(["x", "y"])
    kc, vc, ks, vs = _token_major(cache)
    want, _ = paged_reference(q, kc, vc, table, lens, k_scale=ks, v_scale=vs)
    assert rel_err(cache.attend(["x", "y"], q), want) <= 1e-5


def test_step_options_and_out_match_kvcache(rng):
    paged = ferroattn.PagedKVCache(16, 4, HKV, D, value_dim=DV)
    paged.add(0)
    paged.add(1)
    contiguous = ferroattn.KVCache(2, HKV, D, 32, value_dim=DV)
    options = {
        "scale": 0.3,
        "softcap": 5.0,
        "alibi_slopes": ferroattn.alibi_slopes(HQ),
        "sinks": np.linspace(-1, 1, HQ, dtype=F32),
    }
    for t in (5, 1, 1, 3):
        q = rng.standard_normal((2, HQ, t, D), dtype=F32)
        k, v = _tokens(rng, t, 2)
        out = np.empty((2, HQ, t, DV), F32)
        got = paged.step([0, 1], q, k, v, out=out, **options)
        assert got is out
        assert rel_err(got, contiguous.step(q, k, v, **options)) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_step_varlen_equals_per_sequence_steps(rng, dtype):
    """A continuous-batching step (a prefill chunk, decode tokens, an idle sequence) in one
    call gives what each sequence's own step gives."""
    packed = ferroattn.PagedKVCache(40, 4, HKV, D, dtype=dtype, value_dim=DV)
    single = ferroattn.PagedKVCache(40, 4, HKV, D, dtype=dtype, value_dim=DV)
    ids = ["p", "d1", "d2", "idle"]
    for s, n in zip(ids, (0, 9, 17, 5), strict=True):
        for cache in (packed, single):
            cache.add(s)
        if n:
            k, v = _tokens(rng, n)
            packed.append([s], k, v)
            single.append([s], k, v)
    for q_lens in ([6, 1, 1, 0], [3, 1, 1, 1]):
        total = sum(q_lens)
        q = rng.standard_normal((total, HQ, D), dtype=F32)
        k = rng.standard_normal((total, HKV, D), dtype=F32)
        v = rng.standard_normal((total, HKV, DV), dtype=F32)
        if dtype == "float16":  # new keys in the storage type, queries in float32
            k, v = k.astype(np.float16), v.astype(np.float16)
        got = packed.step_varlen(ids, q, k, v, q_lens)
        assert got.shape == (total, HQ, DV)
        lo = 0
        for s, n in zip(ids, q_lens, strict=True):
            hi = lo + n
            if n:
                one = single.step(
                    [s],
                    q[None, lo:hi].swapaxes(1, 2),
                    k[None, lo:hi].swapaxes(1, 2),
                    v[None, lo:hi].swapaxes(1, 2),
                )
                assert rel_err(got[lo:hi], one[0].swapaxes(0, 1)) <= 1e-5
            lo = hi
        np.testing.assert_array_equal(packed.lengths(ids), single.lengths(ids))
    again = packed.attend_varlen(ids, q, [3, 1, 1, 1])
    assert rel_err(again, got) <= 1e-6


def test_facts_and_read_only_views(rng):
    cache = ferroattn.PagedKVCache(8, 4, HKV, D, dtype="int8", value_dim=DV)
    assert cache.nbytes == 8 * 4 * HKV * (D + DV) + 2 * 8 * 4 * HKV * 4
    cache.add("a")
    cache.add(3)
    cache.append(["a"], *_tokens(rng, 5))
    assert "a" in cache and 3 in cache and "z" not in cache and [1] not in cache
    assert len(cache) == 2 and cache.seq_ids == ["a", 3]
    assert cache.lengths().tolist() == [5, 0] and cache.length("a") == 5
    table, lens = cache.block_table(["a", 3])
    assert table.dtype == np.int32 and lens.dtype == np.int32
    assert table.tolist() == [[0, 1], [-1, -1]] and lens.tolist() == [5, 0]
    for a in (cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale):
        assert not a.flags.writeable
    assert cache.kv_layout == "hnd"
    assert cache.k_cache.shape == (8, HKV, 4, D) and cache.v_scale.shape == (8, HKV, 4)
    nhd = ferroattn.PagedKVCache(8, 4, HKV, D, dtype="int8", value_dim=DV, kv_layout="nhd")
    assert nhd.kv_layout == "nhd" and nhd.nbytes == cache.nbytes
    assert nhd.k_cache.shape == (8, 4, HKV, D) and nhd.v_scale.shape == (8, 4, HKV)
    assert ferroattn.PagedKVCache(2, 2, 1, 4).k_scale is None
    assert "free_blocks=6" in repr(cache)


def test_the_scheduler_example_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    text = capsys.readouterr().out
    assert "finished" in text and "all blocks free" in text


@pytest.mark.parametrize("fails", ["paged_write", "paged_attention"])
def test_a_step_that_fails_late_is_undone(rng, monkeypatch, fails):
    """Should the write or the attention fail (out of memory, say) after blocks were handed
    out, the step is undone: sequences, tables and the free list as before, and attention
    over the cache as before."""
    cache, _ = _two_sequences(rng)  # "p" and "c" share a partly filled block
    q = rng.standard_normal((2, HQ, 1, D), dtype=F32)
    want = cache.attend(["p", "c"], q)
    ids, tables, free, free_list, _ = _snapshot(cache)

    def broken(*args, **kwargs):
        raise MemoryError("no memory")

    monkeypatch.setattr(ferroattn.paged_cache, fails, broken)
    k, v = _tokens(rng, 7, 2)
    with pytest.raises(MemoryError):
        cache.step(["c", "p"], rng.standard_normal((2, HQ, 7, D), dtype=F32), k, v)
    monkeypatch.undo()
    after = _snapshot(cache)
    assert after[0] == ids and after[2:4] == (free, free_list)
    for x, y in zip(after[1], tables, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(cache.attend(["p", "c"], q), want)
    cache.step(["c", "p"], rng.standard_normal((2, HQ, 7, D), dtype=F32), k, v)
    assert cache.num_free_blocks == free - 5  # one copy, two new blocks each


def test_calls_without_work(rng):
    """No sequences, no new tokens, no queries: each call does nothing and says so."""
    cache = ferroattn.PagedKVCache(8, 4, HKV, D, value_dim=DV)
    cache.add("a")
    cache.add("b")
    empty_k, empty_v = _tokens(rng, 0, 0)
    cache.append([], empty_k, empty_v)
    cache.append(["a"], *_tokens(rng, 0))
    assert cache.num_free_blocks == 8 and cache.lengths().tolist() == [0, 0]
    assert cache.attend([], np.zeros((0, HQ, 1, D), F32)).shape == (0, HQ, 1, DV)
    cache.append(["a"], *_tokens(rng, 5))
    assert cache.attend(["a"], np.zeros((1, HQ, 0, D), F32)).shape == (1, HQ, 0, DV)
    assert cache.attend(["a"], np.zeros((1, 0, 1, D), F32)).shape == (1, 0, 1, DV)
    nothing = [np.zeros((0, h, d), F32) for h, d in ((HQ, D), (HKV, D), (HKV, DV))]
    assert cache.step_varlen(["a", "b"], *nothing, [0, 0]).shape == (0, HQ, DV)
    q = rng.standard_normal((2, HQ, 2, D), dtype=F32)
    twice = cache.attend(["a", "a"], q)  # reading: an id may repeat
    assert rel_err(twice[1], cache.attend(["a"], q[1:])[0]) <= 1e-6
    assert cache.lengths(["a", "a"]).tolist() == [5, 5]
    assert cache.block_table(["a", "a"])[0].tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("given", [np.float64, np.float16])
def test_stores_what_kvcache_stores_for_any_input_dtype(rng, dtype, given):
    """Keys given in float64 (or float16) are rounded once to the storage type, as KVCache's
    append rounds them: the two caches hold the same bytes."""
    k = rng.standard_normal((1, HKV, 9, D)).astype(given)
    v = rng.standard_normal((1, HKV, 9, DV)).astype(given)
    paged = ferroattn.PagedKVCache(4, 4, HKV, D, dtype=dtype, value_dim=DV)
    paged.add(0)
    paged.append([0], k, v)
    contiguous = ferroattn.KVCache(1, HKV, D, 9, dtype=dtype, value_dim=DV)
    contiguous.append(k, v)
    table = paged.block_table([0])[0][0]
    kc, _, ks, _ = _token_major(paged)
    rows = kc[table].reshape(-1, HKV, D)[:9].swapaxes(0, 1)
    if dtype == "int8":
        scales = ks[table].reshape(-1, HKV)[:9].T
        np.testing.assert_array_equal(rows, contiguous._k[0])
        np.testing.assert_array_equal(scales, contiguous._ks[0])
    else:
        np.testing.assert_array_equal(rows.view(np.uint16), contiguous._k[0].view(np.uint16))
