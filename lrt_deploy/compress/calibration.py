"""Streaming calibration statistics: per-layer input second moments ``E[x x^T]`` of linear layers
(activation-aware SVD) and index counts of embedding tables (frequency-weighted factorization)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "CalibrationStatistics",
    "primary_output",
    "EmbeddingIndexCounter",
    "InputCovarianceCollector",
    "collect_calibration_statistics",
    "collect_input_covariances",
]

logger = logging.getLogger(__name__)


_Hooks = TypeVar("_Hooks", bound="_InputHooks")


class _InputHooks:
    """Forward pre-hooks on named modules, removed on exit, with a shared token mask: the
    lifecycle both calibration collectors need. Subclasses implement ``_observe``."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self._modules = dict(modules)
        self._mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        """Register the forward pre-hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove the hooks; what was accumulated is kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self: _Hooks) -> _Hooks:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.detach()

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Restrict the next forward passes to the tokens where ``mask`` is true."""
        self._mask = None if mask is None else mask.detach().bool()

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._observe(name, args[0])

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError


class InputCovarianceCollector(_InputHooks):
    """Accumulate ``sum x x^T`` and the token count of the inputs of chosen linear layers."""

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        super().__init__(modules)
        self.sums: dict[str, torch.Tensor | None] = dict.fromkeys(self._modules)
        self.counts: dict[str, int] = dict.fromkeys(self._modules, 0)

    def _observe(self, name: str, x: torch.Tensor) -> None:
        mask = self._mask
        if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            x = x[mask.to(x.device)]
        x = x.detach().reshape(-1, x.shape[-1]).double()
        outer = x.T @ x
        total = self.sums[name]
        self.sums[name] = outer if total is None else total + outer
        self.counts[name] += x.shape[0]

    def covariances(self) -> dict[str, torch.Tensor]:
        """Per-layer second moment ``sum x x^T / count`` (float64, ``in x in``)."""
        result = {}
        for name, module in self._modules.items():
            total, count = self.sums[name], self.counts[name]
            if total is None or count == 0:
                logger.warning("layer %s saw no calibration tokens", name)
                size = module.in_features
                result[name] = torch.zeros(size, size, dtype=torch.float64)
            else:
                result[name] = total / count
        return result


def primary_output(outputs: Any) -> torch.Tensor:
    """The output fidelity is judged on: a tensor itself, a dict's first value, a Hugging Face
    ``ModelOutput``'s ``last_hidden_state``, or a tuple's first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "last_hidden_state") and outputs.last_hidden_state is not None:
        return outputs.last_hidden_state
    if isinstance(outputs, Mapping) and outputs:
        return primary_output(next(iter(outputs.values())))
    if isinstance(outputs, (tuple, list)) and outputs:
        return primary_output(outputs[0])
    raise TypeError(
        f"cannot find the primary output in a {type(outputs).__name__}: return a tensor, a dict "
        "of tensors or a ModelOutput"
    )


class EmbeddingIndexCounter(_InputHooks):
    """Count how often each row of chosen embedding tables is looked up."""

    def __init__(self, modules: Mapping[str, nn.Embedding]) -> None:
        super().__init__(modules)
        self.counts: dict[str, torch.Tensor] = {
            name: torch.zeros(module.num_embeddings, dtype=torch.float64)
            for name, module in self._modules.items()
        }

    def _observe(self, name: str, indices: torch.Tensor) -> None:
        indices = indices.detach()
        mask = self._mask
        if mask is not None and indices.shape == mask.shape:
            indices = indices[mask.to(indices.device)]
        counts = self.counts[name]
        counts += torch.bincount(indices.reshape(-1).cpu(), minlength=counts.numel()).double()


@dataclass
class CalibrationStatistics:
    """What one calibration pass measured."""

    #: Linear layer name -> float64 ``E[x x^T]`` of its inputs.
    covariances: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Embedding name -> float64 lookup count of each row.
    index_counts: dict[str, torch.Tensor] = field(default_factory=dict)


def _named_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    modules = {}
    for name in names:
        if name not in named:
            raise KeyError(f"model has no module named {name!r}")
        modules[name] = named[name]
    return modules


def collect_calibration_statistics(
    model: nn.Module,
    linear_names: Iterable[str],
    embedding_names: Iterable[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    mask_key: str | None = "attention_mask",
) -> CalibrationStatistics:
    """Run calibration batches through ``model`` once, measuring linear inputs and lookups."""
    linears = _named_modules(model, linear_names)
    embeddings = _named_modules(model, embedding_names)
    device = next(model.parameters(), torch.empty(0)).device

    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            InputCovarianceCollector(linears) as collector,
            EmbeddingIndexCounter(embeddings) as counter,
        ):
            # disable=None turns the bar off when stderr is not a terminal (CI, logs).
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=None):
                inputs = {
                    key: value.to(device) if isinstance(value, torch.Tensor) else value
                    for key, value in batch.items()
                }
                mask = inputs.get(mask_key) if mask_key else None
                collector.set_token_mask(mask)
                counter.set_token_mask(mask)
                model(**inputs)
    finally:
        model.train(was_training)
    return CalibrationStatistics(collector.covariances(), counter.counts)


def collect_input_covariances(
    model: nn.Module,
    module_names: Iterable[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    mask_key: str | None = "attention_mask",
) -> dict[str, torch.Tensor]:
    """Run calibration batches through ``model`` and return each named layer's ``E[x x^T]``."""
    return collect_calibration_statistics(model, module_names, (), batches, mask_key).covariances
