"""The full benchmark harness (issue "C"): a thin wrapper around ``ferroattn.bench``.

    python benches/harness.py                    # every case, results in benches/results/
    python benches/harness.py --quick            # smoke test (CI): tiny shapes, seconds
    python benches/harness.py --cases prefill,decode --threads 2 --repeats 9

Same options as ``ferroattn bench``; see benches/README.md.  Results go to this folder's
``results/`` whatever the current directory, unless ``--out-dir`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    try:
        from ferroattn import bench
    except Exception as exc:  # noqa: BLE001 (any failure of the import is reported)
        print(f"harness: error: cannot import ferroattn.bench: {exc}", file=sys.stderr)
        return 2
    parser = bench.build_parser()
    parser.set_defaults(out_dir=RESULTS)
    args = parser.parse_args(argv)
    return bench.run_args(args)


if __name__ == "__main__":
    sys.exit(main())
