"""Baselines for models built low-rank by design: a deep copy without what made them cheap.

:func:`dense_equivalent` computes the same function at full-rank cost;
:func:`standard_attention_equivalent` computes a different one, so its fidelity is not comparable.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from lrt_deploy.nn.linformer import LinformerSelfAttention
from lrt_deploy.nn.lowrank import LowRankEmbedding, LowRankLinear, is_lowrank_pair

__all__ = [
    "DENSE_EQUIVALENT_NOTE",
    "STANDARD_ATTENTION_NOTE",
    "dense_equivalent",
    "led_to_dense",
    "standard_attention_equivalent",
]

logger = logging.getLogger(__name__)

#: How a report names the baseline built by :func:`dense_equivalent` (or the ONNX fold).
DENSE_EQUIVALENT_NOTE = "dense-equivalent (low-rank pairs multiplied out)"
#: How a report names the baseline built by :func:`standard_attention_equivalent`.
STANDARD_ATTENTION_NOTE = (
    "standard attention over the same weights; fidelity not comparable (a different function)"
)


def led_to_dense(pair: nn.Sequential) -> nn.Linear:
    """Multiply a greenformer LED ``Sequential(Linear(in, r, bias=False), Linear(r, out))``
    into one ``nn.Linear(in, out)`` carrying the second layer's bias."""
    first, second = pair[0], pair[1]
    weight = second.weight.detach() @ first.weight.detach()
    linear = nn.Linear(
        first.in_features, second.out_features, bias=second.bias is not None,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if second.bias is not None:
            linear.bias.copy_(second.bias.detach())
    return linear


def _to_dense(module: nn.Module) -> nn.Module:
    if isinstance(module, (LowRankLinear, LowRankEmbedding)):
        return module.to_dense()
    return led_to_dense(module)


def _replace_all(
    model: nn.Module,
    matches: Callable[[nn.Module], bool],
    convert: Callable[[nn.Module], nn.Module],
) -> tuple[nn.Module, int]:
    """Deep-copy ``model`` and swap each outermost submodule ``matches`` accepts."""
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"expected a torch.nn.Module, got {type(model).__name__}; for TorchScript or .pt2 "
            "graphs fold the exported ONNX with lrt_deploy.export.passes.dense_equivalent instead"
        )
    copied = copy.deepcopy(model)
    if matches(copied):
        return convert(copied).train(copied.training), 1
    replaced = 0
    # Snapshot the names first: the walk must not descend into the modules it swaps in.
    targets = [name for name, sub in copied.named_modules() if name and matches(sub)]
    done: list[str] = []
    for name in targets:
        if any(name.startswith(parent + ".") for parent in done):
            continue  # inside a unit already replaced
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        old = getattr(parent, child)
        setattr(parent, child, convert(old).train(old.training))
        done.append(name)
        replaced += 1
    return copied, replaced


def dense_equivalent(model: nn.Module) -> tuple[nn.Module, int]:
    """``(copy of model, units multiplied out)``: every low-rank pair (``LowRankLinear``,
    LED ``Sequential``, ``LowRankEmbedding``) as one dense layer with its bias or padding row;
    TypeError unless ``model`` is a plain ``nn.Module``."""
    dense, count = _replace_all(model, is_lowrank_pair, _to_dense)
    logger.info("dense equivalent: %d low-rank units multiplied out", count)
    return dense, count


def standard_attention_equivalent(model: nn.Module) -> tuple[nn.Module, int]:
    """``(copy of model, modules replaced)``: every ``LinformerSelfAttention`` as standard
    softmax attention over the same query/key/value/output weights."""
    standard, count = _replace_all(
        model,
        lambda module: isinstance(module, LinformerSelfAttention),
        lambda module: module.to_standard_attention(),
    )
    logger.info("standard attention equivalent: %d Linformer attentions replaced", count)
    return standard, count
