#!/usr/bin/env bash
# The whole ferroattn test suite, from a fresh clone:
#   builds and installs the package (with its test extras) into a virtualenv (.venv, unless one is
#   already active), runs the lints (cargo fmt/clippy, ruff, mypy), then the Rust tests and the
#   Python suite once per SIMD path this CPU can run (FERROATTN_ISA), and the benchmark's smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
PY=python

echo "== install"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q '.[dev]' ${FERROATTN_EXTRA_PIP:-}

echo "== lint"
cargo fmt --all --check
cargo clippy --locked --all-targets --release -- -D warnings
$PY -m ruff check python tests benches
$PY -m ruff format --check python tests benches
$PY -m mypy python/ferroattn benches  # also checks the calls into the binding against its .pyi stub

# Run from outside the source tree so the installed package (with its compiled module) is used.
echo "== benchmark smoke runs (they run and write well-formed JSON; no timing asserts; seconds)"
$PY benches/harness.py --quick --no-chart
$PY benches/bench_prefill.py --quick
$PY benches/bench_decode.py --quick
$PY -m ferroattn bench --quick

isas=$(cd /tmp && $PY -c "import ferroattn; print(' '.join(ferroattn.info()['isa_available']))")
echo "== SIMD paths on this CPU: $isas"
for isa in $isas; do
    echo "== Rust tests, FERROATTN_ISA=$isa"
    FERROATTN_ISA=$isa cargo test --locked --release -p ferroattn-core
    echo "== Python tests, FERROATTN_ISA=$isa"
    FERROATTN_ISA=$isa $PY -m pytest -q -p no:cacheprovider --import-mode=importlib --rootdir=. tests
done
# AVX-512 with VNNI gives int8 keys integer dot products; run the cache tests once without them,
# so the float int8 path of AVX-512 CPUs lacking VNNI is exercised here too.
if [[ " $isas " == *" avx512 "* ]] && grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null; then
    echo "== Python cache tests, FERROATTN_ISA=avx512 FERROATTN_VNNI=0"
    FERROATTN_ISA=avx512 FERROATTN_VNNI=0 $PY -m pytest -q -p no:cacheprovider --import-mode=importlib \
        --rootdir=. tests/test_kv_cache.py
fi
