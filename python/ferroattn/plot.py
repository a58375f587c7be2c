"""Pictures of attention weights: a matplotlib heatmap (PNG) and a terminal rendering.

matplotlib is optional (``pip install ferroattn[plot]``) and imported only inside
:func:`plot_attention`; :func:`render_attention` needs nothing but NumPy.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_attention", "render_attention"]

MAX_HEADS = 16  # subplots drawn by plot_attention for a 3-D (H, Nq, Nk) input
UNICODE_SHADES = " ░▒▓█"
ASCII_SHADES = " .:-=+*#%@"
_INSTALL_HINT = "pip install ferroattn[plot]"

# --------------------------------------------------------------------------- validation


def _weights(weights: Any) -> np.ndarray:
    """``weights`` as float64 ``(H, Nq, Nk)`` (H = 1 for 2-D input), validated."""
    try:
        w = np.asarray(weights)
    except Exception as exc:  # noqa: BLE001 (ragged lists and the like)
        raise TypeError(f"weights must be an array, got {type(weights).__name__}") from exc
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.number) or w.dtype.name == "bfloat16"):
        raise TypeError(f"weights must be a numeric array, got dtype {w.dtype}")
    if np.issubdtype(w.dtype, np.complexfloating):
        raise TypeError(f"weights must be real, got dtype {w.dtype}")
    if w.ndim not in (2, 3):
        raise ValueError(
            f"weights must be 2-D (Nq, Nk) or 3-D (H, Nq, Nk), got shape {w.shape} "
            "(index one batch first, e.g. attention_weights(q, k)[0])"
        )
    if w.size == 0:
        raise ValueError(f"weights is empty (shape {w.shape})")
    w = w.astype(np.float64)
    return w if w.ndim == 3 else w[None]


def _is_label_list(x: Any) -> bool:
    return (
        x is not None
        and not isinstance(x, (str, bytes))
        and (isinstance(x, np.ndarray) or isinstance(x, Sequence))
    )


def _labels(tokens: Any, nq: int, nk: int) -> tuple[list[str] | None, list[str] | None]:
    """Query and key labels from ``tokens``: ``None``, one list, or ``(query, key)`` lists."""
    if tokens is None:
        return None, None
    if isinstance(tokens, (str, bytes)) or not _is_label_list(tokens):
        raise TypeError(
            "tokens must be a list of labels or a pair (query_tokens, key_tokens), "
            f"got {type(tokens).__name__}"
        )
    items = list(tokens)
    pair = len(items) == 2 and all(t is None or _is_label_list(t) for t in items)
    if pair:
        q_tok, k_tok = items
    else:
        if nq != nk:
            raise ValueError(
                f"tokens is one list of {len(items)} labels but weights are {nq} x {nk} "
                "(queries x keys): pass (query_tokens, key_tokens) when they differ"
            )
        q_tok = k_tok = items
    out: list[list[str] | None] = []
    for what, toks, n in (("query", q_tok, nq), ("key", k_tok, nk)):
        if toks is None:
            out.append(None)
            continue
        labels = [str(t) for t in toks]
        if len(labels) != n:
            raise ValueError(
                f"tokens: {len(labels)} {what} labels for {n} {what} "
                f"{'rows' if what == 'query' else 'columns'} of weights"
            )
        out.append(labels)
    return out[0], out[1]


# --------------------------------------------------------------------------- matplotlib


def _import_matplotlib() -> Any:
    try:
        import matplotlib  # lazy on purpose: matplotlib is optional
    except ImportError as exc:
        raise ImportError(
            f"plot_attention needs matplotlib, which is not installed: {_INSTALL_HINT} "
            "(or pip install matplotlib); render_attention() draws in the terminal without it"
        ) from exc
    return matplotlib


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A figure: from pyplot if the caller already uses it (Jupyter, interactive backends),
    else a bare ``Figure`` rendered by Agg, which needs no display and leaves matplotlib's
    global backend alone."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        return pyplot.figure(figsize=figsize)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _draw_one(
    ax: Any,
    w: np.ndarray,
    q_lab: list[str] | None,
    k_lab: list[str] | None,
    *,
    cmap: Any,
    vmin: float,
    vmax: float,
    annotate: bool,
    small: bool,
) -> Any:
    nq, nk = w.shape
    image = ax.imshow(
        w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest", origin="upper"
    )
    fontsize = 7 if small else 9
    ax.tick_params(labelsize=fontsize)
    if k_lab is not None and nk <= 64:  # beyond that the labels would overlap
        ax.set_xticks(range(nk))
        ax.set_xticklabels(k_lab, rotation=45, ha="right", rotation_mode="anchor")
    if q_lab is not None and nq <= 64:
        ax.set_yticks(range(nq))
        ax.set_yticklabels(q_lab)
    ax.set_xlabel("key", fontsize=fontsize)
    ax.set_ylabel("query", fontsize=fontsize)
    if annotate:
        cmap_obj = image.get_cmap()
        span = (vmax - vmin) or 1.0
        for i in range(nq):
            for j in range(nk):
                value = w[i, j]
                if not np.isfinite(value):
                    continue
                r, g, b, _ = cmap_obj((value - vmin) / span)
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize - 1,
                    color="white" if dark else "black",
                )
    return image


def plot_attention(
    weights: Any,
    tokens: Any = None,
    *,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ax: Any = None,
    cmap: Any = "viridis",
    annotate: bool | None = None,
) -> Any:
    """Draw attention weights as a heatmap (rows = queries, columns = keys), with matplotlib.

    Args:
        weights: ``(Nq, Nk)`` (e.g. ``attention_weights(q, k)[0, h]``), or ``(H, Nq, Nk)``: one
            subplot per head (at most 16), sharing one color scale and colorbar.
        tokens: labels for both axes (a list of ``Nq == Nk`` items, turned into text with
            ``str``), or a pair ``(query_tokens, key_tokens)`` (either may be ``None``).
        path: if given, the figure is saved there (PNG unless the extension names another
            format matplotlib knows).
        title: figure title.
        ax: draw into this matplotlib ``Axes`` (for 3-D weights: a sequence of at least ``H``
            axes) instead of a new figure.
        cmap: a matplotlib colormap or its name.
        annotate: write each weight in its cell; default: for 2-D weights of at most 16 x 16.

    Returns:
        The matplotlib ``Figure``. Without ``ax`` it is a new figure: made by pyplot if
        ``matplotlib.pyplot`` is already imported (so Jupyter and ``plt.show()`` see it; close
        it with ``plt.close(fig)``), otherwise a stand-alone figure rendered by the Agg backend,
        which needs no display and does not touch matplotlib's global state.

    Raises:
        ImportError: matplotlib is not installed (``pip install ferroattn[plot]``).
        ValueError: wrong rank, empty weights, more than 16 heads, or a label count that does
            not match the weights.
    """
    w = _weights(weights)
    heads, nq, nk = w.shape
    three_d = np.ndim(weights) == 3
    if three_d and heads > MAX_HEADS:
        raise ValueError(
            f"weights has {heads} heads; plot_attention draws at most {MAX_HEADS} "
            "(select some, e.g. weights[:16])"
        )
    q_lab, k_lab = _labels(tokens, nq, nk)
    if annotate is None:
        annotate = not three_d and max(nq, nk) <= 16
    _import_matplotlib()

    finite = w[np.isfinite(w)]
    vmin = float(min(0.0, finite.min())) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0

    if three_d:
        cols = math.ceil(math.sqrt(heads))
        rows = math.ceil(heads / cols)
    else:
        cols = rows = 1
    if ax is None:
        cell = 0.5 if max(nq, nk) <= 16 else max(0.06, 8.0 / max(nq, nk))
        label_room = 0.0 if q_lab is None else min(1.6, 0.08 * max(len(s) for s in q_lab))
        panel_w = min(12.0, max(2.5, nk * cell)) + label_room + 0.8
        panel_h = min(12.0, max(2.5, nq * cell)) + 0.8
        fig = _new_figure((cols * panel_w + 1.2, rows * panel_h + (0.6 if title else 0.2)))
        axes = [fig.add_subplot(rows, cols, i + 1) for i in range(heads)]
    else:
        axes = list(np.ravel(np.asarray(ax, dtype=object))) if three_d else [ax]
        if len(axes) < heads:
            raise ValueError(f"ax: {len(axes)} axes given for {heads} heads")
        axes = axes[:heads]
        fig = axes[0].figure

    image = None
    for h, a in enumerate(axes):
        image = _draw_one(
            a,
            w[h],
            q_lab,
            k_lab,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            annotate=annotate,
            small=three_d,
        )
        if three_d:
            a.set_title(f"head {h}", fontsize=9)
    fig.colorbar(image, ax=axes, label="attention weight", shrink=0.9 if three_d else 1.0)
    if title:
        if three_d:
            fig.suptitle(title)
        else:
            axes[0].set_title(title)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=150, bbox_inches="tight")
    return fig


# --------------------------------------------------------------------------- terminal


def _render_head(
    w: np.ndarray,
    q_lab: list[str] | None,
    k_lab: list[str] | None,
    shades: str,
    bar: str,
    vmax: float,
) -> list[str]:
    nq, nk = w.shape
    levels = len(shades) - 1
    idx_w = len(str(max(nq, nk) - 1))
    cell_w = max(2, idx_w)  # columns are labelled by index; the index fits in a cell
    name_w = max((len(s) for s in q_lab), default=0) if q_lab else 0
    left = idx_w + (name_w + 1 if q_lab else 0) + 1  # "12 token " then the bar
    lines = [" " * (left + 1) + "".join(f"{j:>{cell_w}}" for j in range(nk))]
    for i in range(nq):
        cells = []
        for value in w[i]:
            if np.isnan(value):
                ch = "?"
            else:
                ch = shades[int(round(min(max(value, 0.0), vmax) / vmax * levels))]
            cells.append(ch * cell_w)
        name = f"{i:>{idx_w}} " + (f"{q_lab[i]:<{name_w}} " if q_lab else "")
        lines.append(name + bar + "".join(cells) + bar)
    if k_lab is not None and k_lab != q_lab:
        lines.append("keys: " + "  ".join(f"{j}:{s}" for j, s in enumerate(k_lab)))
    elif k_lab is not None:
        lines.append("(columns are keys, numbered like the rows)")
    return lines


def render_attention(weights: Any, tokens: Any = None, *, ascii: bool = False) -> str:
    """Attention weights drawn with characters, for a terminal (no matplotlib needed).

    One line per query: its index and label, then one shaded cell per key, darker for larger
    weights (``' ░▒▓█'``, or ``' .:-=+*#%@'`` with ``ascii=True``). Columns are numbered by key
    index; key labels that differ from the query labels are listed below. The shades run from 0
    (blank) to the largest weight, which the first line states. ``(H, Nq, Nk)`` weights give one
    block per head.

    Args:
        weights: ``(Nq, Nk)`` or ``(H, Nq, Nk)``.
        tokens: as in :func:`plot_attention`: one list of labels, or ``(query, key)`` lists.
        ascii: use only ASCII characters.

    Returns:
        The drawing, lines joined by ``"\\n"`` (no trailing newline).
    """
    w = _weights(weights)
    heads, nq, nk = w.shape
    three_d = np.ndim(weights) == 3
    q_lab, k_lab = _labels(tokens, nq, nk)
    shades = ASCII_SHADES if ascii else UNICODE_SHADES
    bar = "|" if ascii else "│"
    finite = w[np.isfinite(w)]
    vmax = float(finite.max()) if finite.size else 0.0
    if not vmax > 0.0:
        vmax = 1.0
    lines = [
        f"attention weights, {nq} queries (rows) x {nk} keys (columns); "
        f"'{shades[0]}' = 0 ... '{shades[-1]}' = {vmax:.3g}"
    ]
    for h in range(heads):
        if three_d:
            lines.append(f"head {h}:")
        lines += _render_head(w[h], q_lab, k_lab, shades, bar, vmax)
    return "\n".join(lines)
