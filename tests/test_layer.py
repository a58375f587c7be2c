"""ferroattn.layer.SelfAttention against a plain float64 multi-head attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from optional import require
from reference import BF16, F16, F32, F64, OUT_RTOL, rel_err
from test_rope import reference_rope

import ferroattn
from ferroattn.kv_cache import KVCache
from ferroattn.layer import SelfAttention

RTOL = 1e-5
ROPES = {"none": None, "half": False, "interleaved": True}  # value: rope_interleaved


# --------------------------------------------------------------------------
# The reference layer
# --------------------------------------------------------------------------


def _sides(window):
    if window is None:
        return None, None
    if isinstance(window, int):
        return window - 1, 0
    return window


def reference_layer(
    x,
    params,
    *,
    num_heads,
    num_kv_heads=None,
    causal=True,
    rope_theta=None,
    rope_interleaved=False,
    window=None,
    softcap=None,
    scale=None,
):
    """float64 multi-head self-attention on (B, N, d_model), written from the definitions."""
    x = np.asarray(x, dtype=np.float64)
    p = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in params.items()}
    b, n, _ = x.shape
    h = num_heads
    hkv = h if num_kv_heads is None else num_kv_heads
    hd = p["w_q"].shape[0] // h

    def project(w, bias, heads):
        y = x @ w.T + (0.0 if bias is None else bias)
        return y.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)  # (B, heads, N, hd)

    q = project(p["w_q"], p.get("b_q"), h)
    k = project(p["w_k"], p.get("b_k"), hkv)
    v = project(p["w_v"], p.get("b_v"), hkv)
    if rope_theta is not None:
        q = reference_rope(q, np.arange(n), theta=rope_theta, interleaved=rope_interleaved)
        k = reference_rope(k, np.arange(n), theta=rope_theta, interleaved=rope_interleaved)
    # GQA: query head j uses KV head j // (h // hkv).
    k = np.repeat(k, h // hkv, axis=1)
    v = np.repeat(v, h // hkv, axis=1)

    s = (1.0 / math.sqrt(hd) if scale is None else scale) * (q @ k.transpose(0, 1, 3, 2))
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    visible = np.ones((n, n), dtype=bool)
    if causal:
        visible &= j <= i
    left, right = _sides(window)
    if left is not None:
        visible &= j >= i - left
    if right is not None:
        visible &= j <= i + right
    s = np.where(visible, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    o = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, h * hd)
    return o @ p["w_o"].T + (0.0 if p.get("b_o") is None else p["b_o"])


def make_params(rng, d_model, num_heads, num_kv_heads, head_dim, *, bias=False):
    def w(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)).astype(np.float32)

    params = {
        "w_q": w(num_heads * head_dim, d_model),
        "w_k": w(num_kv_heads * head_dim, d_model),
        "w_v": w(num_kv_heads * head_dim, d_model),
        "w_o": w(d_model, num_heads * head_dim),
    }
    if bias:
        for name, n in (
            ("b_q", num_heads * head_dim),
            ("b_k", num_kv_heads * head_dim),
            ("b_v", num_kv_heads * head_dim),
            ("b_o", d_model),
        ):
            params[name] = (0.5 * rng.standard_normal(n)).astype(np.float32)
    return params


def build(params, **opts):
    return SelfAttention(
        params["w_q"],
        params["w_k"],
        params["w_v"],
        params["w_o"],
        **{k: v for k, v in params.items() if k.startswith("b_")},
        **opts,
    )


def rope_opts(kind, theta=10000.0):
    if ROPES[kind] is None:
        return {}
    return {"rope_theta": theta, "rope_interleaved": ROPES[kind]}


def _x(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _b_o_rows(params, d_model):
    b_o = params.get("b_o")
    return np.zeros(d_model, np.float32) if b_o is None else b_o


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_forward_matches_reference(rng, heads, bias, causal, rope):
    h, hkv = heads
    d_model, hd = 24, 8  # h·hd = 32 ≠ d_model: the projections are not square
    params = make_params(rng, d_model, h, hkv, hd, bias=bias)
    opts = {"num_heads": h, "num_kv_heads": hkv, "causal": causal, **rope_opts(rope)}
    x = _x(rng, (2, 11, d_model))
    got = build(params, **opts).forward(x)
    assert got.dtype == F32 and got.shape == x.shape
    assert rel_err(got, reference_layer(x, params, **opts)) <= RTOL


@pytest.mark.parametrize(
    "extra",
    [
        {"window": 4},
        {"window": (2, 3), "causal": False},
        {"window": (None, 1), "causal": False},
        {"softcap": 2.0},
        {"scale": 0.9},
        {"rope_theta": 500000.0},
        {"rope_theta": 100.0, "rope_interleaved": True, "window": 3, "softcap": 5.0},
    ],
    ids=str,
)
def test_forward_options(rng, extra):
    params = make_params(rng, 32, 4, 2, 16, bias=True)
    opts = {"num_heads": 4, "num_kv_heads": 2, **extra}
    x = _x(rng, (3, 13, 32))
    got = build(params, **opts).forward(x)
    assert rel_err(got, reference_layer(x, params, **opts)) <= RTOL
    # The option matters: without it the result differs.
    plain = reference_layer(x, params, num_heads=4, num_kv_heads=2, causal=opts.get("causal", True))
    assert rel_err(got, plain) > 1e-3


def test_head_dim_can_be_given(rng):
    params = make_params(rng, 16, 2, 1, 12)
    opts = {"num_heads": 2, "num_kv_heads": 1, "rope_theta": 1e4}
    got = build(params, head_dim=12, **opts).forward(_x(rng, (1, 5, 16)))
    assert got.shape == (1, 5, 16)


@pytest.mark.parametrize("dtype", [F16, BF16, F64])
def test_output_has_the_dtype_of_x(rng, dtype):
    params = make_params(rng, 32, 4, 2, 8, bias=True)
    opts = {"num_heads": 4, "num_kv_heads": 2, "rope_theta": 1e4}
    x = _x(rng, (2, 9, 32), dtype)
    got = build(params, **opts).forward(x)
    assert got.dtype == dtype
    # The reference sees the rounded input; the layer works in float32 and rounds at the end.
    assert rel_err(got, reference_layer(x.astype(np.float64), params, **opts)) <= OUT_RTOL[dtype]


def test_float64_weights_are_kept_as_float32(rng):
    params = make_params(rng, 16, 2, 2, 8, bias=True)
    wide = {k: v.astype(np.float64) for k, v in params.items()}
    layer = build(wide, num_heads=2)
    assert all(getattr(layer, k).dtype == F32 for k in params)
    x = _x(rng, (2, 4, 16))
    np.testing.assert_array_equal(layer.forward(x), build(params, num_heads=2).forward(x))


def test_weights_are_exposed_as_given(rng):
    params = make_params(rng, 16, 4, 2, 4, bias=True)
    del params["b_k"]
    layer = build(params, num_heads=4, num_kv_heads=2)
    for name, value in params.items():
        np.testing.assert_array_equal(getattr(layer, name), value)
    assert layer.b_k is None
    assert (layer.d_model, layer.num_heads, layer.num_kv_heads, layer.head_dim) == (16, 4, 2, 4)
    assert "num_kv_heads=2" in repr(layer)


def test_strided_input(rng):
    params = make_params(rng, 16, 2, 2, 8)
    base = _x(rng, (2, 20, 32))
    x = base[:, ::2, 8:24]  # non-contiguous in tokens and features
    got = build(params, num_heads=2, rope_theta=1e4).forward(x)
    want = reference_layer(x, params, num_heads=2, rope_theta=1e4)
    assert rel_err(got, want) <= RTOL


@given(
    h_kv=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2), (6, 3), (8, 2)]),
    hd=st.sampled_from([2, 4, 8, 12]),
    n=st.integers(1, 17),
    b=st.integers(1, 3),
    causal=st.booleans(),
    rope=st.sampled_from(list(ROPES)),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_forward_property(h_kv, hd, n, b, causal, rope, bias, seed):
    rng = np.random.default_rng(seed)
    h, hkv = h_kv
    params = make_params(rng, 20, h, hkv, hd, bias=bias)
    opts = {"num_heads": h, "num_kv_heads": hkv, "causal": causal, **rope_opts(rope)}
    x = _x(rng, (b, n, 20))
    got = build(params, **opts).forward(x)
    assert rel_err(got, reference_layer(x, params, **opts)) <= RTOL


# --------------------------------------------------------------------------
# forward with right padding
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"causal": True},
        {"causal": False},
        {"causal": True, "window": 3},
        {"causal": False, "window": (2, 1)},
        {"causal": True, **rope_opts("half")},
        {"causal": False, **rope_opts("interleaved")},
    ],
    ids=str,
)
def test_kv_lengths_rows_equal_the_unpadded_sequences(rng, extra):
    d_model, n = 24, 10
    params = make_params(rng, d_model, 4, 2, 8, bias=True)
    opts = {"num_heads": 4, "num_kv_heads": 2, **extra}
    lengths = np.array([10, 4, 0, 7])
    x = _x(rng, (4, n, d_model))
    for b, length in enumerate(lengths):
        x[b, length:] = np.nan  # padding must never be read into a valid row
    got = build(params, **opts).forward(x, kv_lengths=lengths)
    assert got.shape == x.shape
    for b, length in enumerate(lengths):
        if length:
            want = reference_layer(x[b : b + 1, :length], params, **opts)
            assert rel_err(got[b : b + 1, :length], want) <= RTOL, f"sequence {b}"
        # Documented: padded rows get attention output 0, i.e. the output bias.
        np.testing.assert_array_equal(
            got[b, length:], np.broadcast_to(params["b_o"], got[b, length:].shape)
        )


def test_full_kv_lengths_equal_no_padding(rng):
    params = make_params(rng, 16, 2, 1, 8)
    layer = build(params, num_heads=2, num_kv_heads=1, rope_theta=1e4)
    x = _x(rng, (3, 6, 16))
    got = layer.forward(x, kv_lengths=[6, 6, 6])
    assert rel_err(got, layer.forward(x)) <= 1e-6


def test_kv_lengths_all_zero(rng):
    params = make_params(rng, 16, 2, 2, 8)
    got = build(params, num_heads=2).forward(_x(rng, (2, 3, 16)), kv_lengths=[0, 0])
    np.testing.assert_array_equal(got, np.zeros((2, 3, 16), np.float32))


# --------------------------------------------------------------------------
# step: decoding through the KV cache
# --------------------------------------------------------------------------


def _decode(layer, x, cache, chunk):
    return np.concatenate(
        [layer.step(x[:, i : i + chunk], cache) for i in range(0, x.shape[1], chunk)], axis=1
    )


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)], ids=["mha", "mqa", "gqa"])
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("chunk", [1, 3])
def test_step_equals_causal_forward(rng, heads, rope, chunk):
    h, hkv = heads
    params = make_params(rng, 24, h, hkv, 8, bias=True)
    layer = build(params, num_heads=h, num_kv_heads=hkv, **rope_opts(rope))
    x = _x(rng, (2, 10, 24))
    cache = layer.new_cache(2, capacity=16)
    got = _decode(layer, x, cache, chunk)
    assert got.dtype == F32 and got.shape == x.shape
    np.testing.assert_array_equal(cache.lengths, [10, 10])
    want = layer.forward(x)
    assert rel_err(got, want) <= RTOL
    assert (
        rel_err(got, reference_layer(x, params, num_heads=h, num_kv_heads=hkv, **rope_opts(rope)))
        <= RTOL
    )


def test_step_passes_scale_and_softcap(rng):
    params = make_params(rng, 16, 4, 2, 8)
    opts = {"num_heads": 4, "num_kv_heads": 2, "scale": 0.8, "softcap": 1.5, **rope_opts("half")}
    layer = build(params, **opts)
    x = _x(rng, (2, 7, 16))
    got = _decode(layer, x, layer.new_cache(2, capacity=8), 2)
    assert rel_err(got, reference_layer(x, params, **opts)) <= RTOL


@pytest.mark.parametrize("window", [4, (3, 0), (3, None)], ids=str)
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("explicit_cache", [False, True])
def test_step_with_window_cache_equals_windowed_forward(rng, window, chunk, explicit_cache):
    params = make_params(rng, 16, 4, 2, 8)
    opts = {"num_heads": 4, "num_kv_heads": 2, "window": window, **rope_opts("half")}
    layer = build(params, **opts)
    x = _x(rng, (2, 13, 16))
    if explicit_cache:
        cache = KVCache(2, 2, 8, dtype="float32", window=4)
    else:
        cache = layer.new_cache(2, capacity=16)
        assert cache.window == 4
    got = _decode(layer, x, cache, chunk)
    want = layer.forward(x)
    assert rel_err(got, want) <= RTOL
    assert rel_err(got, reference_layer(x, params, **opts)) <= RTOL
    # The window matters over 13 tokens.
    assert rel_err(got, reference_layer(x, params, num_heads=4, num_kv_heads=2)) > 1e-3


def test_step_with_ragged_batch(rng):
    """Sequences of different lengths: per-sequence positions through `lengths=`."""
    params = make_params(rng, 16, 2, 1, 8, bias=True)
    layer = build(params, num_heads=2, num_kv_heads=1, rope_theta=1e4)
    s0, s1 = _x(rng, (7, 16)), _x(rng, (5, 16))
    cache = layer.new_cache(2, capacity=8)
    first = np.zeros((2, 4, 16), np.float32)
    first[0], first[1, :2] = s0[:4], s1[:2]
    y_first = layer.step(first, cache, lengths=[4, 2])
    np.testing.assert_array_equal(cache.lengths, [4, 2])
    y_second = layer.step(np.stack([s0[4:7], s1[2:5]]), cache)  # positions 4.. and 2..
    got0 = np.concatenate([y_first[0], y_second[0]])
    got1 = np.concatenate([y_first[1, :2], y_second[1]])
    assert rel_err(got0, layer.forward(s0[None])[0]) <= RTOL
    assert rel_err(got1, layer.forward(s1[None])[0]) <= RTOL
    np.testing.assert_array_equal(y_first[1, 2:], np.broadcast_to(params["b_o"], (2, 16)))


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_step_with_a_half_precision_cache_and_input(rng, dtype):
    params = make_params(rng, 16, 2, 2, 8)
    layer = build(params, num_heads=2, rope_theta=1e4)
    x = _x(rng, (1, 6, 16), dtype)
    got = _decode(layer, x, layer.new_cache(1, capacity=8, dtype=dtype), 2)
    assert got.dtype == dtype
    want = reference_layer(x.astype(np.float64), params, num_heads=2, rope_theta=1e4)
    assert rel_err(got, want) <= 2 * OUT_RTOL[dtype]  # k/v also rounded to the cache dtype


def test_new_cache_fits_the_layer(rng):
    params = make_params(rng, 16, 6, 2, 4)
    layer = build(params, num_heads=6, num_kv_heads=2)
    cache = layer.new_cache(3, capacity=20, dtype="float16")
    assert (cache.batch, cache.kv_heads, cache.head_dim, cache.capacity) == (3, 2, 4, 20)
    assert cache.window is None and cache.dtype == "float16"
    streaming = layer.new_cache(3, capacity=20, window=8, sinks=2)
    assert (streaming.window, streaming.sinks) == (8, 2)
    layer.step(_x(rng, (3, 2, 16)), streaming)  # a window cache under a full layer: allowed


# --------------------------------------------------------------------------
# from_state_dict
# --------------------------------------------------------------------------

LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj")
BERT = ("self.query", "self.key", "self.value", "output.dense")
BERT_SHORT = ("query", "key", "value", "output.dense")


def _state(params, names, prefix):
    state = {"unrelated.weight": np.zeros(3, np.float32), f"{prefix}rotary.inv_freq": np.ones(2)}
    for name, w, b in zip(
        names, ("w_q", "w_k", "w_v", "w_o"), ("b_q", "b_k", "b_v", "b_o"), strict=True
    ):
        state[f"{prefix}{name}.weight"] = params[w]
        if b in params:
            state[f"{prefix}{name}.bias"] = params[b]
    return state


@pytest.mark.parametrize("names", [LLAMA, BERT, BERT_SHORT], ids=["llama", "bert", "bert_short"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    "prefix,given", [("", ""), ("model.layers.3.self_attn.", None), ("enc.0.attn.", "enc.0.attn")]
)
def test_from_state_dict(rng, names, bias, prefix, given):
    params = make_params(rng, 16, 4, 2, 8, bias=bias)
    state = _state(params, names, prefix)
    opts = {"num_heads": 4, "num_kv_heads": 2, "causal": False, "rope_theta": 1e4}
    layer = SelfAttention.from_state_dict(state, prefix if given is None else given, **opts)
    for name, value in params.items():
        np.testing.assert_array_equal(getattr(layer, name), value)
    if not bias:
        assert layer.b_q is None and layer.b_o is None
    assert layer.causal is False
    x = _x(rng, (2, 5, 16))
    np.testing.assert_array_equal(layer.forward(x), build(params, **opts).forward(x))


def test_from_state_dict_partial_biases(rng):
    """Qwen2: biases on q, k, v but not on o."""
    params = make_params(rng, 16, 2, 2, 8, bias=True)
    del params["b_o"]
    layer = SelfAttention.from_state_dict(_state(params, LLAMA, "m."), "m.", num_heads=2)
    assert layer.b_o is None
    x = _x(rng, (1, 4, 16))
    assert rel_err(layer.forward(x), reference_layer(x, params, num_heads=2)) <= RTOL


def test_from_state_dict_with_torch_tensors(rng):
    torch = require("torch", "torch")
    import torch.nn.functional as F  # noqa: N812

    d_model, h, hkv, hd, n = 32, 4, 2, 8, 9
    torch.manual_seed(int(rng.integers(2**31)))

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(d_model, h * hd, bias=True)
            self.k_proj = torch.nn.Linear(d_model, hkv * hd, bias=True)
            self.v_proj = torch.nn.Linear(d_model, hkv * hd, bias=True)
            self.o_proj = torch.nn.Linear(h * hd, d_model, bias=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    block = Block()
    layer = SelfAttention.from_state_dict(
        block.state_dict(), "self_attn.", num_heads=h, num_kv_heads=hkv, rope_theta=10000.0
    )

    # An independent torch forward: HF rotate_half RoPE, GQA via repeat_interleave, SDPA.
    x = _x(rng, (2, n, d_model))
    with torch.no_grad():
        xt = torch.from_numpy(x).double()
        a = block.self_attn.double()

        def heads(t, count):
            return t.view(2, n, count, hd).transpose(1, 2)

        q, k, v = heads(a.q_proj(xt), h), heads(a.k_proj(xt), hkv), heads(a.v_proj(xt), hkv)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        emb = torch.cat([torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)] * 2, -1)

        def rotate_half(t):
            return torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], dim=-1)

        q = q * emb.cos() + rotate_half(q) * emb.sin()
        k = k * emb.cos() + rotate_half(k) * emb.sin()
        k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = a.o_proj(o.transpose(1, 2).reshape(2, n, h * hd)).numpy()
    assert rel_err(layer.forward(x), want) <= RTOL

    # bfloat16 tensors have no NumPy twin: they arrive widened to float32.
    half = {k: t.to(torch.bfloat16) for k, t in block.state_dict().items()}
    layer16 = SelfAttention.from_state_dict(half, "self_attn", num_heads=h, num_kv_heads=hkv)
    assert layer16.w_q.dtype == F32
    np.testing.assert_array_equal(layer16.w_q, half["self_attn.q_proj.weight"].float().numpy())


def test_from_state_dict_missing_everything():
    with pytest.raises(KeyError) as err:
        SelfAttention.from_state_dict({"x.weight": np.zeros((2, 2))}, "layer.0", num_heads=1)
    msg = str(err.value)
    for key in ("layer.0.q_proj.weight", "layer.0.self.query.weight", "layer.0.query.weight"):
        assert key in msg


def test_from_state_dict_missing_one(rng):
    params = make_params(rng, 8, 2, 2, 4)
    state = _state(params, LLAMA, "p.")
    del state["p.k_proj.weight"]
    with pytest.raises(KeyError, match=r"p\.k_proj\.weight"):
        SelfAttention.from_state_dict(state, "p.", num_heads=2)


def test_from_state_dict_wrong_prefix_names_the_right_one(rng):
    state = _state(make_params(rng, 8, 2, 2, 4), LLAMA, "model.layers.0.self_attn.")
    with pytest.raises(KeyError, match=r"'model\.layers\.0\.self_attn\.'"):
        SelfAttention.from_state_dict(state, "model.layers.1.self_attn.", num_heads=2)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize(
    "name,shape",
    [
        ("w_k", (16, 16)),  # num_kv_heads·head_dim = 8
        ("w_v", (8, 12)),  # d_model 16
        ("w_o", (32, 16)),
        ("w_o", (16,)),
        ("b_q", (15,)),
        ("b_v", (8, 1)),
        ("b_o", (32,)),
    ],
)
def test_wrong_weight_shapes(rng, name, shape):
    params = make_params(rng, 16, 4, 2, 4, bias=True)
    params[name] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"{name} .*{re_shape(shape)}"):
        build(params, num_heads=4, num_kv_heads=2)


def test_num_heads_must_divide_w_q(rng):
    params = make_params(rng, 16, 4, 4, 4)  # w_q (16, 16)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide .*\(16, 16\)"):
        build(params, num_heads=3, num_kv_heads=1)


def test_num_kv_heads_must_divide_num_heads(rng):
    params = make_params(rng, 16, 4, 4, 4)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        build(params, num_heads=4, num_kv_heads=3)


def test_explicit_head_dim_must_match(rng):
    params = make_params(rng, 16, 4, 4, 4)
    with pytest.raises(ValueError, match=r"w_q must have shape \(20, 16\)"):
        build(params, num_heads=4, head_dim=5)


@pytest.mark.parametrize(
    "opts,error,match",
    [
        ({"num_heads": 0}, ValueError, "num_heads"),
        ({"num_heads": True}, TypeError, "num_heads"),
        ({"num_heads": 2.0}, TypeError, "num_heads"),
        ({"num_heads": 2, "window": -3}, ValueError, "window"),
        ({"num_heads": 2, "softcap": 0.0}, ValueError, "softcap"),
        ({"num_heads": 2, "causal": "left"}, ValueError, "causal"),
        ({"num_heads": 2, "rope_theta": -1.0}, ValueError, "rope_theta"),
    ],
)
def test_bad_options(rng, opts, error, match):
    with pytest.raises(error, match=match):
        build(make_params(rng, 8, 2, 2, 4), **opts)


def test_rope_needs_even_head_dim(rng):
    with pytest.raises(ValueError, match="even head_dim, got 3"):
        build(make_params(rng, 6, 2, 2, 3), num_heads=2, rope_theta=1e4)


def test_integer_weights_are_refused(rng):
    params = make_params(rng, 8, 2, 2, 4)
    params["w_v"] = params["w_v"].astype(np.int32)
    with pytest.raises(TypeError, match="w_v"):
        build(params, num_heads=2)


@pytest.mark.parametrize("shape", [(4, 8), (1, 4, 9), (1, 1, 4, 8)])
def test_forward_x_shape(rng, shape):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2)
    with pytest.raises(ValueError, match=rf"d_model=8.*{re_shape(shape)}"):
        layer.forward(np.zeros(shape, np.float32))


def test_forward_x_dtype(rng):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        layer.forward(np.zeros((1, 2, 8), np.int64))


@pytest.mark.parametrize("lengths", [[3], [3, 3, 3], [5, 1], [-1, 2]])
def test_forward_bad_kv_lengths(rng, lengths):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2)
    with pytest.raises(ValueError, match="kv_lengths"):
        layer.forward(np.zeros((2, 4, 8), np.float32), kv_lengths=lengths)


def test_step_needs_a_causal_layer(rng):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2, causal=False)
    with pytest.raises(ValueError, match="causal=False"):
        layer.step(np.zeros((1, 1, 8), np.float32), layer.new_cache(1, 4))


def test_window_layer_refuses_a_cache_without_window(rng):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2, window=4)
    cache = KVCache(1, 2, 4, 16)
    with pytest.raises(ValueError, match="window=4 but the cache has none"):
        layer.step(np.zeros((1, 1, 8), np.float32), cache)
    np.testing.assert_array_equal(cache.lengths, [0])  # nothing was appended


def test_window_layer_refuses_another_window(rng):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2, window=4)
    with pytest.raises(ValueError, match="window=4 but the cache has window=5"):
        layer.step(np.zeros((1, 1, 8), np.float32), layer.new_cache(1, 16, window=5))


@pytest.mark.parametrize(
    "cache_args,match",
    [((1, 1, 4, 8), "kv_heads=1"), ((1, 2, 2, 8), "head_dim=2"), ((2, 2, 4, 8), "batch=2")],
)
def test_step_refuses_a_cache_of_another_shape(rng, cache_args, match):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2)
    with pytest.raises(ValueError, match=match):
        layer.step(np.zeros((1, 1, 8), np.float32), KVCache(*cache_args))


def test_step_refuses_something_else(rng):
    layer = build(make_params(rng, 8, 2, 2, 4), num_heads=2)
    with pytest.raises(TypeError, match="KVCache"):
        layer.step(np.zeros((1, 1, 8), np.float32), {"lengths": [0]})


@pytest.mark.parametrize("term", ["alibi_slopes", "sinks", "rel_bias"])
def test_layer_score_terms_decode_equals_forward_and_padding(term):
    rng = np.random.default_rng(5)
    d, h, hkv = 32, 4, 2
    w_q, w_o = (rng.standard_normal((d, d), dtype=np.float32) * 0.2 for _ in range(2))
    w_k, w_v = (rng.standard_normal((hkv * 8, d), dtype=np.float32) * 0.2 for _ in range(2))
    values = {
        "alibi_slopes": ferroattn.alibi_slopes(h),
        "sinks": np.array([0.1, 0.2, -0.3, 0.4], np.float32),
        "rel_bias": ferroattn.T5Bias(
            rng.standard_normal((8, h)).astype(np.float32), bidirectional=False, max_distance=20
        ),
    }
    layer = ferroattn.SelfAttention(
        w_q, w_k, w_v, w_o, num_heads=h, num_kv_heads=hkv, rope_theta=1e4, **{term: values[term]}
    )
    plain = ferroattn.SelfAttention(w_q, w_k, w_v, w_o, num_heads=h, num_kv_heads=hkv)
    x = rng.standard_normal((2, 11, d), dtype=np.float32)
    full = layer.forward(x)
    assert not np.allclose(full, plain.forward(x), atol=1e-3)  # the term changes the result
    cache = layer.new_cache(2, capacity=16)
    steps = np.concatenate([layer.step(x[:, i : i + 2], cache) for i in range(0, 11, 2)], 1)
    np.testing.assert_allclose(steps, full, atol=2e-6)
    padded = np.concatenate([x, np.zeros((2, 3, d), np.float32)], 1)
    np.testing.assert_allclose(layer.forward(padded, kv_lengths=[11, 11])[:, :11], full, atol=2e-6)
