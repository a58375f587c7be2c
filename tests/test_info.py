"""ferroattn.info() and the FERROATTN_ISA override."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import ferroattn

ISAS = {"scalar", "avx2", "avx512", "neon"}


def test_info_keys_and_types():
    info = ferroattn.info()
    assert isinstance(info, dict)
    assert isinstance(info["version"], str) and info["version"]
    assert isinstance(info["isa"], str)
    assert isinstance(info["isa_available"], list)
    assert all(isinstance(x, str) for x in info["isa_available"])
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def test_info_isa_is_known_and_available():
    info = ferroattn.info()
    assert info["isa"] in ISAS
    assert set(info["isa_available"]) <= ISAS
    assert info["isa"] in info["isa_available"]
    assert "scalar" in info["isa_available"]


def test_info_num_threads_matches_getter():
    assert ferroattn.info()["num_threads"] == ferroattn.get_num_threads()


def test_info_returns_fresh_dict():
    a = ferroattn.info()
    a["isa"] = "mutated"
    assert ferroattn.info()["isa"] != "mutated"


_PROBE = """
import json, numpy as np, ferroattn
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 2, 33, 40)).astype(np.float32)
k = rng.standard_normal((1, 1, 70, 40)).astype(np.float32)
v = rng.standard_normal((1, 1, 70, 24)).astype(np.float32)
o = ferroattn.attention(q, k, v, causal=True, softcap=5.0)
print(json.dumps({"isa": ferroattn.info()["isa"], "out": o.astype(float).ravel().tolist()}))
"""


def _probe(isa):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROATTN_")}
    if isa is not None:
        env["FERROATTN_ISA"] = isa
    res = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("isa", sorted(ISAS))
def test_forced_isa_is_used_and_agrees(isa):
    if isa not in ferroattn.info()["isa_available"]:
        pytest.skip(f"{isa} not available on this machine")
    import numpy as np
    from reference import rel_err

    forced = _probe(isa)
    assert forced["isa"] == isa
    default = _probe(None)
    assert rel_err(np.array(forced["out"]), np.array(default["out"])) <= 1e-5
