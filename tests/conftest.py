from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# lrt-export runs the deployed text model on this machine's device class only (emulating the
# others costs ~40 s an export); tests of the device classes name them explicitly.
os.environ["LRT_VERIFY_CLASSES"] = "host"
sys.path.insert(0, str(Path(__file__).parent))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each of the parallel workers gets one core's share: BLAS/OpenMP pools sized for the whole
    # machine would oversubscribe it and spin against the other worker.
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

# Files whose tests take minutes (MiniLM exports, browser and emulation runs): run first, so a
# parallel run (scripts/test.sh: pytest -n 2 --dist loadfile) does not finish on one of them.
LONG_FILES = (
    "samples/test_js_runtimes.py",
    "cli/test_cli.py",
    "pipeline/test_e2e_minilm.py",
    "pipeline/test_pipeline.py",
    "verify/test_emulation.py",
    "report/test_bundle_tools.py",
    "compress/test_floor.py",
    "verify/test_verify.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long files first, in LONG_FILES order; everything else keeps its order."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_tiny_bert

    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(folder)
    return folder
