"""``ferroattn bench``: the self-check of a user's machine, in quick mode."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from optional import require

import ferroattn
from ferroattn import cli, selfcheck

CALLS = ("prefill B=1", "prefill causal B=1", "decode ")


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["bench", "--quick", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_quick_json_checks_then_times_every_call(capsys):
    before = ferroattn.get_num_threads()
    code, out, _ = _bench(capsys, "--json", "--no-torch", "--threads", "1", "--repeats", "3")
    assert code == 0
    report = json.loads(out)
    assert ferroattn.get_num_threads() == before  # the thread count is put back
    assert report["threads"] == 1 and report["repeats"] == 3 and report["quick"]
    assert report["torch"] == {"status": "not used (--no-torch)"}
    assert all(r["call"].startswith(c) for r, c in zip(report["results"], CALLS, strict=True))
    for r in report["results"]:
        assert "torch" not in r
        fa = r["ferroattn"]
        assert fa["rel_err"] < selfcheck.TOLERANCE
        assert 0 < fa["min_ms"] <= fa["median_ms"]
        assert fa["rate"] == pytest.approx(r["work"] / (fa["median_ms"] * 1e-3) / 1e9)
    assert [r["unit"] for r in report["results"]] == ["GFLOP/s", "GFLOP/s", "GB/s"]


def test_quick_text_side_by_side_with_torch(capsys):
    require("torch", "torch")
    code, out, _ = _bench(capsys, "--repeats", "1")
    assert code == 0
    assert "torch/fa" in out and "scaled_dot_product_attention" in out
    for c in CALLS:
        assert c in out
    assert "GB/s" in out and "GFLOP/s" in out and "benches/harness.py" in out
    assert max(len(line) for line in out.splitlines()) <= selfcheck.WIDTH


def test_wrong_results_are_reported_and_not_timed(capsys, monkeypatch):
    def off_by_one(q, k, v, causal):
        return np.ones((1, q.shape[1], q.shape[2], v.shape[3]))

    monkeypatch.setattr(selfcheck, "reference", off_by_one)
    code, out, err = _bench(capsys, "--json", "--no-torch")
    assert code == 1
    assert "wrong results" in err
    for r in json.loads(out)["results"]:
        assert "median_ms" not in r["ferroattn"]
        assert r["ferroattn"]["status"].startswith("disagrees with the reference")


def test_a_failing_torch_is_reported_not_fatal(capsys, monkeypatch):
    def sdpa(*args, **kwargs):
        raise TypeError("got an unexpected keyword argument 'enable_gqa'")

    fake_torch = SimpleNamespace(
        __version__="0.0",
        get_num_threads=lambda: 1,
        set_num_threads=lambda n: None,
        from_numpy=lambda x: x,
        inference_mode=contextlib.nullcontext,
        nn=SimpleNamespace(functional=SimpleNamespace(scaled_dot_product_attention=sdpa)),
    )
    monkeypatch.setattr(selfcheck, "_torch", lambda: fake_torch)
    code, out, _ = _bench(capsys, "--json")
    assert code == 0
    for r in json.loads(out)["results"]:
        assert r["torch"]["status"].startswith("failed: TypeError")
        assert "median_ms" in r["ferroattn"] and "torch_over_ferroattn" not in r
    code, out, _ = _bench(capsys)
    assert code == 0 and "failed: TypeError" in out


def test_reference_agrees_with_the_kernels(rng):
    q = rng.standard_normal((1, 4, 5, 16), dtype=np.float32)
    k, v = (rng.standard_normal((1, 2, 7, 16), dtype=np.float32) for _ in "kv")
    for causal in (False, True):
        got = ferroattn.attention(q, k, v, causal=causal)
        assert selfcheck.rel_err(got, selfcheck.reference(q, k, v, causal)) < 1e-5


def test_bad_option_is_a_usage_error(capsys):
    assert cli.main(["bench", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err


def test_the_package_ships_no_peer_benchmark():
    assert importlib.util.find_spec("ferroattn.bench") is None
    package = Path(ferroattn.__file__).parent
    text = "\n".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py")).lower()
    for peer in ("onnx", "threadpoolctl", "flex_attention"):
        assert peer not in text
