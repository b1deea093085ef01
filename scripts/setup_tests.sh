#!/usr/bin/env bash
# Everything the tests need on top of scripts/setup.sh: the dev extra (pytest, ruff, matplotlib,
# jsonschema), samples/js's npm packages, Debian's chromium for the page test, and qemu with an
# ARM64 sysroot for the device-class checks (scripts/setup_devices.sh). Uses sudo for apt-get
# when not root. Logs go to .venv/setup-*.log, shown only on failure; without npm or apt-get
# the tests that need them skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "setup-tests: installing the dev extra (log: .venv/setup-dev.log)" >&2
if ! .venv/bin/python -m pip install -c constraints.txt -e ".[dev]" > .venv/setup-dev.log 2>&1; then
    cat .venv/setup-dev.log >&2
    echo "setup-tests: pip install of the dev extra failed (full log above)" >&2
    exit 1
fi

if command -v npm > /dev/null; then
    echo "setup-tests: installing samples/js from package-lock.json (log: .venv/setup-js.log)" >&2
    # onnxruntime-node's install script would fetch CUDA binaries from nuget.org: not needed.
    if ! (cd samples/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund) \
            > .venv/setup-js.log 2>&1; then
        cat .venv/setup-js.log >&2
        echo "setup-tests: npm ci in samples/js failed (full log above)" >&2
        exit 1
    fi
else
    echo "setup-tests: npm not found; the Node and browser tests will skip" >&2
fi
if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null; then
    echo "setup-tests: installing Debian's chromium for the page test (log: .venv/setup-js.log)" >&2
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    if ! { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive \
            $SUDO apt-get install -y --no-install-recommends chromium; } >> .venv/setup-js.log 2>&1; then
        cat .venv/setup-js.log >&2
        echo "setup-tests: apt-get install chromium failed (full log above)" >&2
        exit 1
    fi
fi

bash scripts/setup_devices.sh
