"""The harness's output: the header, the table, the targets, the markdown copy, the chart."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from .cases import Case
from .ceilings import CLEANED_VARS, Ceilings
from .config import CASES, Config
from .env import ENV_VARS, progress, short
from .tables import format_table, markdown_table, write_results

HEADERS = [
    "case",
    "shape",
    "thr",
    "candidate",
    "ms",
    "GFLOP/s",
    "GB/s",
    "% ceiling",
    "peer/fa",
    "target",
    "measured",
    "result",
]
RIGHT = {4, 5, 6, 7, 8, 10}
LEFT = set(range(len(HEADERS))) - RIGHT
N_KEYS = 4  # case, shape, threads, candidate

FOOTNOTES = [
    "ms: median wall time of one call over the repeats (candidates interleaved round-robin).",
    "GFLOP/s: 4*B*H*Nq*Nk*D, counting only the query-key pairs a query sees (half for "
    "causal, the band for a window; NumPy and SDPA+mask do more work than that).",
    "GB/s (decode): bytes of K/V storage read / median time.",
    "% ceiling: GFLOP/s as % of the fp32 GEMM rate, GB/s as % of the read bandwidth, both "
    "measured in this run at the row's thread count.",
    "peer/fa: peer ms / ferroattn ms (> 1: ferroattn faster).  PASS/MISS: the project's target.",
]


def _fmt_ms(ms: float) -> str:
    if ms < 0.1:
        return f"{ms * 1e3:.2f}us"
    return f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def _measured(row: dict[str, Any]) -> str:
    t = row.get("target")
    if not t or t.get("value") is None:
        return ""
    v, unit = t["value"], t.get("unit", "x")
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "%":
        return f"{v:.0f}%"
    if unit == "us":
        return f"{v:.2f} us"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    return f"{v:.3f}"


def table_rows(cases: list[Case]) -> list[list[str]]:
    rows = []
    for case in cases:
        for row in case.rows:
            base = [case.id, row["label"], str(row["threads"]), row["candidate"]]
            if row.get("status") != "ok":
                rows.append([*base, str(row.get("status"))] + [""] * (len(HEADERS) - 5))
                continue
            ceil = []
            if row.get("pct_gemm") is not None:
                ceil.append(f"{row['pct_gemm']:.0f}% gemm")
            if row.get("pct_bw") is not None:
                ceil.append(f"{row['pct_bw']:.0f}% bw")
            t = row.get("target") or {}
            result = t.get("result", "")
            if t.get("note"):
                result += f" ({t['note']})"
            ms = row["median_ms"]
            rows.append(
                [
                    *base,
                    f"{row['per_call_us']:.2f}us/call" if "per_call_us" in row else _fmt_ms(ms),
                    f"{row['gflops']:.1f}" if row.get("gflops") is not None else "",
                    f"{row['gbs']:.1f}" if row.get("gbs") is not None else "",
                    " ".join(ceil),
                    f"{row['peer_over_fa']:.2f}x" if row.get("peer_over_fa") else "",
                    t.get("text", ""),
                    _measured(row),
                    result,
                ]
            )
    return rows


def text_table(rows: list[list[str]]) -> list[str]:
    return format_table(HEADERS, rows, left=LEFT, n_keys=N_KEYS, group=2)


def progress_line(case: Case) -> str:
    """One line for stderr: each sub-case's candidates with ms, peer/fa and PASS/MISS."""
    groups: dict[str, list[str]] = {}
    for row in case.rows:
        parts = groups.setdefault(row["label"], [])
        if row.get("status") != "ok":
            parts.append(f"{row['candidate']} {row['status'][:40]}")
            continue
        s = f"{row['candidate']} {row['median_ms']:.4g} ms"
        if "per_call_us" in row:
            s = f"{row['candidate']} {row['per_call_us']:.2f}us/call"
        if row.get("peer_over_fa"):
            s += f" ({row['peer_over_fa']:.2f}x)"
        if row.get("target"):
            s += f" [{row['target']['result']}]"
        parts.append(s)
    return " | ".join(f"{lab}: " + "; ".join(p) for lab, p in groups.items())


def header_lines(env: dict[str, Any], cfg: Config, ceil: Ceilings) -> list[str]:
    fa = env["ferroattn"]
    lines = [
        f"ferroattn benchmark harness  {env['date']}" + ("  [QUICK]" if cfg.quick else ""),
        f"cpu: {env['cpu']} ({env['logical_cpus']} logical CPUs, load average "
        f"{env['loadavg_at_start']} at start)",
        f"python {env['python']}  numpy {env['numpy']}  {env['platform']}",
        f"ferroattn {fa.get('version')}  isa={fa.get('isa')}  "
        f"cpu_features={' '.join(map(str, fa.get('cpu_features', [])))}",
    ]
    peers = []
    for name in ("torch", "onnxruntime", "onnx", "ml_dtypes", "threadpoolctl"):
        e = env.get(name, {})
        peers.append(
            f"{name} {e['version']}" if e.get("status") == "ok" else f"{name}: {e.get('status')}"
        )
    lines.append("peers: " + "  ".join(peers))
    ev = [f"{k}={v}" for k, v in env["env_vars"].items() if v is not None]
    lines.append("env: " + ("  ".join(ev) if ev else "(none of " + ", ".join(ENV_VARS) + " set)"))
    pools = env["blas_pools"]
    if isinstance(pools, list):
        for p in (p for p in pools if p.get("user_api") == "blas"):
            lines.append(
                f"numpy BLAS in this process: {p.get('internal_api')} {p.get('version')} "
                f"kernel={p.get('architecture')}"
            )
    for t, g in sorted(ceil.gemm.items()):
        if g.get("status") == "ok":
            lines.append(
                f"ceiling fp32 GEMM, {t} thread(s): {g['gflops']:.1f} GFLOP/s (NumPy matmul "
                f"{g['n']}^3, best of {g['runs']}, subprocess without "
                f"{'/'.join(CLEANED_VARS)}; kernel={','.join(g['kernels']) or '?'})"
            )
        else:
            lines.append(f"ceiling fp32 GEMM, {t} thread(s): {g.get('status')}")
    for t, b in sorted(ceil.bw.data.items()):
        lines.append(
            f"ceiling read bandwidth, {t} thread(s): {b['gbs']:.1f} GB/s (NumPy reductions "
            f"over {b['mib']} MiB split over the threads, fastest of {b['runs']})"
        )
    lines.append(
        f"threads={cfg.threads}  repeats={cfg.repeats} (median)  warmup={cfg.warmup}  "
        f"gap={cfg.gap_ms:g}ms  cases={','.join(cfg.cases)}"
    )
    return lines


def target_summary(cases: list[Case]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        for row in case.rows:
            t = row.get("target")
            if t:
                out.append(
                    {
                        "case": case.id,
                        "label": row["label"],
                        "candidate": row["candidate"],
                        "target": t["text"],
                        "value": t["value"],
                        "result": t["result"],
                    }
                )
    return out


def format_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = ["# ferroattn benchmark harness", "", "```", *header, "```", ""]
    lines += markdown_table(HEADERS, rows, left=LEFT)
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines += [f"- {n}" for n in FOOTNOTES]
    lines.append("")
    return "\n".join(lines)


def write_chart(path: Path, cases: list[Case]) -> str | None:
    """ferroattn vs peers per case: peer ms / ferroattn ms, log scale. None if written, else
    why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        why = "not installed" if isinstance(exc, ImportError) else short(exc)
        return f"no chart: matplotlib {why}"
    bars = [
        (f"{r['case']}: {r['label']}", r["candidate"], r["peer_over_fa"])
        for c in cases
        for r in c.rows
        if r.get("peer_over_fa")
    ]
    if not bars:
        return "no chart: no peer was timed"
    groups = list(dict.fromkeys(b[0] for b in bars))
    peers = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.3 * len(bars) + 0.2 * len(groups)))
    ypos, labels, y = [], [], 0.0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seen: set[str] = set()
    for g in groups:
        for gi, peer, ratio in (b for b in bars if b[0] == g):
            color = colors[peers.index(peer) % len(colors)]
            ax.barh(y, ratio, color=color, label=None if peer in seen else peer)
            seen.add(peer)
            ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
            ypos.append(y)
            labels.append(gi if peer == next(b[1] for b in bars if b[0] == g) else "")
            y += 1
        y += 0.6
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("peer time / ferroattn time  (> 1: ferroattn faster)")
    ax.set_title("ferroattn vs peers per case")
    ax.set_xlim(right=ax.get_xlim()[1] * 2.0)  # room for the value labels
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def save(cfg: Config, md: str, payload: dict[str, Any], cases: list[Case]) -> list[Path]:
    """``harness-<date>[-<cases>][-quick].{json,md,png}`` in ``cfg.out_dir``."""
    stem = f"harness-{_dt.date.today().isoformat()}"
    # A run of some cases must not overwrite the day's full run.
    if sorted(cfg.cases) != sorted(CASES):
        stem += "-" + "-".join(cfg.cases)
    stem += "-quick" if cfg.quick else ""
    payload["chart"] = None
    png = cfg.out_dir / f"{stem}.png"
    if cfg.chart:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        why = write_chart(png, cases)
        if why is None:
            payload["chart"] = png.name
        else:
            payload["notes"].append(why)
            md += f"\n- {why}\n"
            progress(why)
    paths = write_results(cfg.out_dir, stem, md, payload)
    return paths + ([png] if payload["chart"] else [])
