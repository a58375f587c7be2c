"""plot_attention (matplotlib PNG), render_attention (terminal) and ``ferroattn demo --png``."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import ferroattn
from ferroattn import cli
from ferroattn.plot import ASCII_SHADES, UNICODE_SHADES, plot_attention, render_attention

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = cli.SENTENCE.split()

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

needs_mpl = pytest.mark.skipif(
    not HAVE_MPL, reason="matplotlib is not installed (pip install ferroattn[plot])"
)


def _weights(rng, *shape):
    w = rng.random(shape)
    return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data[:8] == PNG_SIGNATURE


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make ``import matplotlib`` fail, as if it were not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


# --------------------------------------------------------------------------- plot_attention


@needs_mpl
def test_plot_writes_png(rng, tmp_path):
    path = tmp_path / "w.png"
    fig = plot_attention(_weights(rng, 9, 9), TOKENS, path=path, title="demo")
    _assert_png(path)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKENS
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS
    assert ax.get_title() == "demo"
    assert len(fig.axes) == 2  # the heatmap and its colorbar


@needs_mpl
def test_plot_multi_head(rng, tmp_path):
    path = tmp_path / "heads.png"
    w = _weights(rng, 5, 4, 6)  # 5 heads, 4 queries, 6 keys
    fig = plot_attention(w, (list("abcd"), list("uvwxyz")), path=str(path), title="heads")
    _assert_png(path)
    heatmaps = [a for a in fig.axes if a.get_title().startswith("head ")]
    assert [a.get_title() for a in heatmaps] == [f"head {h}" for h in range(5)]
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == list("uvwxyz")
    with pytest.raises(ValueError, match="at most 16"):
        plot_attention(_weights(rng, 17, 3, 3))


@needs_mpl
def test_plot_without_tokens_and_into_given_axes(rng):
    from matplotlib.figure import Figure

    fig = plot_attention(_weights(rng, 3, 40))  # no labels, no path: nothing written
    assert fig.axes
    own = Figure()
    ax = own.add_subplot()
    assert plot_attention(_weights(rng, 4, 4), ax=ax, annotate=False) is own


@needs_mpl
def test_plot_real_attention_weights(tmp_path):
    d = cli.build_demo(0)
    w = ferroattn.attention_weights(d["q"], d["k"], causal=True)
    path = tmp_path / "causal.png"
    plot_attention(w, d["tokens"], path=path)
    _assert_png(path)


@pytest.mark.parametrize(
    ("tokens", "shape", "match"),
    [
        (TOKENS[:8], (9, 9), "8 query labels for 9"),
        (TOKENS, (9, 8), "one list of 9 labels"),
        ((TOKENS, TOKENS[:7]), (9, 8), "7 key labels for 8"),
        ((TOKENS[:2], None), (9, 9), "2 query labels for 9"),
    ],
)
def test_token_count_mismatch(rng, tokens, shape, match):
    w = _weights(rng, *shape)
    with pytest.raises(ValueError, match=match):
        plot_attention(w, tokens)  # raised before matplotlib is needed
    with pytest.raises(ValueError, match=match):
        render_attention(w, tokens)


@pytest.mark.parametrize(
    ("weights", "exc"),
    [
        (np.zeros(5), ValueError),
        (np.zeros((2, 2, 2, 2)), ValueError),
        (np.zeros((0, 3)), ValueError),
        (np.array([["a", "b"]]), TypeError),
    ],
)
def test_bad_weights(weights, exc):
    with pytest.raises(exc, match="weights"):
        plot_attention(weights)
    with pytest.raises(exc, match="weights"):
        render_attention(weights)


def test_plot_without_matplotlib(rng, no_matplotlib):
    with pytest.raises(ImportError, match=r"pip install ferroattn\[plot\]"):
        plot_attention(_weights(rng, 3, 3))


# --------------------------------------------------------------------------- render_attention


def _cell_lines(text, bar):
    return [line for line in text.splitlines() if line.endswith(bar)]


@pytest.mark.parametrize("ascii_only", [False, True])
def test_render_labels_and_rows(rng, ascii_only):
    w = _weights(rng, 9, 9)
    text = render_attention(w, TOKENS, ascii=ascii_only)
    bar = "|" if ascii_only else "│"
    rows = _cell_lines(text, bar)
    assert len(rows) == 9
    for i, (line, tok) in enumerate(zip(rows, TOKENS, strict=True)):
        assert line.split()[:2] == [str(i), tok]
        cells = line.split(bar)[1]
        assert set(cells) <= set(ASCII_SHADES if ascii_only else UNICODE_SHADES)
    if ascii_only:
        assert text.isascii()


def test_render_shades_follow_the_weights():
    w = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.25, 0.75, 0.0]], np.float32)
    rows = _cell_lines(render_attention(w), "│")
    cells = [line.split("│")[1] for line in rows]
    assert cells[0] == "██" + "  " + "▒▒"
    assert cells[1] == " " * 6  # a fully masked row is blank
    assert cells[2] == "░░▓▓  "


def test_render_cross_attention_and_heads(rng):
    w = _weights(rng, 2, 3, 5)  # 2 heads, 3 queries, 5 keys
    q_tok, k_tok = ["q0", "q1", "q2"], ["alpha", "beta", "gamma", "delta", "eps"]
    text = render_attention(w, (q_tok, k_tok), ascii=True)
    assert "head 0:" in text and "head 1:" in text
    assert len(_cell_lines(text, "|")) == 2 * 3
    for label in q_tok + k_tok:
        assert label in text
    plain = render_attention(w[0])  # no tokens: rows and columns by index
    assert len(_cell_lines(plain, "│")) == 3


# --------------------------------------------------------------------------- demo --png


@needs_mpl
def test_demo_png(tmp_path, capsys):
    path = tmp_path / "x.png"
    assert cli.main(["demo", "--png", str(path)]) == 0
    _assert_png(path)
    assert str(path) in capsys.readouterr().out


@needs_mpl
def test_demo_png_causal(tmp_path):
    path = tmp_path / "causal.png"
    assert cli.main(["demo", "--causal", "--seed", "3", "--png", str(path)]) == 0
    _assert_png(path)


def test_demo_png_without_matplotlib(tmp_path, capsys, no_matplotlib):
    path = tmp_path / "x.png"
    assert cli.main(["demo", "--png", str(path)]) == 0
    out = capsys.readouterr().out
    assert not path.exists()
    assert "pip install ferroattn[plot]" in out
    assert "Terminal rendering" in out
    for tok in TOKENS:
        assert tok in out


def test_demo_png_missing_folder(tmp_path, capsys):
    assert cli.main(["demo", "--png", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_without_png_is_unchanged(tmp_path, capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "Heatmap" not in out and "Terminal rendering" not in out
