"""Command-line interface: ``ferroattn info``, ``ferroattn demo`` and ``ferroattn bench``.

Run as ``ferroattn ...`` (console script) or ``python -m ferroattn ...``.
Errors are reported as one line on stderr with exit status 2, never a traceback.
torch is optional and imported lazily, by ``info`` and ``bench`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import warnings
from typing import Any

import numpy as np

PROG = "ferroattn"
WIDTH = 100  # every line printed by this module fits in WIDTH columns


class CLIError(Exception):
    """An error with a message meant for the user (exit status 2)."""


def _fa() -> Any:
    """The ferroattn package (imported here, not at the top, to avoid a cycle)."""
    import ferroattn

    return ferroattn


# --------------------------------------------------------------------------- info


def _torch_info() -> dict[str, Any]:
    """What torch reports about itself, importing it lazily; never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch  # lazy on purpose: torch is optional
    except Exception as exc:  # noqa: BLE001 (ImportError, or a broken install)
        missing = isinstance(exc, ImportError)
        return {
            "installed": False,
            "status": "not installed" if missing else f"import failed: {exc}",
        }
    result: dict[str, Any] = {
        "installed": True,
        "version": str(getattr(torch, "__version__", "unknown")),
    }
    try:
        result["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 (older torch)
        result["cpu_capability"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cuda = bool(torch.cuda.is_available())
            result["cuda_available"] = cuda
            result["cuda_devices"] = (
                [str(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
                if cuda
                else []
            )
    except Exception as exc:  # noqa: BLE001 (reported as cuda_error)
        result["cuda_available"] = False
        result["cuda_devices"] = []
        result["cuda_error"] = str(exc)
    return result


def _collect_info() -> dict[str, Any]:
    try:
        data = dict(_fa().info())
    except Exception as exc:
        raise CLIError(f"_fa().info() failed: {exc}") from exc
    data.setdefault("version", getattr(_fa(), "__version__", "unknown"))
    data["python"] = platform.python_version()
    data["numpy"] = np.__version__
    data["platform"] = platform.platform()
    data["cpu_count"] = os.cpu_count()
    data["torch"] = _torch_info()
    return data


def _wrap_field(label: str, value: str) -> list[str]:
    prefix = f"  {label:<18} : "
    lines = textwrap.wrap(
        value,
        width=WIDTH,
        initial_indent=prefix,
        subsequent_indent=" " * len(prefix),
        break_on_hyphens=False,
    )
    return lines or [prefix.rstrip()]


def _as_text(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "(none)"
    return str(value)


def _prefetch(data: dict[str, Any]) -> str | None:
    ahead = data.get("stream_prefetch_bytes")
    if ahead is None:
        return None
    one_row = " (one-row streams too)" if data.get("one_row_stream_prefetch") else ""
    return f"{ahead} B of each K/V stream ahead{one_row}"


def _format_info(data: dict[str, Any]) -> str:
    known = (
        "version",
        "isa",
        "isa_available",
        "cpu_features",
        "num_threads",
        "stream_prefetch_bytes",
        "one_row_stream_prefetch",
        "python",
        "numpy",
        "platform",
        "cpu_count",
        "torch",
    )
    lines = [f"ferroattn {data.get('version', 'unknown')}"]
    rows = [
        ("SIMD path in use", data.get("isa")),
        ("SIMD paths", data.get("isa_available")),
        ("CPU features", data.get("cpu_features")),
        ("threads", data.get("num_threads")),
        ("decode prefetch", _prefetch(data)),
    ]
    rows += [(k, v) for k, v in data.items() if k not in known]  # future keys
    rows += [
        ("logical CPUs", data.get("cpu_count")),
        ("python", data.get("python")),
        ("numpy", data.get("numpy")),
        ("platform", data.get("platform")),
    ]
    torch = data["torch"]
    if torch.get("installed"):
        cap = torch.get("cpu_capability")
        rows.append(("torch", torch["version"] + (f" (CPU: {cap})" if cap else "")))
        if torch.get("cuda_available"):
            gpu = "yes: " + ", ".join(torch.get("cuda_devices") or ["(unnamed)"])
        elif torch.get("cuda_error"):
            gpu = f"no ({torch['cuda_error']})"
        else:
            gpu = "no"
        rows.append(("CUDA GPU (torch)", gpu))
    else:
        rows.append(("torch", torch.get("status", "not installed")))
        rows.append(("CUDA GPU (torch)", "unknown (torch not available)"))
    for label, value in rows:
        lines += _wrap_field(label, _as_text(value))
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    data = _collect_info()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        print(_format_info(data))
    return 0


# --------------------------------------------------------------------------- demo
#
# A textbook self-attention example with hand-designed, interpretable numbers.
# Each token embedding is a vector of named features (part of speech, semantics,
# which noun phrase it belongs to) plus a little seeded noise.  The query and key
# projections are written by hand so that each dimension of the head means
# something: a query dimension "looks for" a key property.
#
#   head dim   key: token HAS ...          query: token LOOKS FOR it if ...
#   noun?      is a noun                   determiner, adjective, preposition
#   verb?      is a verb                   noun (a noun looks for its verb)
#   animal?    is an animal                verb (a verb looks for its actors)
#   phrase 1   in "The quick brown fox"    in that phrase (the verb weakly too:
#                                          it prefers its subject)
#   phrase 2   in "over the lazy dog"      in that phrase
#
# V is the identity on the embedding features, so each output row is the
# attention-weighted mixture of the features of the tokens it attends to (e.g.
# "quick" picks up noun/animal features from "fox").

SENTENCE = "The quick brown fox jumps over the lazy dog"

FEATURES = (
    "det",
    "adj",
    "noun",
    "verb",
    "prep",
    "animal",
    "motion",
    "color",
    "phr1",
    "phr2",
)

# token -> (part of speech, features that are 1)
LEXICON: dict[str, tuple[str, tuple[str, ...]]] = {
    "The": ("det", ("det", "phr1")),
    "quick": ("adj", ("adj", "motion", "phr1")),
    "brown": ("adj", ("adj", "color", "phr1")),
    "fox": ("noun", ("noun", "animal", "phr1")),
    "jumps": ("verb", ("verb", "motion")),
    "over": ("prep", ("prep", "phr2")),
    "the": ("det", ("det", "phr2")),
    "lazy": ("adj", ("adj", "phr2")),
    "dog": ("noun", ("noun", "animal", "phr2")),
}

HEAD_DIMS = ("noun?", "verb?", "animal?", "phrase1", "phrase2")
KEY_MAP = {"noun?": "noun", "verb?": "verb", "animal?": "animal"}
KEY_MAP.update({"phrase1": "phr1", "phrase2": "phr2"})
# (embedding feature, head dim, weight) of the query projection
QUERY_MAP = (
    ("det", "noun?", 1.0),
    ("adj", "noun?", 1.0),
    ("prep", "noun?", 1.0),
    ("noun", "verb?", 2.0),
    ("verb", "animal?", 1.5),
    ("verb", "phrase1", 1.0),
    ("phr1", "phrase1", 1.0),
    ("phr2", "phrase2", 1.0),
)
QUERY_GAIN = 2.2  # sharpness: logits are QUERY_GAIN * (match count) after scaling
NOISE = 0.05  # std of the seeded noise on embeddings and projections


def build_demo(seed: int) -> dict[str, Any]:
    """Tokens, embeddings and Q/K/V of the demo (float32, deterministic)."""
    if seed < 0:
        raise CLIError(f"--seed must be >= 0, got {seed}")
    tokens = SENTENCE.split()
    fidx = {f: i for i, f in enumerate(FEATURES)}
    hidx = {h: i for i, h in enumerate(HEAD_DIMS)}
    d_model, d_head = len(FEATURES), len(HEAD_DIMS)
    rng = np.random.default_rng(seed)

    emb = np.zeros((len(tokens), d_model))
    for i, tok in enumerate(tokens):
        for feat in LEXICON[tok][1]:
            emb[i, fidx[feat]] = 1.0
    emb += rng.normal(0.0, NOISE, emb.shape)

    w_k = np.zeros((d_model, d_head))
    for head_dim, feat in KEY_MAP.items():
        w_k[fidx[feat], hidx[head_dim]] = 1.0
    w_q = np.zeros((d_model, d_head))
    for feat, head_dim, weight in QUERY_MAP:
        w_q[fidx[feat], hidx[head_dim]] += weight
    # Counter the default 1/sqrt(d) scaling, then sharpen by QUERY_GAIN.
    w_q *= QUERY_GAIN * np.sqrt(d_head)
    w_q += rng.normal(0.0, NOISE, w_q.shape)
    w_k += rng.normal(0.0, NOISE, w_k.shape)
    w_v = np.eye(d_model)

    return {
        "tokens": tokens,
        "pos": [LEXICON[t][0] for t in tokens],
        "emb": emb.astype(np.float32),
        "q": np.ascontiguousarray(emb @ w_q, dtype=np.float32),
        "k": np.ascontiguousarray(emb @ w_k, dtype=np.float32),
        "v": np.ascontiguousarray(emb @ w_v, dtype=np.float32),
    }


def _table(row_names: list[str], col_names: list[str], cells: list[list[str]]) -> list[str]:
    first = max(len(n) for n in row_names) + 2
    width = max(6, max(len(n) for n in col_names) + 1, *(len(c) + 1 for r in cells for c in r))
    lines = [" " * first + "".join(f"{n:>{width}}" for n in col_names)]
    for name, row in zip(row_names, cells, strict=True):
        lines.append(f"{name:<{first}}" + "".join(f"{c:>{width}}" for c in row))
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    if args.png is not None:
        folder = os.path.dirname(os.path.abspath(args.png))
        if not os.path.isdir(folder):
            raise CLIError(f"--png: the folder {folder!r} does not exist")
    d = build_demo(args.seed)
    tokens, q, k, v = d["tokens"], d["q"], d["k"], d["v"]
    n = len(tokens)
    try:
        weights = np.asarray(_fa().attention_weights(q, k, causal=args.causal))
        out = np.asarray(_fa().attention(q, k, v, causal=args.causal))
    except Exception as exc:
        raise CLIError(f"ferroattn call failed: {type(exc).__name__}: {exc}") from exc
    if weights.shape != (n, n) or out.shape != v.shape:
        raise CLIError(f"unexpected result shapes: weights {weights.shape}, output {out.shape}")
    weights = weights.astype(np.float64)
    out = out.astype(np.float64)

    mode = "causal" if args.causal else "bidirectional"
    p = print
    p(f'Self-attention demo: "{SENTENCE}"  ({mode}, seed {args.seed})')
    p()
    p("tokens: " + "  ".join(f"{i}:{t}" for i, t in enumerate(tokens)))
    p(f"embedding features ({len(FEATURES)}): " + " ".join(FEATURES))
    p(f"head dimensions ({len(HEAD_DIMS)}): " + " ".join(HEAD_DIMS))
    p(f"shapes (float32): x {d['emb'].shape}  q {q.shape}  k {k.shape}  v {v.shape}")
    p(
        f"  -> weights {weights.shape}  output {out.shape}  "
        f"(scale = 1/sqrt({q.shape[1]}), the default)"
    )
    p()
    p("Attention weights (row = query token, column = key token; each row sums to 1):")
    if args.causal:
        p("('-' = masked: a token cannot attend to later tokens, so a determiner or an")
        p("adjective cannot see the noun that follows it)")
    masked = np.triu(np.ones((n, n), dtype=bool), 1) if args.causal else None
    cells = [
        ["-" if masked is not None and masked[i, j] else f"{weights[i, j]:.2f}" for j in range(n)]
        for i in range(n)
    ]
    for line in _table(tokens, tokens, cells):
        p(line)
    p()
    p("Strongest attention per token (the token itself excluded):")
    name_w = max(len(t) for t in tokens)
    pos_w = max(len(s) for s in d["pos"]) + 2
    for i, tok in enumerate(tokens):
        row = weights[i].copy()
        row[i] = -np.inf
        if masked is not None:
            row[masked[i]] = -np.inf
        left = f"  {tok:>{name_w}} {'(' + d['pos'][i] + ')':<{pos_w}} -> "
        if not np.isfinite(row).any():
            p(left + f"(nothing before it; itself {weights[i, i]:.2f})")
            continue
        j = int(np.argmax(row))
        p(
            left
            + f"{tokens[j]:<{name_w}} {'(' + d['pos'][j] + ')':<{pos_w}} "
            + f"{weights[i, j]:.2f}   (itself {weights[i, i]:.2f})"
        )
    p()
    p("Output = weights @ v, v = embedding features (so each row shows what the token")
    p("gathered from the tokens it attends to):")
    cells = [[f"{out[i, j]:.2f}" for j in range(out.shape[1])] for i in range(n)]
    for line in _table(tokens, list(FEATURES), cells):
        p(line)
    err = float(np.max(np.abs(out - weights @ v.astype(np.float64))))
    p()
    p(f"check: max |attention(q, k, v) - attention_weights(q, k) @ v| = {err:.1e}")
    if args.png is not None:
        p()
        _demo_picture(args.png, weights, tokens, f'"{SENTENCE}" ({mode}, seed {args.seed})')
    return 0


def _stdout_can_encode(text: str) -> bool:
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _demo_picture(path: str, weights: np.ndarray, tokens: list[str], title: str) -> None:
    """``demo --png``: save the heatmap, or draw it in the terminal without matplotlib."""
    from .plot import UNICODE_SHADES, plot_attention, render_attention

    try:
        plot_attention(weights, tokens, path=path, title=f"Self-attention weights\n{title}")
    except ImportError:
        print("No PNG written: matplotlib is not installed (pip install ferroattn[plot]).")
        print("Terminal rendering instead (row = query token, column = key token):")
        print(render_attention(weights, tokens, ascii=not _stdout_can_encode(UNICODE_SHADES)))
        return
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write the PNG {path!r}: {exc}") from exc
    print(f"Heatmap of the attention weights written to {os.path.abspath(path)}")


# --------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # same as argparse, exit status 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="ferroattn: Rust-accelerated attention for NumPy on the CPU.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {getattr(_fa(), '__version__', 'unknown')}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_info = sub.add_parser(
        "info",
        help="show version, CPU features, SIMD paths, threads and torch status",
        description="Show the ferroattn version, CPU features found, the SIMD path "
        "in use and those available, the thread count, and whether torch (and a "
        "CUDA GPU through it) is available.",
    )
    p_info.add_argument("--json", action="store_true", help="print JSON instead")
    p_info.set_defaults(func=cmd_info)

    p_demo = sub.add_parser(
        "demo",
        help='self-attention on "The quick brown fox jumps over the lazy dog"',
        description="Run self-attention on a 9-token sentence with hand-designed "
        "embeddings and projections, and print the attention matrix.",
    )
    p_demo.add_argument("--causal", action="store_true", help="mask future tokens (decoder style)")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the small noise (default 0)")
    p_demo.add_argument(
        "--png",
        metavar="PATH",
        help="also save a heatmap of the attention weights there (needs matplotlib: "
        "pip install ferroattn[plot]; without it a terminal rendering is printed)",
    )
    p_demo.set_defaults(func=cmd_demo)

    p_bench = sub.add_parser(
        "bench",
        help="check and time attention on this machine (a few seconds)",
        description="Check ferroattn on this machine, then time it: a prefill (B=1 H=16 "
        "N=2048 D=64), the same prefill causal, and a decode step through KVCache (32 query "
        "over 8 KV heads, D=128, 16384 cached tokens). Each result is compared with a float64 "
        "NumPy reference first; torch's scaled_dot_product_attention runs side by side when "
        "torch is installed. Prints ms, GFLOP/s or GB/s, and torch/ferroattn. The full "
        "comparison with other libraries is benches/harness.py in the source tree.",
    )
    from ferroattn import selfcheck  # numpy only; torch is imported when it runs

    selfcheck.add_arguments(p_bench)
    p_bench.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from ferroattn import selfcheck

    return selfcheck.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 (one clear line, no traceback)
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
