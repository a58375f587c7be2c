"""Smoke test of an installed ferroattn on a CPU without the test suite's peers (run by
``scripts/aarch64/smoke.sh`` under qemu on aarch64, and on the x86_64 wheel in a fresh virtualenv).

Checks, against the float64 reference of ``tests/reference.py``: ``attention`` in every input
dtype (float32, float16, bfloat16, float64) with every kind of mask
(none, causal both ways, window, kv_lengths, boolean mask, additive bias, softcap, sinks), on GQA
shapes whose head sizes leave SIMD tails, for prefill (many query rows: the blocked tiles) and
decode (one row: split-K dot products); a ``KVCache`` decode loop in each storage dtype
(float32, float16, bfloat16, int8); ``ferroattn info``. Prints the SIMD path; with
``FERROATTN_EXPECT_ISA`` set, fails unless that path ran. Kept short: under emulation every
product costs ~50 times its native time.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import ml_dtypes  # bfloat16 inputs (tests/reference.py needs it too)
from reference import OUT_RTOL, assert_lse_close, assert_out_close, reference_attention, rel_err

import ferroattn
from ferroattn import cli


def masks(nq: int, nk: int, hq: int, rng: np.random.Generator) -> dict[str, dict]:
    """One option set per kind of mask the kernels apply."""
    keep = rng.random((1, 1, nq, nk)) > 0.3
    keep[..., 0] = True  # every row sees a key
    return {
        "none": {},
        "causal": {"causal": True},
        "causal top_left": {"causal": "top_left"},
        "window": {"window": (7, 2)},
        "kv_lengths": {"kv_lengths": np.array([nk - 5, nk // 2], dtype=np.int64), "causal": True},
        "bool mask": {"mask": keep},
        "bias": {"bias": rng.standard_normal((1, hq, nq, nk)).astype(np.float32)},
        "softcap": {"softcap": 5.0, "window": (16, 0)},
        "sinks": {"sinks": rng.standard_normal(hq).astype(np.float32), "causal": True},
    }


def check_attention(rng: np.random.Generator) -> int:
    """Every dtype × mask kind × (prefill, decode) against the reference; returns the count."""
    dtypes = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
    b, hq, hk, d, dv = 2, 4, 2, 43, 37
    runs = 0
    for nq, nk in [(29, 45), (1, 70)]:
        for name, opts in masks(nq, nk, hq, rng).items():
            for dt in dtypes:
                q = rng.standard_normal((b, hq, nq, d)).astype(np.float32).astype(dt)
                k = rng.standard_normal((b, hk, nk, d)).astype(np.float32).astype(dt)
                v = rng.standard_normal((b, hk, nk, dv)).astype(np.float32).astype(dt)
                out, lse = ferroattn.attention(q, k, v, return_lse=True, **opts)
                want, want_lse = reference_attention(q, k, v, **opts)
                where = f"attention {np.dtype(dt).name} nq={nq} mask={name}"
                try:
                    # float64 inputs are computed in float32: the float32 tolerance holds.
                    tol = OUT_RTOL[np.dtype(np.float32 if dt is np.float64 else dt)]
                    assert_out_close(out, want, dt, rtol=tol)
                    assert_lse_close(lse, want_lse)
                except AssertionError as e:
                    raise AssertionError(f"{where}: {e}") from e
                runs += 1
    return runs


def check_cache(rng: np.random.Generator) -> int:
    """A prefill then a decode loop through a KVCache in each storage dtype; returns the count."""
    b, hq, hk, d, prompt, steps = 1, 8, 2, 64, 24, 6
    dtypes = ["float32", "float16", "bfloat16", "int8"]
    # int8 storage: ~1e-2 from rounding the keys and values themselves.
    tols = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2, "int8": 3e-2}
    for dt in dtypes:
        cache = ferroattn.KVCache(b, hk, d, capacity=prompt + steps, dtype=dt)
        ks, vs = [], []
        for t, n in enumerate([prompt] + [1] * steps):
            q = rng.standard_normal((b, hq, n, d)).astype(np.float32)
            k, v = rng.standard_normal((2, b, hk, n, d)).astype(np.float32)
            out = cache.step(q, k, v)
            ks.append(k)
            vs.append(v)
            want, _ = reference_attention(
                q, np.concatenate(ks, axis=2), np.concatenate(vs, axis=2), causal=True
            )
            err = rel_err(out, want)
            assert err <= tols[dt], f"KVCache {dt} step {t}: relative error {err:.2e}"
        assert int(cache.lengths[0]) == prompt + steps
    return len(dtypes)


def main() -> int:
    t0 = time.perf_counter()
    info = ferroattn.info()
    print(
        f"ferroattn {info['version']} on {info['arch']}: SIMD path {info['isa']} "
        f"(available {info['isa_available']}), CPU features {info['cpu_features']}"
    )
    expect = os.environ.get("FERROATTN_EXPECT_ISA")
    if expect and info["isa"] != expect:
        print(f"FAILED: expected the {expect} path")
        return 1
    rng = np.random.default_rng(7)
    n = check_attention(rng)
    print(f"attention: {n} dtype × mask × shape cases match the float64 reference")
    n = check_cache(rng)
    print(f"KVCache: prefill + decode loop matches in {n} storage dtypes")
    # In this process: under qemu-user a child process would not be emulated.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["info"])
    assert rc == 0 and info["isa"] in buf.getvalue(), buf.getvalue()
    print("ferroattn info:\n" + buf.getvalue().rstrip())
    print(f"smoke test passed in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
