#!/usr/bin/env bash
# Emulated device classes for the int8 fidelity checks (lrt_deploy.verify.emulate):
#  - Debian's qemu-user-static: qemu-x86_64-static -cpu Haswell / Nehalem runs this .venv's
#    Python with onnxruntime's AVX2 / SSE kernel;
#  - an ARM64 sysroot in .devices/arm64/root: Debian's python3.11 for arm64 with the few
#    libraries it and onnxruntime load, onnxruntime and numpy aarch64 wheels (the pins in
#    constraints.txt) in usr/lib/python3/dist-packages. run_model gives each run a linked view
#    of it with a /proc/cpuinfo for its qemu CPU model (onnxruntime's cpuinfo aborts on the
#    host's x86 one), so no bind mount and no root are needed to run.
#  - qemu >= 10 for arm64-sme (Debian stable's 7.2 runs onnxruntime's SME kernel wrongly): the
#    qemu-aarch64 binary (static, 13.7 MB) from Debian bookworm-backports' qemu-user .deb, fetched
#    with apt-get download through a private apt state (a sources list derived from this
#    machine's own Debian entry, the suite renamed to CODENAME-backports, in a temporary folder
#    removed afterwards) and unpacked to .devices/qemu10/: nothing is installed. 63 MB .deb
#    (qemu-user holds every target; only qemu-aarch64 is kept) + a 0.36 MB index: 3 s here
#    (0.7 s index, 0.5 s .deb, 0.5 s unpacking). If that fails, the rest still succeeds and
#    arm64-sme stays "not verified" with the reason.
# Downloads ~120 MB (+63 MB for qemu 10): qemu-user-static 63 MB (380 MB installed, all of
# qemu's targets), the arm64 package indices ~9 MB, 14 arm64 .debs 9.7 MB, the two aarch64
# wheels 37 MB; the sysroot takes 165 MB in .devices/ (+14 MB for qemu 10). Measured on a 2-core
# Zen 3 VM with a fast mirror: ~30 s in all (+3 s for qemu 10), the sysroot 8 s of it; a few
# hundredths of a second when everything is there.
# Run by scripts/setup_tests.sh. Idempotent; output goes to .venv/setup-devices.log, shown only
# on failure. Without apt-get (not Debian/Ubuntu) it skips, and the emulation tests skip and say
# why.
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

# qemu >= 10 for arm64-sme, unless the system's qemu-aarch64-static already is (Debian trixie).
qemu_major() {
    "$1" --version 2> /dev/null | sed -n '1s/^qemu-[a-z0-9_]* version \([0-9]*\)\..*/\1/p'
}
is_qemu10() { [ "$(qemu_major "$1")" -ge 10 ] 2> /dev/null; }
Q10=.devices/qemu10/qemu-aarch64
fetch_qemu10() (
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    # this machine's Debian archive: the URI of its configured entry for the release's suite
    uri=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' "Created-By: Packages" \
        | awk -v s="$codename" '$1 == s { print $2; exit }')
    [ -n "$codename" ] && [ -n "$uri" ] || { echo "no apt entry for suite '$codename'"; exit 1; }
    tmp=$(mktemp -d) || exit 1
    trap 'rm -rf "$tmp"' EXIT
    echo "deb $uri $codename-backports main" > "$tmp/sources.list"
    mkdir -p "$tmp/lists/partial" "$tmp/cache" .devices/qemu10 || exit 1
    apt="apt-get -q -o Dir::Etc::SourceList=$tmp/sources.list -o Dir::Etc::SourceParts=/nonexistent
        -o Dir::State::Lists=$tmp/lists -o Dir::Cache=$tmp/cache -o Dir::Cache::pkgcache=
        -o Dir::Cache::srcpkgcache= -o Acquire::Languages=none
        -o APT::Architectures::=$(dpkg --print-architecture)"
    $apt update && (cd "$tmp" && $apt download "qemu-user/$codename-backports") || exit 1
    deb=$(ls "$tmp"/qemu-user_*.deb) || exit 1
    # stop at the one member (0.5 s instead of 6 s of xz); dpkg-deb then sees a closed pipe
    { dpkg-deb --fsys-tarfile "$deb" 2> /dev/null || true; } \
        | tar -x --occurrence=1 -O ./usr/bin/qemu-aarch64 > "$Q10.part" && chmod +x "$Q10.part" \
        || exit 1
    is_qemu10 "$Q10.part" || { echo "$deb: not qemu >= 10"; exit 1; }
    mv "$Q10.part" "$Q10"
)
if ! is_qemu10 $Q10 && ! is_qemu10 "$(command -v qemu-aarch64-static)"; then
    echo "setup-devices: fetching qemu 10's qemu-aarch64 ($(. /etc/os-release &&
        echo "$VERSION_CODENAME")-backports) into .devices/qemu10 (log: $LOG)" >&2
    if ! fetch_qemu10 >> "$LOG" 2>&1; then
        rm -f "$Q10.part"
        echo "setup-devices: no qemu >= 10 (see $LOG): arm64-sme stays unverified" >&2
    fi
fi
