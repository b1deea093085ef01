#!/usr/bin/env bash
# Create .venv and install lrt-deploy with everything the export path and the tests need.
# Pins come from constraints.txt (torch 2.13.0 CPU build: an unpinned torch would pull CUDA wheels).
# pip's output goes to .venv/setup.log and is shown only when the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)" >&2
    "$PYTHON" -m venv .venv
fi
echo "setup: installing lrt-deploy and its pinned dependencies (log: .venv/setup.log)" >&2
if ! { .venv/bin/python -m pip install --upgrade pip &&
       .venv/bin/python -m pip install -c constraints.txt -e ".[dev]"; } > .venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "setup: pip install failed (full log above)" >&2
    exit 1
fi

# Node and browser samples (samples/js): npm packages from the lockfile, and Debian's chromium for
# the headless page test. Output goes to .venv/setup-js.log, shown only on failure. Without node
# or apt-get the JS tests skip and say why.
if command -v npm > /dev/null; then
    echo "setup: installing samples/js from package-lock.json (log: .venv/setup-js.log)" >&2
    # onnxruntime-node's install script would fetch CUDA binaries from nuget.org: not needed.
    if ! (cd samples/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund) \
            > .venv/setup-js.log 2>&1; then
        cat .venv/setup-js.log >&2
        echo "setup: npm ci in samples/js failed (full log above)" >&2
        exit 1
    fi
else
    echo "setup: npm not found; the Node and browser tests will skip" >&2
fi
if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null; then
    echo "setup: installing Debian's chromium for the browser test (log: .venv/setup-js.log)" >&2
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    if ! { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive \
            $SUDO apt-get install -y --no-install-recommends chromium; } >> .venv/setup-js.log 2>&1; then
        cat .venv/setup-js.log >&2
        echo "setup: apt-get install chromium failed (full log above)" >&2
        exit 1
    fi
fi

# Emulated device classes (qemu-user-static and an ARM64 sysroot in .devices/) for the int8
# fidelity checks; log in .venv/setup-devices.log. Skips without apt-get.
bash scripts/setup_devices.sh
