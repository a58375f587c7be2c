"""Thread-count control, thread-count independence, concurrency and GIL release."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference import (
    F16,
    F32,
    assert_lse_close,
    assert_out_close,
    random_inputs,
    reference_attention,
)

import ferroattn


def test_set_get_round_trip(restore_threads):
    for n in (1, 3, 2, 7):
        ferroattn.set_num_threads(n)
        assert ferroattn.get_num_threads() == n
        assert ferroattn.info()["num_threads"] == n


@pytest.mark.parametrize("n", [0, -1, -100])
def test_set_num_threads_rejects_non_positive(restore_threads, n):
    before = ferroattn.get_num_threads()
    with pytest.raises(ValueError):
        ferroattn.set_num_threads(n)
    assert ferroattn.get_num_threads() == before


@pytest.mark.parametrize("n", [2.5, "2", None])
def test_set_num_threads_rejects_non_int(restore_threads, n):
    before = ferroattn.get_num_threads()
    with pytest.raises((TypeError, ValueError)):
        ferroattn.set_num_threads(n)
    assert ferroattn.get_num_threads() == before


def test_get_num_threads_is_positive_int():
    n = ferroattn.get_num_threads()
    assert isinstance(n, int) and n >= 1


def _run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FERROATTN_")}
    full_env.update(env)
    res = subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("n", [1, 3])
def test_env_var_sets_default(n):
    out = _run_python(
        "import ferroattn; print(ferroattn.get_num_threads(), ferroattn.info()['num_threads'])",
        FERROATTN_NUM_THREADS=str(n),
    )
    assert out.split() == [str(n), str(n)]


def _case(rng, dtype=F32):
    q, k, v = random_inputs(rng, (2, 8, 130, 64), (2, 2, 257, 64), (2, 2, 257, 32), dtype)
    opts = {"causal": True, "window": (100, 3), "kv_lengths": [257, 140], "softcap": 20.0}
    return q, k, v, opts


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_one_thread_vs_two_threads(rng, restore_threads, dtype):
    q, k, v, opts = _case(rng, dtype)
    ferroattn.set_num_threads(1)
    o1, l1 = ferroattn.attention(q, k, v, return_lse=True, **opts)
    w1 = ferroattn.attention_weights(q, k, **opts)
    ferroattn.set_num_threads(2)
    o2, l2 = ferroattn.attention(q, k, v, return_lse=True, **opts)
    w2 = ferroattn.attention_weights(q, k, **opts)
    # lse is float32 and output rounding to dtype may differ by one ulp
    assert_out_close(o2, o1.astype(np.float64), dtype)
    assert_lse_close(l2, l1.astype(np.float64))
    assert_out_close(w2, w1.astype(np.float64), dtype)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_decode_matches_reference_at_every_thread_count(rng, restore_threads, threads, kv_heads):
    # One query token: with few KV heads the keys are split into slices computed on the
    # caller's thread and the pool's and merged after; with many, whole heads are shared out.
    q, k, v = random_inputs(rng, (2, 8, 1, 32), (2, kv_heads, 2600, 32), (2, kv_heads, 2600, 16))
    ferroattn.set_num_threads(threads)
    out, lse = ferroattn.attention(q, k, v, return_lse=True, kv_lengths=[2600, 1100])
    want, want_lse = reference_attention(q, k, v, kv_lengths=[2600, 1100])
    assert_out_close(out, want, F32)
    assert_lse_close(lse, want_lse)


def test_varlen_one_thread_vs_two_threads(rng, restore_threads):
    q = rng.standard_normal((200, 4, 32)).astype(np.float32)
    k = rng.standard_normal((300, 2, 32)).astype(np.float32)
    v = rng.standard_normal((300, 2, 16)).astype(np.float32)
    cu_q, cu_k = [0, 1, 70, 70, 200], [0, 100, 130, 131, 300]
    ferroattn.set_num_threads(1)
    a = ferroattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    ferroattn.set_num_threads(2)
    b = ferroattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert_out_close(b, a.astype(np.float64), F32)


def test_concurrent_calls_match_serial(rng):
    cases = []
    for i in range(8):
        q, k, v = random_inputs(rng, (1, 4, 65 + i, 32), (1, 2, 130, 32), (1, 2, 130, 16))
        opts = [{"causal": True}, {"window": 7}, {"softcap": 3.0}, {}][i % 4]
        cases.append((q, k, v, opts))

    def call(case):
        q, k, v, opts = case
        return ferroattn.attention(q, k, v, return_lse=True, **opts)

    serial = [call(c) for c in cases]
    with ThreadPoolExecutor(max_workers=4) as ex:
        for _ in range(3):
            concurrent = list(ex.map(call, cases * 2))
            for (o, lse), (so, slse) in zip(concurrent, serial * 2, strict=True):
                assert_out_close(o, so.astype(np.float64), F32)
                assert_lse_close(lse, slse.astype(np.float64))


def test_concurrent_out_buffers_are_independent(rng):
    q, k, v = random_inputs(rng, (1, 4, 64, 32), (1, 4, 64, 32), (1, 4, 64, 32))
    expected = ferroattn.attention(q, k, v, causal=True)
    outs = [np.full_like(q, np.nan) for _ in range(8)]

    def call(out):
        return ferroattn.attention(q, k, v, causal=True, out=out)

    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(call, outs))
    for r, o in zip(results, outs, strict=True):
        assert r is o
        assert_out_close(o, expected.astype(np.float64), F32)


def _counter_advances_during(fn, tries=3):
    """How far a sleeping Python thread's counter moves while ``fn()`` runs, per try.

    The switch interval is raised far above the call's duration, so the only GIL
    hand-offs are voluntary: the counter thread gives the GIL up in time.sleep(),
    and the main thread only if ``fn`` releases it.  A GIL-holding ``fn`` thus
    sees exactly 0 increments; a releasing one sees many (this was checked with
    re.match, which holds the GIL, and numpy matmul, which releases it).
    """
    counter = [0]
    started = threading.Event()
    stop = threading.Event()

    def count():
        started.set()
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0002)

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    t = threading.Thread(target=count, daemon=True)
    try:
        t.start()
        started.wait()
        advances = []
        for _ in range(tries):
            before = counter[0]
            fn()
            advances.append(counter[0] - before)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    return advances


def test_attention_releases_the_gil(rng):
    q, k, v = random_inputs(rng, (1, 8, 512, 64), (1, 8, 512, 64), (1, 8, 512, 64))
    advances = _counter_advances_during(lambda: ferroattn.attention(q, k, v))
    assert max(advances) > 0, f"GIL held during attention(): {advances}"


def test_weights_and_varlen_release_the_gil(rng):
    q, k, v = random_inputs(rng, (1, 8, 512, 64), (1, 8, 512, 64), (1, 8, 512, 64))
    advances = _counter_advances_during(lambda: ferroattn.attention_weights(q, k))
    assert max(advances) > 0, f"GIL held during attention_weights(): {advances}"
    qp, kp, vp = (x[0].transpose(1, 0, 2).copy() for x in (q, k, v))
    cu = [0, 200, 512]
    advances = _counter_advances_during(lambda: ferroattn.attention_varlen(qp, kp, vp, cu, cu))
    assert max(advances) > 0, f"GIL held during attention_varlen(): {advances}"
