"""HealConfig checks itself and names the field it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrt_deploy.config import HealConfig
from lrt_deploy.errors import ConfigError, LrtDeployError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "HealConfig.steps must be an int in 1..10000000, got 0"),
        ({"steps": True}, "HealConfig.steps must be"),
        ({"steps": 2.0}, "HealConfig.steps must be"),
        ({"steps": 20_000_000}, "HealConfig.steps must be"),
        ({"steps": 2, "device": "tpu"}, "HealConfig.device must be one of"),
        ({"steps": 2, "precision": "int4"}, "HealConfig.precision must be one of"),
        ({"steps": 2, "quantized": "yes"}, "HealConfig.quantized must be True or False"),
        ({"steps": 2, "batch": 0}, "HealConfig.batch must be in 1..4096, got 0"),
        ({"steps": 2, "batch": 5000}, "HealConfig.batch must be in 1..4096"),
        ({"steps": 2, "lr": 0.0}, "HealConfig.lr must be in \\(0, 1\\]"),
        ({"steps": 2, "lr": 2.0}, "HealConfig.lr must be"),
        ({"steps": 2, "corpus": "missing.txt"}, "HealConfig.corpus 'missing.txt' is not a text"),
    ],
)
def test_heal_config_names_the_field_it_refuses(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HealConfig(**kwargs)


def test_heal_config_accepts_and_records_the_choices(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a sentence\n", encoding="utf-8")
    npz = tmp_path / "inputs.npz"
    npz.write_bytes(b"")
    heal = HealConfig(3, device="cuda:1", precision="bf16", quantized=True, batch=64, lr=3e-4,
                      corpus=corpus)
    assert heal.options() == {"device_asked": "cuda:1", "precision_asked": "bf16", "lr": 3e-4}
    assert HealConfig(1).device == "auto" and HealConfig(1).corpus is None
    with pytest.raises(ConfigError, match="is not a text file"):
        HealConfig(2, corpus=npz)
    with pytest.raises(AttributeError):
        heal.steps = 4  # frozen
    assert issubclass(ConfigError, LrtDeployError)
