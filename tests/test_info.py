"""ferroattn.info() and the FERROATTN_ISA override."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_info_stream_prefetch_follows_the_cpu_vendor():
    info = ferroattn.info()
    ahead, one_row = info["stream_prefetch_bytes"], info["one_row_stream_prefetch"]
    assert isinstance(ahead, int) and ahead > 0
    assert isinstance(one_row, bool)
    try:
        with open("/proc/cpuinfo") as f:
            vendors = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")}
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU vendor from")
    if not vendors:
        pytest.skip("/proc/cpuinfo names no vendor (not x86)")
    intel = vendors == {"GenuineIntel"}
    # Intel: a shorter distance, and one row's streams requested too on the AVX-512 path.
    assert (ahead < 8192) == intel
    assert one_row == (intel and info["isa"] == "avx512")


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


def test_cli_info_names_the_decode_prefetch():
    from ferroattn.cli import _format_info

    text = _format_info(
        {"torch": {}, "stream_prefetch_bytes": 3072, "one_row_stream_prefetch": True}
    )
    assert (
        "decode prefetch" in text
        and "3072 B of each K/V stream ahead (one-row streams too)" in text
    )
    text = _format_info(
        {"torch": {}, "stream_prefetch_bytes": 8192, "one_row_stream_prefetch": False}
    )
    assert "8192 B of each K/V stream ahead" in text and "one-row" not in text
    assert "stream_prefetch_bytes" not in text  # shown once, by its label


def test_info_reports_bf16_dot_products_and_no_amx():
    info = ferroattn.info()
    assert isinstance(info["bf16_dot"], bool)
    assert info["amx"] is False
    if info["bf16_dot"]:
        assert info["isa"] == "avx512" and "avx512bf16" in info["cpu_features"]


def _cpu_feature_vocabulary() -> set[str]:
    """Every name ``info()["cpu_features"]`` can hold, on any CPU: the core's probe list."""
    src = (Path(__file__).resolve().parents[1] / "rust/core/src/simd/mod.rs").read_text()
    probes = re.findall(r"probe!\(([^)]*)\)", src)
    names = set(re.findall(r'"([^"]+)"', " ".join(probes)))
    names |= set(re.findall(r'found\.push\("([^"]+)"\)', src))
    assert "avx2" in names, "the probe list moved: update this test"
    return names


def test_the_benchmark_reads_only_names_info_has(monkeypatch):
    # The harness once looked for "avx512_bf16", which info() never reports, so a target that
    # applies on this CPU was skipped silently.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benches"))
    import importlib

    lowp = importlib.import_module("fabench.cases.lowp")
    assert set(lowp.INFO_KEYS) <= set(ferroattn.info())
    assert set(lowp.CPU_FEATURES) <= _cpu_feature_vocabulary()
