# Sourced by the scripts in scripts/aarch64/: the environment that cross-builds ferroattn for
# aarch64-unknown-linux-gnu with Debian's toolchain and runs the results under qemu-user.
#
# Debian's packages give a Rust (rustc-web 1.96, with clippy) and its aarch64 standard library,
# an aarch64 linker and qemu; they are installed when missing (CI runs as root on a fresh machine;
# elsewhere the script says what to install). rustup's toolchain, first on PATH where it is
# installed, has no aarch64 standard library here, so /usr/bin's cargo and rustc are put first,
# for the commands of these scripts only. The build has its own target directory, so the host's
# builds stay valid.

A64_TARGET=aarch64-unknown-linux-gnu
A64_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
A64_SYSROOT=$A64_ROOT/target/aarch64-sysroot

a64_packages=(rustc-web cargo-web rust-web-clippy libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    qemu-user binutils-aarch64-linux-gnu)

# Installs the Debian packages above that are missing (needs root and apt-get).
a64_install() {
    local missing=() p
    for p in "${a64_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "missing Debian packages: ${missing[*]} (install them as root: see scripts/aarch64/env.sh)" >&2
        return 1
    fi
    echo "== installing ${missing[*]}"
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

export PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# No `-L` (a sysroot) here: with one, qemu hung the tests' threads; the binaries find the arm64
# libc that libstd-rust-web-dev:arm64 brings in (multiarch: /lib/aarch64-linux-gnu).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
export CARGO_TARGET_DIR=$A64_ROOT/target/aarch64
