"""torch tensors through ferroattn: the torch path equals the Rust path, tensors come back as
tensors (dtype, device kept), CPU tensors are read and written in place, and importing ferroattn
never imports torch. Skipped without torch, unless FERROATTN_REQUIRE_EXTRAS=1 (CI)."""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
from optional import require
from reference import BF16, F16, F32, OUT_RTOL, rel_err

torch = require("torch", "torch")

import ferroattn  # noqa: E402
from ferroattn import torch as fa_torch  # noqa: E402

TORCH_DTYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def _randn(g, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _close(a, b, dtype=F32, tol=None):
    a64 = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else a
    b64 = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else b
    assert not np.isnan(a64).any() and not np.isnan(b64).any()
    err = rel_err(a64, b64)
    assert err <= (tol or OUT_RTOL[np.dtype(dtype)]), f"relative error {err:.2e}"


def _lse_close(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5)


def test_import_never_imports_torch():
    code = "import sys, ferroattn; ferroattn.info(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# Every option of attention(): the torch path (forced) against the Rust path on CPU tensors.
OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "causal_top_left": {"causal": "top_left"},
    "window": {"window": 3},
    "window_two_sided": {"window": (2, 1), "causal": "top_left"},
    "softcap": {"softcap": 2.0, "causal": True},
    "scale": {"scale": 0.3},
    "kv_lengths": {"kv_lengths": [9, 4], "causal": True},
    "kv_lengths_zero": {"kv_lengths": [0, 6]},
    "mask": {"mask": "mask"},
    "bias": {"bias": "bias"},
    "alibi": {"alibi_slopes": "alibi", "causal": True},
    "rel_bias": {"rel_bias": "t5"},
    "rel_bias_decoder": {"rel_bias": "t5_uni", "causal": True},
    "sinks": {"sinks": "sinks", "causal": True},
    "block_layout": {"block_layout": "blocks", "block_size": 3},
    "everything": {
        "causal": True,
        "window": 5,
        "softcap": 3.0,
        "mask": "mask",
        "bias": "bias",
        "alibi_slopes": "alibi",
        "sinks": "sinks",
        "kv_lengths": [9, 7],
    },
}


def _materialize(opts, g, hq=4, nq=6, nk=9, tensors=True):
    out = {}
    for name, val in opts.items():
        if val == "mask":
            val = torch.rand(2, 1, nq, nk, generator=g) > 0.3
        elif val == "bias":
            val = _randn(g, hq, 1, nk)
        elif val == "alibi":
            val = torch.from_numpy(ferroattn.alibi_slopes(hq))
        elif val in ("t5", "t5_uni"):
            table = _randn(g, 8, hq)
            val = ferroattn.T5Bias(table, bidirectional=val == "t5", max_distance=6)
        elif val == "sinks":
            val = _randn(g, hq)
        elif val == "blocks":
            val = torch.rand(nq // 3, nk // 3, generator=g) > 0.4
        if not tensors and isinstance(val, torch.Tensor):
            val = val.numpy()
        out[name] = val
    return out


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_torch_path_equals_rust_path(name, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    td = TORCH_DTYPES[dtype]
    q = _randn(g, 2, 4, 6, 16, dtype=td)
    k = _randn(g, 2, 2, 9, 16, dtype=td)
    v = _randn(g, 2, 2, 9, 8, dtype=td)
    opts = _materialize(OPTIONS[name], g)
    a, la = ferroattn.attention(q, k, v, return_lse=True, backend="cpu", **opts)
    b, lb = ferroattn.attention(q, k, v, return_lse=True, backend="torch", **opts)
    c = ferroattn.attention(q, k, v, backend="torch", **opts)  # SDPA where it applies
    for r in (a, b, c):
        assert isinstance(r, torch.Tensor) and r.dtype == td and r.shape == (2, 4, 6, 8)
    _close(b, a, dtype)
    _close(c, a, dtype)
    _lse_close(lb, la)
    if name == "kv_lengths_zero":  # a batch with no keys: zeros and -inf, never NaN
        assert torch.all(b[0] == 0) and torch.all(torch.isneginf(lb[0]))
    w_rust = ferroattn.attention_weights(q, k, backend="cpu", **opts)
    w_torch = ferroattn.attention_weights(q, k, backend="torch", **opts)
    assert w_torch.dtype == td and w_torch.shape == (2, 4, 6, 9)
    _close(w_torch, w_rust, dtype, tol=max(OUT_RTOL[np.dtype(dtype)], 1e-5))


@pytest.mark.parametrize(
    ("nq", "nk", "causal"),
    [(5, 5, True), (3, 8, True), (8, 3, True), (8, 3, "top_left"), (1, 7, True), (4, 6, False)],
)
def test_causal_alignments_and_sdpa(nq, nk, causal):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    q, k, v = _randn(g, 1, 4, nq, 8), _randn(g, 1, 1, nk, 8), _randn(g, 1, 1, nk, 8)
    a = ferroattn.attention(q, k, v, causal=causal, backend="cpu")
    b = ferroattn.attention(q, k, v, causal=causal, backend="torch")
    assert not torch.isnan(b).any()
    _close(b, a)
    if causal is True and nq > nk:  # bottom-right: the first nq - nk queries see nothing
        assert torch.all(b[:, :, : nq - nk] == 0)


@pytest.mark.parametrize(("layout", "rank"), [("bshd", 4), ("bshd", 3), ("bhsd", 3), ("bhsd", 2)])
def test_layouts_and_ranks(layout, rank):
    g = torch.Generator().manual_seed(rank)
    shape = {4: (2, 7, 4, 16), 3: (7, 4, 16), 2: (7, 16)}[rank]
    if layout == "bhsd" and rank == 3:
        shape = (4, 7, 16)
    q, k, v = (_randn(g, *shape) for _ in range(3))
    a, la = ferroattn.attention(q, k, v, layout=layout, causal=True, return_lse=True)
    b, lb = ferroattn.attention(
        q, k, v, layout=layout, causal=True, return_lse=True, backend="torch"
    )
    assert a.shape == b.shape == shape and la.shape == lb.shape
    _close(b, a)
    _lse_close(lb, la)


def test_varlen():
    g = torch.Generator().manual_seed(7)
    q, k, v = _randn(g, 9, 4, 16), _randn(g, 11, 2, 16), _randn(g, 11, 2, 16)
    cq, ck = torch.tensor([0, 2, 2, 9]), [0, 5, 6, 11]
    a, la = ferroattn.attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True)
    b, lb = ferroattn.attention_varlen(
        q, k, v, cq, ck, causal=True, return_lse=True, backend="torch"
    )
    assert isinstance(a, torch.Tensor) and a.shape == b.shape == (9, 4, 16)
    _close(b, a)
    _lse_close(lb, la)


# ----------------------------------------------------------- zero copy, kinds


def test_cpu_tensors_are_read_and_written_in_place(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = _randn(g, 2, 10, 4, 16)
    q = base.transpose(1, 2)  # strided: (2, 4, 10, 16) read through strides
    k, v = _randn(g, 2, 4, 10, 16), _randn(g, 2, 4, 10, 16)
    seen = {}
    kernel = ferroattn.functional._ferroattn.attention

    def spy(q4, k4, v4, out4, *args, **kwargs):
        seen["q"], seen["out"] = q4.__array_interface__["data"][0], out4
        return kernel(q4, k4, v4, out4, *args, **kwargs)

    monkeypatch.setattr(ferroattn.functional._ferroattn, "attention", spy)
    out = torch.empty(2, 4, 10, 16)
    ptr = out.data_ptr()
    res = ferroattn.attention(q, k, v, causal=True, out=out)
    assert res is out and out.data_ptr() == ptr
    assert seen["q"] == q.data_ptr()  # the kernel read the tensor's own memory
    assert seen["out"].__array_interface__["data"][0] == ptr  # and wrote into out's
    _close(out, ferroattn.attention(q, k, v, causal=True, backend="torch"))
    # The returned tensor shares the array the kernel wrote.
    fresh = ferroattn.attention(q, k, v)
    assert fresh.data_ptr() == seen["out"].__array_interface__["data"][0]


def test_views_share_memory_for_every_dtype():
    for td in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.zeros(3, 5, dtype=td)[:, 1:]
        a = fa_torch.to_numpy(t)
        assert a.__array_interface__["data"][0] == t.data_ptr()
        back = fa_torch.from_numpy(a)
        assert back.dtype == td and back.data_ptr() == t.data_ptr()


def test_bf16_out_written_in_place():
    g = torch.Generator().manual_seed(1)
    q, k, v = (_randn(g, 1, 2, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty(1, 2, 5, 8, dtype=torch.bfloat16)
    ptr = out.data_ptr()
    assert ferroattn.attention(q, k, v, out=out) is out and out.data_ptr() == ptr
    _close(out, ferroattn.attention(q, k, v, backend="torch"), BF16)


def test_requires_grad_inputs_are_detached():
    g = torch.Generator().manual_seed(2)
    q, k, v = (_randn(g, 1, 2, 5, 8).requires_grad_() for _ in range(3))
    for backend in ("auto", "torch"):
        out = ferroattn.attention(q, k, v, causal=True, backend=backend)
        assert not out.requires_grad
    assert not ferroattn.attention_weights(q, k).requires_grad


def test_float64_tensors_keep_their_dtype():
    g = torch.Generator().manual_seed(3)
    q, k, v = (_randn(g, 1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    a = ferroattn.attention(q, k, v)
    b = ferroattn.attention(q, k, v, backend="torch")
    assert a.dtype == b.dtype == torch.float64
    _close(b, a)


def test_numpy_in_backend_torch_gives_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 6, 8), dtype=np.float32) for _ in range(3))
    a = ferroattn.attention(q, k, v, causal=True)
    b, lse = ferroattn.attention(q, k, v, causal=True, backend="torch", return_lse=True)
    assert isinstance(b, np.ndarray) and isinstance(lse, np.ndarray) and b.dtype == np.float32
    _close(b, a)
    out = np.empty_like(q)
    assert ferroattn.attention(q, k, v, backend="torch", out=out) is out
    _close(out, ferroattn.attention(q, k, v))
    # NumPy data with tensor options stays NumPy on the Rust path.
    m = torch.ones(6, 6, dtype=torch.bool).tril()
    assert isinstance(ferroattn.attention(q, k, v, mask=m), np.ndarray)


def test_mixed_kinds_and_bad_backend_are_refused():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(TypeError, match="torch tensors"):
        ferroattn.attention(q, q.numpy(), q)
    with pytest.raises(TypeError, match="torch tensors"):
        ferroattn.attention(q, q, q, out=np.zeros((1, 2, 4, 8), np.float32))
    with pytest.raises(ValueError, match="backend"):
        ferroattn.attention(q, q, q, backend="gpu")
    with pytest.raises(ValueError, match="out has shape"):
        ferroattn.attention(q, q, q, backend="torch", out=torch.zeros(1, 2, 4, 7))
    with pytest.raises(ValueError, match="multiple"):
        ferroattn.attention(q, torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), backend="torch")


# ------------------------------------------------------------- cache, layer


@pytest.mark.parametrize(
    "kw",
    [
        {"capacity": 32},
        {"capacity": 32, "dtype": "int8"},
        {"window": 4, "sinks": 2, "max_rollback": 1},
        {"window": 5, "dtype": "bfloat16"},
    ],
    ids=["plain", "int8", "window_sinks", "window_bf16"],
)
def test_kv_cache_with_tensors(kw):
    g = torch.Generator().manual_seed(4)
    host = ferroattn.KVCache(2, 2, 8, **kw)  # NumPy storage, Rust kernels
    dev = ferroattn.KVCache(2, 2, 8, backend="torch", **kw)  # torch storage (as on a GPU)
    ref = ferroattn.KVCache(2, 2, 8, **kw)  # fed NumPy
    for t in (5, 1, 3, 1):
        q, k, v = _randn(g, 2, 4, t, 8), _randn(g, 2, 2, t, 8), _randn(g, 2, 2, t, 8)
        lens = [t, t - 1]
        a = host.step(q, k, v, lengths=lens)
        b = dev.step(q, k, v, lengths=lens)
        c = ref.step(q.numpy(), k.numpy(), v.numpy(), lengths=lens)
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        _close(a, c)
        _close(b, c)
    assert dev._k.device.type == "cpu" and isinstance(dev._k, torch.Tensor)
    np.testing.assert_array_equal(dev.lengths, host.lengths)
    _close(dev.keys(1), host.keys(1))
    assert dev.nbytes == host.nbytes


def test_torch_kv_cache_bad_out_leaves_it_unchanged():
    g = torch.Generator().manual_seed(7)
    cache = ferroattn.KVCache(2, 2, 8, 8, backend="torch")
    cache.step(_randn(g, 2, 4, 2, 8), _randn(g, 2, 2, 2, 8), _randn(g, 2, 2, 2, 8))
    keys = cache._k.clone()
    q, k, v = _randn(g, 2, 4, 1, 8), _randn(g, 2, 2, 1, 8), _randn(g, 2, 2, 1, 8)
    for bad, err in (
        (np.zeros((2, 4, 1, 8), np.float32), TypeError),
        (torch.zeros(2, 4, 1, 8, dtype=torch.float64), TypeError),
        (torch.zeros(2, 4, 2, 8), ValueError),
    ):
        with pytest.raises(err, match="out"):
            cache.step(q, k, v, out=bad)
    assert cache.lengths.tolist() == [2, 2] and torch.equal(cache._k, keys)
    out = torch.full((2, 4, 1, 8), float("nan"))
    assert cache.step(q, k, v, out=out) is out and not out.isnan().any()


def test_kv_cache_device_argument_picks_torch_storage():
    cache = ferroattn.KVCache(1, 2, 8, capacity=8, device="meta")
    assert cache.backend == "torch" and cache._k.device.type == "meta"
    assert ferroattn.KVCache(1, 2, 8, capacity=8, device="cpu").backend == "cpu"
    assert ferroattn.KVCache(1, 2, 8, capacity=8, backend="torch")._k.device.type == "cpu"
    with pytest.raises(ValueError, match="backend='cpu'"):
        ferroattn.KVCache(1, 2, 8, capacity=8, device="meta", backend="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        ferroattn.KVCache(1, 2, 8, capacity=8, backend="gpu")


def test_self_attention_with_tensors():
    rng = np.random.default_rng(5)
    w = lambda o, i: rng.standard_normal((o, i), dtype=np.float32) / np.sqrt(i)  # noqa: E731
    layer = ferroattn.SelfAttention(
        w(32, 32), w(16, 32), w(16, 32), w(32, 32), num_heads=4, num_kv_heads=2, rope_theta=1e4
    )
    x = rng.standard_normal((2, 6, 32), dtype=np.float32)
    xt = torch.from_numpy(x)
    y = layer.forward(xt)
    assert isinstance(y, torch.Tensor)
    _close(y, layer.forward(x))
    cache = layer.new_cache(2, capacity=16)
    steps = torch.cat([layer.step(xt[:, :4], cache), layer.step(xt[:, 4:], cache)], dim=1)
    _close(steps, layer.forward(x))
    dev_cache = ferroattn.KVCache(2, 2, 8, 16, backend="torch")
    steps = torch.cat([layer.step(xt[:, :4], dev_cache), layer.step(xt[:, 4:], dev_cache)], 1)
    _close(steps, layer.forward(x))


# ------------------------------------------------------------------- GPU


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_tensors(dtype):
    g = torch.Generator().manual_seed(6)
    q = _randn(g, 2, 4, 6, 16, dtype=dtype, device="cuda")
    k = _randn(g, 2, 2, 9, 16, dtype=dtype, device="cuda")
    v = _randn(g, 2, 2, 9, 16, dtype=dtype, device="cuda")
    opts = _materialize(OPTIONS["everything"], g)
    rust, lse_rust = ferroattn.attention(q, k, v, return_lse=True, backend="cpu", **opts)
    auto, lse_auto = ferroattn.attention(q, k, v, return_lse=True, **opts)
    for r in (rust, auto, lse_rust, lse_auto):
        assert r.device.type == "cuda"
    assert rust.dtype == auto.dtype == dtype
    _close(auto, rust, np.dtype({torch.float32: F32, torch.float16: F16}.get(dtype, BF16)))
    _lse_close(lse_auto.cpu(), lse_rust.cpu())
    out = torch.empty_like(q[..., :16])
    assert ferroattn.attention(q, k, v, causal=True, out=out) is out
    plain = ferroattn.attention(q, k, v, causal=True)  # SDPA with a bottom-right mask
    _close(plain, ferroattn.attention(q, k, v, causal=True, backend="cpu"), F32, tol=2e-2)


@cuda
def test_cuda_kv_cache():
    g = torch.Generator().manual_seed(7)
    dev = ferroattn.KVCache(1, 2, 8, capacity=16, device="cuda")
    host = ferroattn.KVCache(1, 2, 8, capacity=16)
    for t in (4, 1):
        q, k, v = _randn(g, 1, 4, t, 8), _randn(g, 1, 2, t, 8), _randn(g, 1, 2, t, 8)
        a = dev.step(q.cuda(), k.cuda(), v.cuda())
        assert a.device.type == "cuda" and dev._k.device.type == "cuda"
        _close(a, host.step(q, k, v))
