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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_tiny_bert

    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(folder)
    return folder
