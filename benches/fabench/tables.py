"""Text and markdown tables, and the result files (JSON plus a markdown copy).

A table row is a list of strings. Its first ``n_keys`` cells name what was measured; a row
whose cell ``n_keys`` holds a message and whose later cells are empty is a status row (a
candidate that did not run): the message runs on past the columns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def fmt_bytes(x: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{int(x)} B"


def is_status_row(row: list[str], n_keys: int) -> bool:
    return bool(row[n_keys]) and not any(row[n_keys + 1 :])


def format_table(
    headers: list[str], rows: list[list[str]], *, left: set[int], n_keys: int, group: int
) -> list[str]:
    """Aligned columns (those in ``left`` to the left, the others to the right), a blank line
    between rows whose first ``group`` cells differ."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:n_keys] if is_status_row(row, n_keys) else row):
            widths[i] = max(widths[i], len(cell))

    def align(i: int, c: str) -> str:
        return f"{c:<{widths[i]}}" if i in left else f"{c:>{widths[i]}}"

    def fmt(row: list[str]) -> str:
        if row is not headers and is_status_row(row, n_keys):
            return "  ".join(align(i, c) for i, c in enumerate(row[:n_keys])) + "  " + row[n_keys]
        return "  ".join(align(i, c) for i, c in enumerate(row)).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    prev = None
    for row in rows:
        if prev is not None and row[:group] != prev:
            out.append("")
        prev = row[:group]
        out.append(fmt(row))
    return out


def markdown_table(headers: list[str], rows: list[list[str]], *, left: set[int]) -> list[str]:
    """The same table in markdown (``|`` in a cell becomes ``/``)."""
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(":---" if i in left else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        cells = [c.replace("|", "/") for c in row]
        lines.append("| " + " | ".join(c or " " for c in cells) + " |")
    return lines


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats as None and NumPy scalars as Python ones."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return json_safe(x.item())
    if isinstance(x, Path):
        return str(x)
    return x


def write_results(out_dir: Path, stem: str, md: str, payload: dict[str, Any]) -> list[Path]:
    """Writes ``<stem>.json`` and ``<stem>.md``; returns their paths. The JSON is parsed back
    before anything is written, so a run that ends well always leaves valid JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False, default=str)
    json.loads(text)  # well-formed by construction; fail loudly otherwise
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(text + "\n", encoding="utf-8")
    paths[1].write_text(md, encoding="utf-8")
    return paths
