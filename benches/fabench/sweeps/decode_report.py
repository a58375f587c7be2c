"""The decode cells' output: the header, % of the bandwidth and the target, the table."""

from __future__ import annotations

from typing import Any

from ..tables import format_table, markdown_table

FA_CACHE = "ferroattn KVCache"
FA_PLAIN = "ferroattn (no cache)"
TARGET_PCT = 80.0  # ferroattn's K/V read rate as % of the measured bandwidth
TARGET_COL = f">={TARGET_PCT:.0f}%"
HEADERS = [
    "Hkv",
    "L",
    "threads",
    "candidate",
    "kv dtype",
    "KV MiB",
    "median ms",
    "min ms",
    "spread",
    "GB/s",
    "% bw",
    "% adj",
    TARGET_COL,
    "in-cache ms",
    "ceiling",
    "torch/fa",
    "ort/fa",
    "rel err",
]
N_KEYS = 5  # columns before the numbers (a status message replaces those)
LEFT = {3, 4, HEADERS.index(TARGET_COL)}

FOOTNOTE = (
    "ms = median wall time of one `attend`/attention call (CPU caches flushed before each "
    "unless the header says flush=0); "
    "KV MiB = bytes of the candidate's K and V storage (int8: plus one float32 scale per "
    "token, head and tensor; ORT: L + 1 tokens); GB/s = those bytes / median time; "
    "% bw = GB/s as a % of the memory-read bandwidth measured in the same run at the same "
    "thread count (the best of its measurements); % adj = the median over the repeats of "
    "each call's GB/s as a % of the read rate of the busy gap right after it (the bandwidth "
    "the machine had at that moment); "
    f"{TARGET_COL} = the project's target for ferroattn rows, against % bw; "
    "in-cache ms = the same call's time estimated from two caches small enough to stay in "
    "the last-level cache (per-token slope × L): its speed when memory is not the limit; "
    "ceiling = the % bw that speed would give (below the target: arithmetic, not memory, "
    "holds the row back on this CPU); "
    "torch/fa and ort/fa = torch float32 (ORT) median ms / this row's median ms "
    "(> 1: ferroattn faster); spread = (max - min) / median; rel err = relative Frobenius "
    "error vs a float64 NumPy reference."
)


def _peer_line(env: dict[str, Any], name: str) -> str:
    e = env.get(name, {})
    return f"{name} {e['version']}" if e.get("status") == "ok" else f"{name}: {e.get('status')}"


def header(env: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    n = cfg.get("flush_threads")
    flush_on = f"{n} thread(s)" if n else "as many threads as the case"
    fa = env["ferroattn"]
    torch = env.get("torch", {})
    lines = [
        f"ferroattn decode benchmark  {env['date']}" + ("  [QUICK]" if cfg["quick"] else ""),
        f"cpu: {env['cpu']}  ({env['logical_cpus']} logical CPUs, L3 {env['l3_cache']}, "
        f"load average {env['loadavg_at_start']} at start)",
        f"python {env['python']}  numpy {env['numpy']}  {env['platform']}",
        (
            f"ferroattn {fa.get('version')}  isa={fa.get('isa')}  "
            f"KVCache={'yes' if fa.get('kv_cache') else 'MISSING'}  "
            f"prefetch={fa.get('stream_prefetch_bytes')} B ahead"
            + (" (one-row streams too)" if fa.get("one_row_stream_prefetch") else "")
            + (f"  error={fa['error']}" if "error" in fa else "")
        ),
        (
            _peer_line(env, "torch")
            + (f" (cpu capability {torch['cpu_capability']})" if "cpu_capability" in torch else "")
            + "  "
            + _peer_line(env, "onnxruntime")
            + "  "
            + _peer_line(env, "onnx")
        ),
        (
            f"shape: B=1 H={cfg['heads']} Hkv={','.join(map(str, cfg['kv_heads']))} "
            f"L={','.join(map(str, cfg['lengths']))} D={cfg['dim']}, one query token; "
            f"cache dtypes {','.join(cfg['dtypes'])}"
        ),
        (
            f"repeats={cfg['repeats']} (median)  warmup={cfg['warmup']}  "
            f"gap={cfg['gap_ms']:g} ms {cfg['gap_mode']}  "
            f"cache flush={cfg['flush_mib']} MiB before each call on {flush_on}  "
            f"seed={cfg['seed']}"
        ),
    ]
    for t, bw in sorted(cfg.get("bandwidth", {}).items()):
        per = "  ".join(f"{k} {v:.1f}" for k, v in bw["kernels"].items())
        seen = bw["measurements_gbs"]
        lines.append(
            f"memory-read bandwidth at {t} thread(s): {bw['gbs']:.1f} GB/s, the best of "
            f"{len(seen)} measurement(s) ({min(seen):.1f} to {max(seen):.1f} GB/s; each the "
            f"fastest of {bw['runs']} reads of {bw['mib']} MiB per kernel; {per})"
        )
    set_vars = {k: v for k, v in env["env_vars"].items() if v is not None}
    if set_vars:
        lines.append("env: " + "  ".join(f"{k}={v}" for k, v in set_vars.items()))
    return lines


def done(cell: dict[str, Any]) -> str:
    """The progress line's times of a cell."""
    return "  ".join(
        f"{c['kind']} {c['dtype']} {c['median_ms']:.2f} ms"
        for c in cell["candidates"].values()
        if c.get("status") == "ok"
    )


def apply_bandwidth(cell: dict[str, Any], bandwidth: float) -> None:
    """% of the measured bandwidth, and PASS/MISS of the target for ferroattn rows."""
    cell["bandwidth_gbs"] = bandwidth
    for r in cell["candidates"].values():
        if r.get("status") != "ok":
            continue
        gbs = r.get("gbs")
        pct = 100.0 * gbs / bandwidth if gbs is not None and bandwidth > 0 else None
        r["pct_bandwidth"] = pct
        best = r["kv_bytes"] / (r["min_ms"] * 1e-3) / 1e9 if r["min_ms"] > 0 else None
        r["pct_bandwidth_fastest"] = 100.0 * best / bandwidth if best and bandwidth > 0 else None
        fast = r.get("in_cache_ms")
        r["ceiling_pct"] = (
            100.0 * r["kv_bytes"] / (fast * 1e-3) / 1e9 / bandwidth
            if fast and bandwidth > 0
            else None
        )
        r["target"] = None
        if r["kind"] in (FA_CACHE, FA_PLAIN) and pct is not None:
            r["target"] = "PASS" if pct >= TARGET_PCT else "MISS"


def _opt(x: float | None, fmt: str, suffix: str = "") -> str:
    return "" if x is None else format(x, fmt) + suffix


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for cell in results:
        for r in cell["candidates"].values():
            base = [str(cell["Hkv"]), str(cell["L"]), str(cell["threads"]), r["kind"], r["dtype"]]
            if r.get("status") != "ok":
                rows.append([*base, str(r.get("status"))] + [""] * (len(HEADERS) - N_KEYS - 1))
                continue
            rows.append(
                [
                    *base,
                    f"{r['kv_bytes'] / 2**20:.1f}",
                    f"{r['median_ms']:.3f}",
                    f"{r['min_ms']:.3f}",
                    f"{100 * r['spread']:.0f}%" if r.get("spread") is not None else "",
                    _opt(r.get("gbs"), ".1f"),
                    _opt(r.get("pct_bandwidth"), ".0f"),
                    _opt(r.get("pct_adjacent"), ".0f"),
                    r.get("target") or "",
                    _opt(r.get("in_cache_ms"), ".3f"),
                    _opt(r.get("ceiling_pct") or None, ".0f", "%"),
                    _opt(r.get("torch_over_fa") or None, ".2f", "x"),
                    _opt(r.get("ort_over_fa") or None, ".2f", "x"),
                    f"{r['rel_err']:.1e}",
                ]
            )
    return rows


def text_table(rows: list[list[str]]) -> list[str]:
    return format_table(HEADERS, rows, left=LEFT, n_keys=N_KEYS, group=3)


def markdown(header_lines: list[str], rows: list[list[str]]) -> str:
    lines = ["# ferroattn decode benchmark", "", "```", *header_lines, "```", ""]
    lines += markdown_table(HEADERS, rows, left=LEFT)
    lines += ["", FOOTNOTE, ""]
    return "\n".join(lines)


def footnotes(flushed: bool) -> list[str]:
    what = "CPU caches flushed before each call" if flushed else "caches NOT flushed"
    return [
        f"ms: median of the repeats, {what}.",
        "GB/s: bytes of the K/V storage read / median; % bw: of the bandwidth in the header.",
        "torch/fa, ort/fa: peer float32 ms / ferroattn ms (> 1 means ferroattn is faster).",
        "spread: (max - min) / median of the repeats; large = noisy machine.",
    ]


def target_summary(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for n in sorted({c["threads"] for c in results}):
        rows = [
            r
            for c in results
            if c["threads"] == n
            for r in c["candidates"].values()
            if r["kind"] == FA_CACHE and r.get("status") == "ok"
        ]
        if not rows:
            out.append(f"target at {n} thread(s): no ferroattn KVCache rows ran")
            continue
        passed = sum(r["target"] == "PASS" for r in rows)
        worst = min(r["pct_bandwidth"] for r in rows)
        verdict = "PASS" if passed == len(rows) else "MISS"
        out.append(
            f"target >= {TARGET_PCT:.0f}% of bandwidth at {n} thread(s), ferroattn KVCache: "
            f"{verdict} ({passed}/{len(rows)} rows pass, worst {worst:.0f}%)"
        )
        adj = [r["pct_adjacent"] for r in rows if r.get("pct_adjacent") is not None]
        if adj:
            out.append(
                f"  against the bandwidth read right after each call (% adj): "
                f"{sum(a >= TARGET_PCT for a in adj)}/{len(adj)} rows >= {TARGET_PCT:.0f}%, "
                f"worst {min(adj):.0f}%"
            )
        capped = [
            r for r in rows if r["target"] == "MISS" and (r.get("ceiling_pct") or 1e9) < TARGET_PCT
        ]
        if capped:
            ceilings = ", ".join(f"{r['ceiling_pct']:.0f}%" for r in capped)
            out.append(
                f"  {len(capped)} of the misses stay below the target even in cache (ceiling "
                f"{ceilings}): arithmetic, not memory, bounds them on this CPU"
            )
    return out
