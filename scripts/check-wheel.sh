#!/usr/bin/env bash
# Installs an x86_64 wheel of ferroattn into a fresh virtualenv with no Rust toolchain on PATH
# (only the virtualenv's own bin), from binary wheels only, and runs the smoke test
# (scripts/aarch64/smoke.py, which the aarch64 wheel also passes under qemu) and `ferroattn demo`:
#   scripts/check-wheel.sh WHEEL
# The interpreter is this one's base Python (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
venv=$PWD/target/wheel-check-venv
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
bare=(env -i "HOME=${HOME:-/tmp}" "PATH=$venv/bin" "TMPDIR=${TMPDIR:-/tmp}")
if "${bare[@]}" /bin/bash -c 'command -v cargo || command -v rustc' >/dev/null 2>&1; then
    echo "a Rust toolchain is still on PATH" >&2
    exit 1
fi
"${bare[@]}" "$venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: \
    "$wheel" "ml_dtypes>=0.3"
# From outside the source tree, so the installed package is the one imported.
(cd /tmp && "${bare[@]}" "$venv/bin/python" "$OLDPWD/scripts/aarch64/smoke.py")
(cd /tmp && "${bare[@]}" "$venv/bin/ferroattn" demo >/dev/null)
echo "-- $(basename "$wheel"): installs without Rust, smoke test and ferroattn demo pass"
rm -rf "$venv"
