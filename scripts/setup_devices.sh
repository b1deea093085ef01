#!/usr/bin/env bash
# Emulated device classes for the int8 fidelity checks (lrt_deploy.verify.emulate):
#  - Debian's qemu-user-static: qemu-x86_64-static -cpu Haswell / Nehalem runs this .venv's
#    Python with onnxruntime's AVX2 / SSE kernel;
#  - an ARM64 sysroot in .devices/arm64/root: Debian's python3.11 for arm64 with the few
#    libraries it and onnxruntime load, onnxruntime and numpy aarch64 wheels (the pins in
#    constraints.txt) in usr/lib/python3/dist-packages. run_model gives each run a linked view
#    of it with a /proc/cpuinfo for its qemu CPU model (onnxruntime's cpuinfo aborts on the
#    host's x86 one), so no bind mount and no root are needed to run.
# Downloads ~120 MB: qemu-user-static 63 MB (380 MB installed, all of qemu's targets), the arm64
# package indices ~9 MB, 14 arm64 .debs 9.7 MB, the two aarch64 wheels 37 MB; the sysroot takes
# 165 MB in .devices/. Measured on a 2-core Zen 3 VM with a fast mirror: ~30 s in all, the
# sysroot 8 s of it; a few hundredths of a second when everything is there.
# Idempotent; output goes to .venv/setup-devices.log, shown only on failure. Without apt-get
# (not Debian/Ubuntu) it skips, and the emulation tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v apt-get > /dev/null; then
    echo "setup-devices: apt-get not found; skipping qemu and the ARM64 sysroot" >&2
    exit 0
fi
mkdir -p .venv
LOG=.venv/setup-devices.log
: > "$LOG"
fail() {
    cat "$LOG" >&2
    echo "setup-devices: $1 (full log above)" >&2
    exit 1
}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
# pip for the --platform install: this checkout's .venv (setup.sh), else $DEVICES_PYTHON.
PYTHON=${DEVICES_PYTHON:-.venv/bin/python}
ROOT=.devices/arm64/root
SITE=$ROOT/usr/lib/python3/dist-packages
ARM_DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1
    libstdc++6 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libssl3 libuuid1 libcrypt1"
pin() { sed -n "s/^$1==//p" constraints.txt; }

if ! command -v qemu-x86_64-static > /dev/null || ! command -v qemu-aarch64-static > /dev/null \
        || ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "setup-devices: installing qemu-user-static, adding arm64 to apt (log: $LOG)" >&2
    { $SUDO dpkg --add-architecture arm64 && $SUDO apt-get update &&
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
          qemu-user-static; } >> "$LOG" 2>&1 || fail "installing qemu-user-static failed"
fi

if [ ! -x $ROOT/usr/bin/python3.11 ]; then
    echo "setup-devices: unpacking Debian's arm64 python3.11 into $ROOT (log: $LOG)" >&2
    DEBS=.devices/arm64/debs
    rm -rf "$DEBS" $ROOT && mkdir -p "$DEBS" $ROOT
    # apt-get download writes into the current folder; as root, _apt cannot write there.
    { (cd "$DEBS" && apt-get download $(for p in $ARM_DEBS; do echo "$p:arm64"; done)) &&
      for deb in "$DEBS"/*.deb; do dpkg -x "$deb" $ROOT || exit 1; done; } >> "$LOG" 2>&1 \
        || fail "downloading the arm64 python packages failed"
    rm -rf "$DEBS"
fi

VERSIONS="onnxruntime==$(pin onnxruntime) numpy==$(pin numpy)"
if [ "$(cat .devices/arm64/wheels.txt 2>/dev/null)" != "$VERSIONS" ]; then
    echo "setup-devices: installing $VERSIONS for aarch64 into $SITE (log: $LOG)" >&2
    rm -rf "$SITE" .devices/arm64/wheels.txt
    "$PYTHON" -m pip install --no-deps --no-compile --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
        --abi cp311 --target "$SITE" $VERSIONS >> "$LOG" 2>&1 \
        || fail "pip install of the aarch64 wheels failed"
    echo "$VERSIONS" > .devices/arm64/wheels.txt
fi
