#!/usr/bin/env bash
# The Rust suite of ferroattn-core built for aarch64 and run under qemu-user, on two emulated CPUs:
# qemu's default ("max": neon, fp16, dotprod, bf16, i8mm, sve) and a Cortex-A53 (neon only), so
# both sides of every run-time feature check run, each on the NEON path and once on the scalar
# path; then clippy for that target. The tests are built once (FERROATTN_ISA and the features are
# read at run time). Each run first prints the path it ran on (the test
# `active_path_is_reported_and_as_expected`, which also fails if it is not the one expected).
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
cd "$A64_ROOT"
a64_install

cargo=(nice cargo)
jobs=(-j "${FERROATTN_A64_JOBS:-2}")
"${cargo[@]}" test --locked "${jobs[@]}" --profile ci -p ferroattn-core --target "$A64_TARGET" --no-run

run() {  # CPU ISA FEATURES: the whole suite on qemu's CPU model, FERROATTN_ISA=ISA
    local t0=$SECONDS rc=0 log=$CARGO_TARGET_DIR/test-$1-$2.log
    echo "== aarch64 Rust tests: QEMU_CPU=$1 FERROATTN_ISA=$2"
    QEMU_CPU=$1 FERROATTN_TEST_RUNNER=qemu-aarch64 FERROATTN_ISA=$2 FERROATTN_EXPECT_ISA=$2 FERROATTN_EXPECT_FEATURES=$3 \
        cargo test --locked "${jobs[@]}" --profile ci -p ferroattn-core --target "$A64_TARGET" \
        -- --show-output >"$log" 2>&1 || rc=$?
    # The path each test binary ran on and the counts; everything when a test failed.
    grep -E "^kernel path|^test result" "$log" || true
    if [[ $rc -ne 0 ]]; then
        cat "$log"
        echo "aarch64 Rust tests failed (QEMU_CPU=$1 FERROATTN_ISA=$2)"
        return 1
    fi
    echo "-- QEMU_CPU=$1 FERROATTN_ISA=$2: $(( SECONDS - t0 )) s"
}
run max neon "neon fp16 dotprod bf16 i8mm"
run cortex-a53 neon "neon -fp16 -dotprod -bf16 -i8mm"
run max scalar "neon"

echo "== aarch64 cargo clippy"
"${cargo[@]}" clippy --locked "${jobs[@]}" --all-targets --profile ci -p ferroattn-core --target "$A64_TARGET" -- -D warnings
