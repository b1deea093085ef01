"""``HealConfig``: how healing distils the compressed model towards the dense one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrt_deploy.errors import ConfigError

__all__ = ["DEVICES", "PRECISIONS", "HealConfig"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class HealConfig:
    """Distillation after compression; never hands back a model worse than before it."""

    #: Optimiser steps, >= 1 (the best step on held-back data is kept).
    steps: int
    #: Where healing runs: ``"auto"`` (CUDA when PyTorch sees a GPU), ``"cpu"``, ``"cuda[:N]"``.
    device: str = "auto"
    #: Autocast: ``"auto"`` (bf16/fp16 on a GPU, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"``.
    precision: str = "auto"
    #: Simulate the target's quantisation in the loop (dynamic int8 per channel or int4); every
    #: weight but the embedding tables then trains.
    quantized: bool = False
    #: Sentences per step when healing streams a text corpus.
    batch: int = 32
    #: Peak learning rate (linear warm-up, then cosine decay).
    lr: float = 1e-4
    #: A UTF-8 text file (one sentence per line) healing streams instead of the calibration
    #: text, which then calibrates the factorization, the budget search and int8 in full.
    corpus: str | Path | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or not 1 <= self.steps <= 10_000_000:
            raise ConfigError(f"HealConfig.steps must be an int in 1..10000000, got {self.steps!r}")
        device = str(self.device)
        if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ConfigError(f"HealConfig.device must be one of {DEVICES} (or 'cuda:N'), got "
                              f"{self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"HealConfig.precision must be one of {PRECISIONS}, got "
                              f"{self.precision!r}")
        if not isinstance(self.quantized, bool):
            raise ConfigError(f"HealConfig.quantized must be True or False, got {self.quantized!r}")
        if not _is_int(self.batch) or not 1 <= self.batch <= 4096:
            raise ConfigError(f"HealConfig.batch must be in 1..4096, got {self.batch!r}")
        if (not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool)
                or not 0.0 < self.lr <= 1.0):
            raise ConfigError(f"HealConfig.lr must be in (0, 1], got {self.lr!r} (e.g. 1e-4)")
        corpus = self.corpus
        if corpus is not None and (str(corpus).endswith(".npz") or not Path(corpus).is_file()):
            raise ConfigError(f"HealConfig.corpus '{corpus}' is not a text file: give UTF-8 "
                              "text, one sentence per line")

    def options(self) -> dict[str, Any]:
        """The choices the manifest records: ``device_asked``, ``precision_asked``, ``lr``."""
        return {"device_asked": self.device, "precision_asked": self.precision, "lr": self.lr}
