#!/usr/bin/env bash
# The whole ferroattn test suite, from a fresh clone:
#   builds and installs the package (with its test extras) into a virtualenv (.venv, unless one is
#   already active), runs the lints (cargo fmt/clippy, ruff, mypy) and the benchmark's smoke mode,
#   then the Rust tests and the kernel-facing Python tests once per SIMD path this CPU can run
#   (FERROATTN_ISA), and the rest of the Python suite once. Each step ends with a line giving its
#   wall time and the CPU time its processes used (a slow step or a busy machine: compare the two).
set -euo pipefail
cd "$(dirname "$0")/.."

# --- step timing -------------------------------------------------------------------------------
ticks_per_s=$(getconf CLK_TCK 2>/dev/null || echo 100)
child_cpu_ticks() {  # user + system time of the finished child processes of this script
    local -a stat=(0)
    [[ -r /proc/$$/stat ]] && read -r -a stat </proc/$$/stat
    echo $(( ${stat[15]:-0} + ${stat[16]:-0} ))
}
suite_t0=$(date +%s)
step_name="" step_t0=$suite_t0 step_c0=$(child_cpu_ticks)
# step NAME [HEADER]: ends the step before it with its timing line and starts NAME, printing
# "== HEADER" (NAME when not given; nothing when HEADER is "-").
step() {
    local now cpu
    now=$(date +%s) cpu=$(child_cpu_ticks)
    if [[ -n $step_name ]]; then
        echo "-- $step_name: $(( now - step_t0 )) s (cpu $(( (cpu - step_c0) / ticks_per_s )) s)"
    fi
    step_name=$1 step_t0=$now step_c0=$cpu
    if [[ ${2:-} != - && -n $1 ]]; then echo "== ${2:-$1}"; fi
}

# --- Rust test build, in the background ----------------------------------------------------------
# The Rust tests use the `ci` profile (Cargo.toml: release without fat LTO, which only the shipped
# extension needs), built once: FERROATTN_ISA is read at run time, so the same binaries serve every
# SIMD path. They build while pip builds the extension, whose one-codegen-unit compile and fat-LTO
# link keep one core busy and leave the other to this build.
mkdir -p target
rust_log=target/ci-rust-tests-build.log
cargo test --locked --profile ci -p ferroattn-core --no-run >"$rust_log" 2>&1 &
rust_build=$!
trap 'kill "$rust_build" 2>/dev/null || true' EXIT  # an early failure stops the build too

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
PY=python

step "install"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q '.[dev]' ${FERROATTN_EXTRA_PIP:-}

step "lint"
cargo fmt --all --check
cargo clippy --locked --all-targets --profile ci -- -D warnings
$PY -m ruff check python tests benches
$PY -m ruff format --check python tests benches
$PY -m mypy python/ferroattn benches  # also checks the calls into the binding against its .pyi stub

step "benchmark smoke runs" -
# Run from outside the source tree so the installed package (with its compiled module) is used.
echo "== benchmark smoke runs (the harnesses run and write well-formed JSON; no timing asserts)"
$PY benches/harness.py --quick --no-chart
$PY benches/bench_prefill.py --quick
$PY benches/bench_decode.py --quick

step "Rust test build (running since the start; its CPU time counts here)"
rust_rc=0
wait "$rust_build" || rust_rc=$?
trap - EXIT
cat "$rust_log"
if (( rust_rc != 0 )); then exit "$rust_rc"; fi

isas=$(cd /tmp && $PY -c "import ferroattn; print(' '.join(ferroattn.info()['isa_available']))")
echo "== SIMD paths on this CPU: $isas"
pytest=("$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib --rootdir=. --durations=15)
# Per SIMD path: every Rust test, and the Python tests marked `kernel` (attention, variants, varlen,
# weights, KV cache, linear attention, ISA choice), which together reach every kernel family
# (prefill tiles, split-K decode, weights, varlen, int8/f16/bf16 caches, linear attention, each
# extra score term) in every dtype.
for isa in $isas; do
    step "Rust tests, FERROATTN_ISA=$isa"
    FERROATTN_ISA=$isa cargo test --locked --profile ci -p ferroattn-core
    step "Python kernel tests, FERROATTN_ISA=$isa"
    FERROATTN_ISA=$isa "${pytest[@]}" -m kernel tests
done
# Once, on the default (best) path: what sits above the kernels or beside them. Layers, torch and
# Hugging Face dispatch, rope, merge, threads, errors, info, the CLI and plots call the same kernel
# entry points the marked tests cover on every path, or none at all (NumPy code, argument checks).
step "Python tests of everything else, once, on the default path"
env -u FERROATTN_ISA "${pytest[@]}" -m "not kernel" tests
# AVX-512 with VNNI gives int8 keys integer dot products; run the cache tests once without them,
# so the float int8 path of AVX-512 CPUs lacking VNNI is exercised here too.
if [[ " $isas " == *" avx512 "* ]] && grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null; then
    step "Python cache tests, FERROATTN_ISA=avx512 FERROATTN_VNNI=0"
    FERROATTN_ISA=avx512 FERROATTN_VNNI=0 "${pytest[@]}" tests/test_kv_cache.py
fi
step ""
echo "== all passed in $(( $(date +%s) - suite_t0 )) s"
