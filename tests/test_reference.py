"""Sanity checks of the reference itself (no ferroattn involved).

The reference is checked against an independent formulation: the mask is
rebuilt from torch.tril / torch.triu diagonals and the attention is computed by
torch's scaled_dot_product_attention in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import (
    from_bhsd,
    lse_to_rank,
    reference_attention,
    reference_varlen,
    reference_weights,
    to_bhsd,
    visibility_mask,
)

torch = pytest.importorskip("torch")


def _torch_mask(nq, nk, k_len, causal, window):
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
def test_mask_matches_tril_triu_formulation(nq, nk, opts):
    opts = dict(opts)
    kvl = opts.pop("kv_lengths", [nk])
    m = visibility_mask(nq, nk, kvl[0], **opts)
    np.testing.assert_array_equal(
        m, _torch_mask(nq, nk, kvl[0], opts.get("causal", False), opts.get("window"))
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
def test_reference_matches_torch_sdpa(nq, nk, opts, softcap):
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
    mask = _torch_mask(nq, nk, k_len, opts.get("causal", False), opts.get("window"))
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
