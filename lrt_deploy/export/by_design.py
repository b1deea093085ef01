"""Plan the baseline of a model built low-rank (or with Linformer attention) by design."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrt_deploy.load import LoadedModel

__all__ = ["ByDesignBaseline", "by_design_baseline"]


@dataclass
class ByDesignBaseline:
    """The baseline to build for a model that is low-rank (or Linformer) by design.

    Attributes:
        kind: ``"dense-equivalent"`` (low-rank pairs multiplied out: the same function),
            ``"standard-attention"`` (Linformer replaced: a different function) or
            ``"dense-equivalent+standard-attention"`` (both).
        note: What the report says about the baseline (see ``lrt_deploy.nn.equivalents``).
        fidelity_comparable: False when the baseline computes a different function, so the
            report must print "not comparable" instead of a cosine.
        loaded: The baseline as a model to export like any other, or None when it must be
            made on the graph by folding the by-design model's raw ONNX (TorchScript and
            ``.pt2`` inputs, whose module classes are gone).
        units: Low-rank units multiplied out and Linformer attentions replaced in ``loaded``
            (the ONNX path counts its folded pairs instead).
    """

    kind: str
    note: str
    fidelity_comparable: bool
    loaded: LoadedModel | None
    units: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "note": self.note,
            "fidelity_comparable": self.fidelity_comparable,
            "made_from": "module" if self.loaded is not None else "onnx graph",
            "units": self.units,
        }


def by_design_baseline(loaded: LoadedModel) -> ByDesignBaseline | None:
    """The baseline to build for ``loaded`` (as loaded, not factorized by lrt-deploy), or
    None when it has neither low-rank layers nor Linformer attention."""
    import torch

    from lrt_deploy.nn import LinformerSelfAttention, is_lowrank_pair, lowrank_layers_in_weights
    from lrt_deploy.nn.equivalents import (
        DENSE_EQUIVALENT_NOTE,
        STANDARD_ATTENTION_NOTE,
        dense_equivalent,
        standard_attention_equivalent,
    )

    module = loaded.module
    if loaded.can_compress:
        has_linformer = any(isinstance(m, LinformerSelfAttention) for m in module.modules())
        if not has_linformer and not any(is_lowrank_pair(m) for m in module.modules()):
            return None  # an ordinary dense model: nothing to copy
        standard, attentions = (
            standard_attention_equivalent(module) if has_linformer else (module, 0)
        )
        # dense_equivalent copies again; the first copy (if any) is dropped right away.
        dense, pairs = dense_equivalent(standard)
        kinds = (["dense-equivalent"] if pairs else []) + (
            ["standard-attention"] if attentions else [])
        notes = ([DENSE_EQUIVALENT_NOTE] if pairs else []) + (
            [STANDARD_ATTENTION_NOTE] if attentions else [])
        return ByDesignBaseline(
            kind="+".join(kinds), note="; ".join(notes), fidelity_comparable=not attentions,
            loaded=dataclasses.replace(loaded, module=dense), units=pairs + attentions,
        )
    if isinstance(module, torch.export.ExportedProgram):
        state = dict(module.state_dict)
    else:
        state = dict(module.state_dict()) if callable(getattr(module, "state_dict", None)) else {}
    if not lowrank_layers_in_weights(state):
        return None
    return ByDesignBaseline(
        kind="dense-equivalent", note=DENSE_EQUIVALENT_NOTE, fidelity_comparable=True,
        loaded=None,
    )
