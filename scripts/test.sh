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
child_cpu_ticks() {  # [PID]: user + system time of the finished children of PID (this script)
    local -a stat=(0)
    [[ -r /proc/${1:-$$}/stat ]] && read -r -a stat <"/proc/${1:-$$}/stat"
    echo $(( ${stat[15]:-0} + ${stat[16]:-0} ))
}
suite_t0=$(date +%s)
step_name="" step_t0=$suite_t0 step_c0=$(child_cpu_ticks)
# step NAME [HEADER]: ends the step before it with its timing line and starts NAME, printing
# "== HEADER" (NAME when not given; nothing when HEADER is "-"). A background job's CPU time is
# counted in the step during which it ends; its own line gives it too.
step() {
    local now cpu
    now=$(date +%s) cpu=$(child_cpu_ticks)
    if [[ -n $step_name ]]; then
        echo "-- $step_name: $(( now - step_t0 )) s (cpu $(( (cpu - step_c0) / ticks_per_s )) s)"
    fi
    step_name=$1 step_t0=$now step_c0=$cpu
    if [[ ${2:-} != - && -n $1 ]]; then echo "== ${2:-$1}"; fi
}

# --- background jobs ---------------------------------------------------------------------------
# The two slow builds run beside other work: `in_background NAME LOG CMD...` runs CMD with its
# output (and a closing timing line for NAME) going to LOG and sets bg_pid; `await PID LOG` waits
# for it, prints LOG and fails if CMD did. An early exit of this script stops both jobs.
bg_pids=""
trap 'for p in $bg_pids; do kill "$p" 2>/dev/null || true; done' EXIT
in_background() {
    local name=$1 log=$2
    shift 2
    (
        t0=$(date +%s) me=${BASHPID:-}
        "$@" &
        job=$!
        trap 'kill "$job" 2>/dev/null; exit 143' TERM
        rc=0
        wait "$job" || rc=$?
        cpu=$(( $(child_cpu_ticks "$me") / ticks_per_s ))
        echo "-- $name (in the background): $(( $(date +%s) - t0 )) s (cpu $cpu s)"
        exit "$rc"
    ) >"$log" 2>&1 &
    bg_pid=$!
    bg_pids="$bg_pids $bg_pid"
}
await() {
    local rc=0
    wait "$1" || rc=$?
    bg_pids=${bg_pids/ $1/}
    cat "$2"
    return "$rc"
}
mkdir -p target

# The Rust tests and clippy use the `ci` profile (Cargo.toml: release without fat LTO, which only
# the shipped extension needs). The tests are built once: FERROATTN_ISA is read at run time, so the
# same binaries serve every SIMD path. They build while the extension does, whose one codegen unit
# and fat-LTO link keep only one core busy for minutes. (clippy runs here, after the test build,
# because it would wait for that build's lock anyway.)
rust_build_and_clippy() {
    cargo test --locked --profile ci -p ferroattn-core --no-run
    echo "== cargo clippy"
    cargo clippy --locked --all-targets --profile ci -- -D warnings
}
rust_log=target/ci-rust.log
in_background "Rust test build and clippy" "$rust_log" rust_build_and_clippy
rust_build=$bg_pid

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
PY=python

step "install"
$PY -m pip install -q --upgrade pip
# The wheel (the extension, built by maturin with the release profile) builds while pip installs
# the extra packages (torch and the like: gigabytes to unpack); then the wheel goes in with its
# test extras.
rm -rf target/ci-wheel
$PY -m pip install -q "maturin>=1.8,<2"
# The shipped artifact: audited and manylinux-tagged (scripts/build-wheels.sh); the suite runs on it.
in_background "wheel build" target/ci-wheel.log bash scripts/build-wheels.sh -o target/ci-wheel x86_64
wheel_build=$bg_pid
if [[ -n ${FERROATTN_EXTRA_PIP:-} ]]; then
    $PY -m pip install -q ${FERROATTN_EXTRA_PIP}
fi
await "$wheel_build" target/ci-wheel.log
wheels=(target/ci-wheel/ferroattn-*.whl)
# (reinstalled even where the same version is installed: a rerun tests the new build)
$PY -m pip install -q --force-reinstall --no-deps "${wheels[0]}"
$PY -m pip install -q "${wheels[0]}[dev]"
# aarch64 (FERROATTN_AARCH64=1, as .ci/run sets): cross-built with Debian's toolchain, run under
# qemu-user (scripts/aarch64/; installs the Debian packages it needs where they are missing). It
# runs beside the x86-64 steps below, which leave a core mostly idle (pytest is one process).
aarch64_steps() {
    echo "== aarch64: Rust tests under qemu (default CPU and Cortex-A53) and clippy"
    bash scripts/aarch64/test-rust.sh
    echo "== aarch64 wheel and sdist"
    bash scripts/build-wheels.sh -o target/ci-wheel-aarch64 aarch64 sdist
    echo "== aarch64: Python smoke test of the wheel under qemu"
    bash scripts/aarch64/smoke.sh target/ci-wheel-aarch64/ferroattn-*aarch64*.whl
}
if [[ ${FERROATTN_AARCH64:-0} == 1 ]]; then
    a64_log=target/ci-aarch64.log
    in_background "aarch64 steps" "$a64_log" aarch64_steps
    a64_job=$bg_pid
fi

step "lint (clippy: with the Rust test build)"
cargo fmt --all --check
$PY -m ruff check python tests benches
$PY -m ruff format --check python tests benches
$PY -m mypy python/ferroattn benches  # also checks the calls into the binding against its .pyi stub

step "benchmark smoke runs" -
# Run from outside the source tree so the installed package (with its compiled module) is used.
echo "== benchmark smoke runs (they run and write well-formed JSON; no timing asserts; seconds)"
$PY benches/harness.py --quick --no-chart
$PY benches/bench_prefill.py --quick
$PY benches/bench_decode.py --quick
$PY benches/bench_paged.py --quick
$PY -m ferroattn bench --quick

step "Rust test build and clippy (running since the start)"
await "$rust_build" "$rust_log"

isas=$(cd /tmp && $PY -c "import ferroattn; print(' '.join(ferroattn.info()['isa_available']))")
echo "== SIMD paths on this CPU: $isas"
pytest=("$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib --rootdir=. --durations=15)
# Only the files that mark kernel tests are collected per path (the others import torch and
# transformers just to be deselected).
kernel_files=$(grep -l 'pytest\.mark\.kernel' tests/test_*.py)
# Per SIMD path: every Rust test, and the Python tests marked `kernel` (attention, variants, varlen,
# weights, KV cache, linear attention, ISA choice), which together reach every kernel family
# (prefill tiles, split-K decode, weights, varlen, int8/f16/bf16 caches, linear attention, each
# extra score term) in every dtype.
for isa in $isas; do
    step "Rust tests, FERROATTN_ISA=$isa"
    FERROATTN_ISA=$isa cargo test --locked --profile ci -p ferroattn-core
    step "Python kernel tests, FERROATTN_ISA=$isa"
    # shellcheck disable=SC2086  # one word per file
    FERROATTN_ISA=$isa "${pytest[@]}" -m kernel $kernel_files
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
    FERROATTN_ISA=avx512 FERROATTN_VNNI=0 "${pytest[@]}" tests/test_kv_cache.py tests/test_paged_attention.py
fi
# With AVX-512 BF16, bf16 prefill (and float32 at precision="high"/"medium") takes bf16 dot
# products; the scalar and AVX2 passes run those tests on the float32 kernels, and this one on the
# AVX-512 float32 kernels that CPUs without AVX-512 BF16 (Skylake-X, Ice Lake) take.
if [[ " $isas " == *" avx512 "* ]] && grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
    step "Python bf16 tests, FERROATTN_ISA=avx512 FERROATTN_BF16DOT=0"
    FERROATTN_ISA=avx512 FERROATTN_BF16DOT=0 "${pytest[@]}" tests/test_bf16_dot.py
fi
step "x86_64 wheel: fresh virtualenv without Rust, smoke test, ferroattn demo"
bash scripts/check-wheel.sh "${wheels[0]}"
if [[ -n ${a64_job:-} ]]; then
    step "aarch64 steps (running since the install)"
    await "$a64_job" "$a64_log"
fi
step ""
echo "== all passed in $(( $(date +%s) - suite_t0 )) s"
