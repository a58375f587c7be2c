"""The SIMD path the suite runs under is the one asked for, and the paths agree."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import ferroattn

# Run once per SIMD path by scripts/test.sh (the kernels these tests reach depend on FERROATTN_ISA).
pytestmark = pytest.mark.kernel


def test_forced_isa_is_in_use():
    wanted = os.environ.get("FERROATTN_ISA")
    facts = ferroattn.info()
    assert facts["isa"] in facts["isa_available"]
    assert "scalar" in facts["isa_available"]
    if wanted:
        assert facts["isa"] == wanted, f"FERROATTN_ISA={wanted} but the kernels run {facts['isa']}"
    else:
        assert facts["isa"] == facts["isa_available"][-1]


_SNIPPET = """
import numpy as np, ferroattn
rng = np.random.default_rng(3)
q = rng.standard_normal((2, 4, 77, 40), dtype=np.float32)
k = rng.standard_normal((2, 2, 90, 40), dtype=np.float32)
v = rng.standard_normal((2, 2, 90, 24), dtype=np.float32)
o = ferroattn.attention(q, k, v, causal=True, window=(30, None))
np.save({path!r}, o)
print(ferroattn.info()["isa"])
"""


def test_every_path_gives_the_same_answer(tmp_path):
    results = {}
    for isa in ferroattn.info()["isa_available"]:
        path = str(tmp_path / f"{isa}.npy")
        env = dict(os.environ, FERROATTN_ISA=isa)
        proc = subprocess.run(
            [sys.executable, "-c", _SNIPPET.format(path=path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert proc.stdout.strip() == isa
        results[isa] = np.load(path)
    if len(results) < 2:
        pytest.skip("only one SIMD path on this CPU")
    base = results["scalar"]
    for isa, out in results.items():
        err = np.linalg.norm(out - base) / np.linalg.norm(base)
        assert err < 1e-6, f"{isa} differs from scalar by {err}"


def test_unknown_isa_warns_and_falls_back():
    env = dict(os.environ, FERROATTN_ISA="no-such-path")
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            "import ferroattn; print(ferroattn.info()['isa'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "FERROATTN_ISA" in proc.stderr
    assert proc.stdout.strip() == ferroattn.info()["isa_available"][-1]
