"""Modules that adapt a user's model to what the ONNX exporter and the report need."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lrt_deploy.errors import ExampleInputsError

__all__ = ["OutputsAsTuple", "SentenceEmbedder", "flatten_outputs"]


def flatten_outputs(outputs: Any, output_names: list[str] | None = None) -> dict[str, Any]:
    """Name a model's tensor outputs: ``output`` for one tensor, ``output_i`` for a tuple,
    the keys of a dict or Hugging Face ``ModelOutput``; pick ``output_names`` when given."""
    if isinstance(outputs, torch.Tensor):
        named = {"output": outputs}
    elif isinstance(outputs, dict) or hasattr(outputs, "keys"):
        named = {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)}
    elif isinstance(outputs, (tuple, list)):
        named = {f"output_{i}": v for i, v in enumerate(outputs) if isinstance(v, torch.Tensor)}
    else:
        raise ExampleInputsError(
            f"the model returned {type(outputs).__name__}; lrt-export needs tensors, a tuple of "
            "tensors or a dict of tensors"
        )
    if output_names is None:
        return named
    return {name: named[name] for name in output_names}


class OutputsAsTuple(nn.Module):
    """The model with positional inputs in ``input_names`` order and a flat tuple of outputs in
    ``output_names`` order, as the exporter needs."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, args, strict=True)))
        return tuple(flatten_outputs(outputs, self.output_names).values())


class SentenceEmbedder(nn.Module):
    """A transformer encoder plus sentence-transformers pooling, as one exportable module."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return {"sentence_embedding": pooled}
