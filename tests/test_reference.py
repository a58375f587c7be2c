"""Sanity checks of the reference itself (no ferroattn involved).

The reference is checked against independent formulations: the visibility mask is
rebuilt from torch.tril / torch.triu diagonals, the attention (with every extra score
term, masks, block layouts and sinks) is computed by torch in float64 over a full score
matrix with the sink as one more softmax column, T5's buckets against Hugging Face's own
function, and a few values by hand.  The torch-based checks skip without torch, unless
FERROATTN_REQUIRE_EXTRAS=1 (CI).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from optional import require
from reference import (
    block_mask,
    from_bhsd,
    lse_to_rank,
    reference,
    reference_attention,
    reference_varlen,
    reference_weights,
    t5_bucket,
    to_bhsd,
    visibility_mask,
)


@pytest.fixture(scope="module")
def torch():
    return require("torch")


def _torch_mask(torch, nq, nk, k_len, causal, window):
    """Same rules as visibility_mask, written with tril/triu diagonals."""
    off = 0 if causal == "top_left" else k_len - nq  # p = i + off
    m = torch.ones(nq, nk, dtype=torch.bool)
    m[:, k_len:] = False
    if causal:
        m &= torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=off)
    if window is not None:
        if isinstance(window, int):
            window = (window - 1, 0)
        left, right = window
        if left is not None and left != -1:
            m &= torch.ones(nq, nk, dtype=torch.bool).triu(diagonal=off - left)
        if right is not None and right != -1:
            m &= torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=off + right)
    return m.numpy()


CASES = [
    (7, 7, {}),
    (5, 9, {"causal": True}),
    (9, 5, {"causal": "bottom_right"}),
    (9, 5, {"causal": "top_left"}),
    (6, 11, {"window": 3}),
    (11, 6, {"window": (2, 1)}),
    (8, 8, {"window": (-1, 0), "causal": "top_left"}),
    (8, 12, {"window": (None, 2)}),
    (10, 10, {"window": (0, 0), "causal": True}),
    (4, 13, {"window": (1, -1), "kv_lengths": [9]}),
    (13, 4, {"causal": True, "kv_lengths": [2]}),
    (6, 6, {"kv_lengths": [0]}),
]


@pytest.mark.parametrize("nq,nk,opts", CASES, ids=str)
def test_mask_matches_tril_triu_formulation(torch, nq, nk, opts):
    opts = dict(opts)
    kvl = opts.pop("kv_lengths", [nk])
    m = visibility_mask(nq, nk, kvl[0], **opts)
    np.testing.assert_array_equal(
        m, _torch_mask(torch, nq, nk, kvl[0], opts.get("causal", False), opts.get("window"))
    )


def test_mask_small_examples_by_hand():
    # bottom-right causal, Nq=2, Nk=3: p = i + 1
    np.testing.assert_array_equal(visibility_mask(2, 3, 3, causal=True), [[1, 1, 0], [1, 1, 1]])
    # top-left causal
    np.testing.assert_array_equal(
        visibility_mask(2, 3, 3, causal="top_left"), [[1, 0, 0], [1, 1, 0]]
    )
    # int window 2 == (1, 0), no causal, Nq=Nk=3
    np.testing.assert_array_equal(
        visibility_mask(3, 3, 3, window=2), [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    )
    # kv_lengths cut
    np.testing.assert_array_equal(visibility_mask(1, 4, 2, window=(-1, -1)), [[1, 1, 0, 0]])


@pytest.mark.parametrize("nq,nk,opts", CASES, ids=str)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_reference_matches_torch_sdpa(torch, nq, nk, opts, softcap):
    rng = np.random.default_rng(nq * 100 + nk)
    opts = dict(opts)
    kvl = opts.pop("kv_lengths", None)
    B, Hq, Hkv, D, Dv = 1, 4, 2, 8, 5
    q = rng.standard_normal((B, Hq, nq, D))
    k = rng.standard_normal((B, Hkv, nk, D))
    v = rng.standard_normal((B, Hkv, nk, Dv))
    scale = 0.7
    out, lse = reference_attention(q, k, v, scale=scale, softcap=softcap, kv_lengths=kvl, **opts)
    k_len = nk if kvl is None else kvl[0]
    mask = _torch_mask(torch, nq, nk, k_len, opts.get("causal", False), opts.get("window"))
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    tk = tk.repeat_interleave(Hq // Hkv, dim=1)
    tv = tv.repeat_interleave(Hq // Hkv, dim=1)
    s = scale * tq @ tk.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
    t_lse = torch.logsumexp(s, dim=-1).numpy()
    rows = mask.any(axis=1)
    np.testing.assert_allclose(lse[..., rows], t_lse[..., rows], rtol=1e-12)
    assert np.all(np.isneginf(lse[..., ~rows]))
    assert np.all(out[..., ~rows, :] == 0)
    if rows.any():
        t_out = torch.softmax(s[..., rows, :], dim=-1) @ tv
        np.testing.assert_allclose(out[..., rows, :], t_out.numpy(), rtol=1e-10)
        w = reference_weights(q, k, scale=scale, softcap=softcap, kv_lengths=kvl, **opts)
        wv = np.einsum("bhqk,bhkd->bhqd", w, tv.numpy())
        np.testing.assert_allclose(wv, out, rtol=1e-10, atol=1e-14)


def test_layout_helpers_round_trip():
    x = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    for layout in ("bhsd", "bshd"):
        np.testing.assert_array_equal(to_bhsd(from_bhsd(x, layout), layout), x)
        np.testing.assert_array_equal(to_bhsd(from_bhsd(x[:1], layout, 3), layout), x[:1])
    np.testing.assert_array_equal(to_bhsd(from_bhsd(x[:1, :1], "bhsd", 2)), x[:1, :1])
    assert from_bhsd(x, "bshd").shape == (2, 4, 3, 5)
    assert lse_to_rank(np.zeros((1, 1, 7)), 2).shape == (7,)


def test_reference_varlen_is_per_sequence():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((7, 2, 4))
    k = rng.standard_normal((9, 1, 4))
    v = rng.standard_normal((9, 1, 3))
    cu_q, cu_k = [0, 3, 3, 7], [0, 5, 6, 9]
    out, lse = reference_varlen(q, k, v, cu_q, cu_k, causal=True)
    o1, l1 = reference_attention(
        q[None, :3].transpose(0, 2, 1, 3),
        k[None, :5].transpose(0, 2, 1, 3),
        v[None, :5].transpose(0, 2, 1, 3),
        causal=True,
    )
    np.testing.assert_array_equal(out[:3], o1[0].transpose(1, 0, 2))
    np.testing.assert_array_equal(lse[:, :3], l1[0])
    assert out.shape == (7, 2, 3) and lse.shape == (2, 7)


# --------------------------------------------------------------------------
# The extra score terms, masks, block layouts and sinks
# --------------------------------------------------------------------------


def test_t5_bucket_by_hand():
    # num_buckets=32, max_distance=128, bidirectional (T5's encoder), values from HF's code
    rel = [0, -1, 1, -7, -8, -12, -60, -100, -127, -128, -1000, 20, 7, 8, 500]
    want = [0, 1, 17, 7, 8, 9, 13, 15, 15, 15, 15, 26, 23, 24, 31]
    assert t5_bucket(rel).tolist() == want
    rel = [5, 0, -5, -15, -16, -17, -40, -127, -128, -200]
    want = [0, 0, 5, 15, 16, 16, 23, 31, 31, 31]
    assert t5_bucket(rel, bidirectional=False).tolist() == want


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 10), (16, 24), (40, 21)])
def test_t5_bucket_matches_transformers(torch, bidirectional, num_buckets, max_distance):
    t5 = require("transformers.models.t5.modeling_t5")
    rel = np.arange(-600, 601)
    want = t5.T5Attention._relative_position_bucket(
        torch.from_numpy(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    got = t5_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    np.testing.assert_array_equal(got, want.numpy())


def test_block_mask_by_hand():
    lay = np.array([[True, False], [True, True]])
    want = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    m = block_mask(lay, 2, 3)
    assert m.shape == (3, 4, 4)
    np.testing.assert_array_equal(m[2], want)
    per_head = block_mask(np.stack([lay, ~lay]), 2, 2)
    np.testing.assert_array_equal(per_head[1], 1 - np.array(want))


def test_sink_formula_by_hand():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 3, 4))
    v = rng.standard_normal((1, 1, 3, 2))
    k = np.concatenate([k, rng.standard_normal((1, 1, 2, 4))], axis=2)  # 5 keys
    v = np.concatenate([v, rng.standard_normal((1, 1, 2, 2))], axis=2)
    out, lse, w = reference(q, k, v, sinks=np.array([0.7]))
    s = (q[0, 0] @ k[0, 0].T) / 2.0
    z = np.exp(s).sum(axis=1) + math.exp(0.7)
    np.testing.assert_allclose(out[0, 0], np.exp(s) @ v[0, 0] / z[:, None], rtol=1e-12)
    np.testing.assert_allclose(lse[0, 0], np.log(z), rtol=1e-12)
    np.testing.assert_allclose(w[0, 0].sum(axis=1), 1 - np.exp(0.7 - lse[0, 0]), rtol=1e-12)


def _torch_variant(torch, q, k, v, *, k_len, causal=False, window=None, scale, opts):
    """Every option as one full (Hq, Nq, Nk) score matrix in torch; the sink is one more
    softmax column whose value is zero. B = 1. Returns (out, lse, weights) as NumPy."""
    tq, tk, tv = (torch.from_numpy(x[0]) for x in (q, k, v))
    hq, nq, nk = tq.shape[0], tq.shape[1], tk.shape[1]
    tk = tk.repeat_interleave(hq // tk.shape[0], dim=0)
    tv = tv.repeat_interleave(hq // tv.shape[0], dim=0)
    s = scale * tq @ tk.transpose(-1, -2)
    if "bias" in opts:
        s = s + torch.from_numpy(np.asarray(opts["bias"], np.float64))
    off = 0 if causal == "top_left" else k_len - nq
    dist = (torch.arange(nk)[None, :] - torch.arange(nq)[:, None] - off).double()
    if "alibi_slopes" in opts:
        s = s - torch.from_numpy(opts["alibi_slopes"])[:, None, None] * dist.abs()
    if "rel_bias" in opts:
        t5 = require("transformers.models.t5.modeling_t5")
        rb = opts["rel_bias"]
        bucket = t5.T5Attention._relative_position_bucket(
            dist.long(),
            bidirectional=rb.bidirectional,
            num_buckets=rb.table.shape[0],
            max_distance=rb.max_distance,
        )
        s = s + torch.from_numpy(rb.table)[bucket].permute(2, 0, 1)
    seen = torch.from_numpy(_torch_mask(torch, nq, nk, k_len, causal, window).copy())
    if "mask" in opts:
        seen = seen & torch.from_numpy(opts["mask"])
    if "block_layout" in opts:
        bs = opts["block_size"]
        seen = seen & torch.kron(torch.from_numpy(opts["block_layout"]), torch.ones(bs, bs)).bool()
    s = s.masked_fill(~seen, -math.inf)
    sink = opts.get("sinks", np.full(hq, -np.inf))
    s = torch.cat([s, torch.from_numpy(sink)[:, None, None].expand(hq, nq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., :nk]  # all -inf rows: 0
    return (p @ tv).numpy()[None], lse.numpy()[None], p.numpy()[None]


VARIANT_CASES = [
    # Nq, Nk, visibility, extra options (built in the test from their names)
    (6, 9, {}, ["bias"]),
    (6, 9, {"causal": True}, ["alibi"]),
    (9, 6, {"causal": "top_left"}, ["alibi", "t5"]),
    (8, 12, {"window": (2, 3)}, ["t5_decoder"]),
    (8, 8, {}, ["mask", "sinks"]),
    (8, 12, {"causal": True, "kv_lengths": [7]}, ["sinks", "bias"]),
    (8, 12, {}, ["block"]),
    (8, 12, {"causal": "top_left"}, ["block", "sinks", "mask"]),
    (12, 8, {"window": (1, 1), "kv_lengths": [5]}, ["bias", "alibi", "t5", "mask", "sinks"]),
]


@pytest.mark.parametrize("nq,nk,vis,extras", VARIANT_CASES, ids=str)
def test_variants_match_full_score_matrix(torch, nq, nk, vis, extras):
    rng = np.random.default_rng(nq * 100 + nk + len(extras))
    hq, hkv = 4, 2
    q = rng.standard_normal((1, hq, nq, 8))
    k = rng.standard_normal((1, hkv, nk, 8))
    v = rng.standard_normal((1, hkv, nk, 5))
    opts = {}
    if "bias" in extras:
        opts["bias"] = 2.0 * rng.standard_normal((hq, nq, nk))
    if "alibi" in extras:
        opts["alibi_slopes"] = rng.uniform(0.0, 0.5, hq)
    if "t5" in extras or "t5_decoder" in extras:
        table = rng.standard_normal((16 if "t5" in extras else 8, hq))
        bidir = "t5" in extras
        opts["rel_bias"] = SimpleNamespace(table=table, bidirectional=bidir, max_distance=20)
    if "mask" in extras:
        opts["mask"] = rng.random((nq, nk)) < 0.6
        opts["mask"][1] = False  # a row that sees nothing
    if "sinks" in extras:
        opts["sinks"] = 2.0 * rng.standard_normal(hq)
    if "block" in extras:
        opts["block_layout"] = rng.random((nq // 4, nk // 4)) < 0.6
        opts["block_layout"][0] = False  # a row of blocks that sees nothing
        opts["block_size"] = 4
    k_len = vis.get("kv_lengths", [nk])[0]
    want = _torch_variant(
        torch,
        q,
        k,
        v,
        k_len=k_len,
        causal=vis.get("causal", False),
        window=vis.get("window"),
        scale=0.4,
        opts=opts,
    )
    got = reference(q, k, v, scale=0.4, **vis, **opts)
    for g, w, name in zip(got, want, ("out", "lse", "weights"), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13, err_msg=name)
    if "mask" in extras or "block" in extras:
        assert (got[2].sum(axis=-1) == 0).any(), "a row that sees nothing is among the cases"
