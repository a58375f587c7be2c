#!/usr/bin/env bash
# Builds ferroattn's release artifacts with maturin (release profile: fat LTO, one codegen unit):
#   scripts/build-wheels.sh [-o DIR] [x86_64] [aarch64] [sdist]      (default: all three, into dist/)
# - x86_64: an abi3 wheel (CPython >= 3.10) for Linux x86_64, built on this machine;
# - aarch64: the same for Linux aarch64, cross-built with Debian's toolchain (scripts/aarch64/env.sh);
# - sdist: the source archive (`pip install` from it needs a Rust toolchain), checked to compile.
# Both wheels are built for the baseline of their architecture (no target-cpu: the SIMD path is
# chosen at run time) and tagged manylinux_2_34 after maturin's audit, which fails the build if the
# extension needs a newer glibc symbol or links a library outside the policy. 2.34 is what linking
# against this machine's glibc (Debian 12: 2.36, native and cross) allows: since glibc 2.34 the
# pthread functions Rust's std calls carry that version (libpthread merged into libc), and
# stat64/fstat64 2.33. An older level (manylinux2014, glibc 2.17) needs an older glibc to link
# against: a manylinux2014 container, or maturin --zig.
# Then each wheel's size is checked (at most FERROATTN_WHEEL_MAX_BYTES, default 5 MB) and its tag,
# size and highest glibc symbol version are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

out=dist
if [[ ${1:-} == -o ]]; then
    out=$2
    shift 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
what=("$@")
[[ ${#what[@]} -gt 0 ]] || what=(x86_64 aarch64 sdist)

maturin=${MATURIN:-maturin}
if ! command -v "$maturin" >/dev/null; then
    echo "maturin not found: pip install 'maturin>=1.8,<2' (or set MATURIN)" >&2
    exit 1
fi
maturin=$(command -v "$maturin")
policy=manylinux_2_34
max_bytes=${FERROATTN_WHEEL_MAX_BYTES:-5000000}

# The wheel's highest GLIBC_x.y symbol version: the oldest glibc it loads on.
glibc_needed() {  # WHEEL OBJDUMP
    local tmp
    tmp=$(mktemp -d)
    python3 -m zipfile -e "$1" "$tmp"
    find "$tmp" -name '*.so' -exec "$2" -T {} \; | grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -u | tail -1
    rm -rf "$tmp"
}

check() {  # WHEEL OBJDUMP
    local bytes
    bytes=$(stat -c %s "$1")
    echo "-- $(basename "$1"): $bytes bytes, needs $(glibc_needed "$1" "$2")"
    if (( bytes > max_bytes )); then
        echo "$(basename "$1") is larger than $max_bytes bytes" >&2
        return 1
    fi
}

for w in "${what[@]}"; do
    t0=$SECONDS
    case $w in
        x86_64)
            echo "== x86_64 wheel"
            rm -f "$out"/ferroattn-*x86_64*.whl
            "$maturin" build --release --locked --compatibility "$policy" --auditwheel check -o "$out"
            check "$(ls "$out"/ferroattn-*x86_64*.whl)" objdump
            ;;
        aarch64)
            echo "== aarch64 wheel"
            rm -f "$out"/ferroattn-*aarch64*.whl
            (
                # shellcheck source=aarch64/env.sh
                source "$root/scripts/aarch64/env.sh"
                a64_install
                "$maturin" build --release --locked --target "$A64_TARGET" --compatibility "$policy" \
                    --auditwheel check -o "$out"
            )
            check "$(ls "$out"/ferroattn-*aarch64*.whl)" aarch64-linux-gnu-objdump
            ;;
        sdist)
            echo "== sdist"
            rm -f "$out"/ferroattn-*.tar.gz
            "$maturin" sdist -o "$out"
            # It holds what a build needs: its crates resolve and compile (checked, not built
            # again) from the unpacked archive, with the locked dependencies.
            rm -rf target/sdist-check
            mkdir -p target/sdist-check
            tar -xzf "$(ls "$out"/ferroattn-*.tar.gz)" -C target/sdist-check
            (cd target/sdist-check/ferroattn-* && test -f pyproject.toml && test -d python/ferroattn &&
                PYO3_PYTHON=${PYTHON:-python3} CARGO_TARGET_DIR=$root/target \
                cargo check --locked --profile ci -p ferroattn-py)
            rm -rf target/sdist-check
            ;;
        *)
            echo "unknown artifact $w (x86_64, aarch64 or sdist)" >&2
            exit 2
            ;;
    esac
    echo "-- $w: $(( SECONDS - t0 )) s"
done
ls -l "$out"
