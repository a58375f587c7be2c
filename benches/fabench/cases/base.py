"""What every case of the harness shares: its rows, the project's targets, the run context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ceilings import Ceilings
from ..config import CASE_TITLES, Config
from ..env import Peers
from ..timing import FA, Cand, check_and_time


@dataclass
class Run:
    """What a case needs: ferroattn, the peers, the options, the machine's ceilings."""

    fa: Any
    peers: Peers
    cfg: Config
    ceil: Ceilings

    def time(
        self, cands: list[Cand], refs: dict[str, np.ndarray] | None = None, **kw: Any
    ) -> tuple[dict[str, dict[str, Any]], bool]:
        """Checks and times ``cands`` with the run's repeats, warm-up and gap."""
        cfg = self.cfg
        refs = {} if refs is None else refs
        return check_and_time(
            cands, refs, repeats=cfg.repeats, warmup=cfg.warmup, gap_ms=cfg.gap_ms, **kw
        )


@dataclass
class Case:
    """One case's rows: each row a candidate of one sub-case (label)."""

    id: str
    title: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accuracy_ok: bool = True

    def __post_init__(self) -> None:
        self.title = self.title or CASE_TITLES[self.id]

    def add(
        self,
        label: str,
        name: str,
        r: dict[str, Any],
        *,
        threads: int,
        flops: float | None = None,
        nbytes: float | None = None,
        fa_ms: float | None = None,
    ) -> dict[str, Any]:
        """A row from a candidate's results; GFLOP/s from ``flops``, GB/s from ``nbytes``,
        peer/fa from ferroattn's median ``fa_ms``."""
        row: dict[str, Any] = {"case": self.id, "label": label, "candidate": name}
        row["threads"] = threads
        row.update(r)
        med = r.get("median_ms")
        if r.get("status") == "ok" and med:
            if flops is not None:
                row["flops"] = flops
                row["gflops"] = flops / (med * 1e-3) / 1e9
            if nbytes is not None:
                row["bytes"] = nbytes
                row["gbs"] = nbytes / (med * 1e-3) / 1e9
            if fa_ms and not name.startswith(FA):  # peers only (fa variants: see targets)
                row["peer_over_fa"] = med / fa_ms
        self.rows.append(row)
        return row

    def add_all(
        self, label: str, cands: list[Cand], res: dict[str, dict[str, Any]], **kw: Any
    ) -> dict[str, dict[str, Any]]:
        """:meth:`add` for each candidate, in order; the rows by candidate name."""
        return {c.name: self.add(label, c.name, res[c.name], **kw) for c in cands}


def target(
    row: dict[str, Any], text: str, value: float | None, ok: bool | None, unit: str = "x"
) -> None:
    """Attaches a project target to a row: ``value`` (in ``unit``: "x", "%", "us", "MiB" or ""
    for a plain ratio) is what is compared; ``ok`` None = n/a."""
    if row.get("status") != "ok" or value is None or ok is None:
        result = "n/a"
    else:
        result = "PASS" if ok else "MISS"
    row["target"] = {"text": text, "value": value, "unit": unit, "result": result}


def ratio_target(row: dict[str, Any], at_least: float, what: str) -> None:
    """The target "peer ms / ferroattn ms >= ``at_least``" on a peer's row."""
    ratio = row.get("peer_over_fa")
    target(row, f"{what} >= {at_least:g}x", ratio, (ratio or 0) >= at_least)


def share_ceilings(case: Case, ceil: Ceilings) -> None:
    """Each row's GFLOP/s as % of the GEMM rate, GB/s as % of the read bandwidth."""
    for row in case.rows:
        if row.get("gflops") is not None:
            g = ceil.gemm_gflops(row["threads"])
            if g:
                row["pct_gemm"] = 100.0 * row["gflops"] / g
        if row.get("gbs") is not None:
            row["pct_bw"] = 100.0 * row["gbs"] / ceil.bandwidth_gbs(row["threads"])


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Standard normal float32 of ``shape``."""
    return rng.standard_normal(shape, dtype=np.float32)
