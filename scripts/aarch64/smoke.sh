#!/usr/bin/env bash
# The Python smoke test (scripts/aarch64/smoke.py) of ferroattn built for aarch64, under qemu-user:
#   scripts/aarch64/smoke.sh [WHEEL]
# WHEEL: an aarch64 wheel (scripts/build-wheels.sh), whose package is unpacked and tested as it
# ships; without it the extension is cross-built here (ci profile) beside the Python sources.
#
# The interpreter is Debian's arm64 CPython with Debian's arm64 NumPy (and ml_dtypes' manylinux
# aarch64 wheel, for bfloat16 and tests/reference.py), unpacked (`apt-get download`, `dpkg -x`)
# into a scratch sysroot, target/aarch64-sysroot, once: nothing is installed over the host's
# Python. QEMU_CPU picks the emulated CPU (default: qemu's "max"); FERROATTN_EXPECT_ISA (default
# neon) the path the test requires.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
cd "$A64_ROOT"
a64_install

# --- the sysroot -------------------------------------------------------------------------------
py_packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-numpy libblas3
    liblapack3 libgfortran5 libexpat1 zlib1g libffi8 libbz2-1.0 liblzma5 libssl3 libdb5.3 libnsl2 libtirpc3
    libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libsqlite3-0 libgcc-s1 libstdc++6)
if [[ ! -e $A64_SYSROOT/.ready ]]; then
    echo "== arm64 Python and NumPy into $A64_SYSROOT"
    rm -rf "$A64_SYSROOT"
    mkdir -p "$A64_SYSROOT/debs"
    (cd "$A64_SYSROOT/debs" && apt-get download -qq "${py_packages[@]/%/:arm64}")
    for deb in "$A64_SYSROOT"/debs/*.deb; do dpkg -x "$deb" "$A64_SYSROOT"; done
    # What update-alternatives would have linked: NumPy loads libblas.so.3 and liblapack.so.3.
    for lib in blas lapack; do
        ln -sf "$lib/lib$lib.so.3" "$A64_SYSROOT/usr/lib/aarch64-linux-gnu/lib$lib.so.3"
    done
    # ml_dtypes is not packaged for this Debian: its manylinux wheel (a zip) goes beside NumPy.
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_aarch64 \
        --python-version 3.11 -d "$A64_SYSROOT/wheels" "ml_dtypes>=0.3,<0.6"
    python3 -m zipfile -e "$A64_SYSROOT"/wheels/ml_dtypes-*.whl "$A64_SYSROOT/usr/lib/python3/dist-packages"
    rm -rf "$A64_SYSROOT/debs" "$A64_SYSROOT/wheels"
    touch "$A64_SYSROOT/.ready"
fi

# --- the package -------------------------------------------------------------------------------
site=$CARGO_TARGET_DIR/smoke-site
rm -rf "$site"
mkdir -p "$site"
if [[ $# -ge 1 ]]; then
    echo "== unpacking $1"
    python3 -m zipfile -e "$1" "$site"
else
    echo "== cross-building the extension (ci profile)"
    PYO3_BUILD_EXTENSION_MODULE=1 nice cargo build --locked -j "${FERROATTN_A64_JOBS:-2}" --profile ci \
        -p ferroattn-py --target "$A64_TARGET"
    cp -r python/ferroattn "$site/"
    rm -f "$site"/ferroattn/_ferroattn*.so
    cp "$CARGO_TARGET_DIR/$A64_TARGET/ci/lib_ferroattn.so" "$site/ferroattn/_ferroattn.abi3.so"
fi

# --- the test ----------------------------------------------------------------------------------
echo "== Python smoke test under qemu-aarch64 (QEMU_CPU=${QEMU_CPU:-max})"
QEMU_CPU=${QEMU_CPU:-max} FERROATTN_EXPECT_ISA=${FERROATTN_EXPECT_ISA:-neon} PYTHONPATH=$site \
    PYTHONDONTWRITEBYTECODE=1 qemu-aarch64 -L "$A64_SYSROOT" "$A64_SYSROOT/usr/bin/python3.11" \
    scripts/aarch64/smoke.py
