"""The low-rank factors of a model as portable files: what healing on a GPU machine sends back."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lrt_deploy.errors import LrtDeployError
from lrt_deploy.nn.lowrank import is_lowrank_pair

__all__ = ["load_lowrank_factors", "lowrank_state", "save_lowrank_factors"]

_PART = "::part"


def lowrank_state(module: nn.Module, *, layers: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``module``'s low-rank units by qualified name (with ``layers``, every
    floating parameter but the embedding tables too): all that healing changed."""
    state: dict[str, torch.Tensor] = {}
    for name, unit in module.named_modules():
        if is_lowrank_pair(unit):
            for key, value in unit.state_dict().items():
                state[f"{name}.{key}" if name else key] = value.detach()
    if layers:
        from lrt_deploy.compress.heal import layer_parameters

        for key, value in layer_parameters(module).items():
            state.setdefault(key, value.detach())
    return state


def save_lowrank_factors(
    module: nn.Module,
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    max_file_bytes: int = 15 * 2**20,
    layers: bool = False,
) -> list[Path]:
    """Write ``module``'s low-rank units (and with ``layers`` every weight but the tables) as
    ``lowrank-NNN.safetensors`` shards of at most ``max_file_bytes``; returns their paths."""
    from safetensors.torch import save_file

    state = lowrank_state(module, layers=layers)
    if not state:
        raise ValueError("the model has no low-rank units to save: factorize it first")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        tensor = (value.to(dtype) if value.is_floating_point() else value).cpu().contiguous()
        row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if tensor.dim() else 1
        rows_per_part = max(1, max_file_bytes // row_bytes)
        # A tensor larger than one file (an embedding table's factor) goes in row blocks.
        parts = (
            {key: tensor}
            if tensor.dim() == 0 or tensor.shape[0] <= rows_per_part
            else {
                f"{key}{_PART}{index}": tensor[start : start + rows_per_part].contiguous()
                for index, start in enumerate(range(0, tensor.shape[0], rows_per_part))
            }
        )
        for part_key, part in parts.items():
            nbytes = part.numel() * part.element_size()
            if size + nbytes > max_file_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][part_key] = part
            size += nbytes
    paths = []
    for index, shard in enumerate(shards):
        path = out / f"lowrank-{index:03d}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    return paths


def load_lowrank_factors(module: nn.Module, folder: str | Path) -> list[dict[str, object]]:
    """Rebuild the low-rank units saved by :func:`save_lowrank_factors` in the dense ``module``
    (same architecture), in place, and load their weights as fp32."""
    from safetensors.torch import load_file

    from lrt_deploy.compress.factorize import factorize_
    from lrt_deploy.config.lowrank import LowRankConfig
    from lrt_deploy.nn.lowrank import lowrank_layers_in_weights

    paths = sorted(Path(folder).glob("lowrank-*.safetensors"))
    if not paths:
        raise LrtDeployError(f"no lowrank-*.safetensors in '{folder}': save them with "
                             "save_lowrank_factors first")
    loaded: dict[str, torch.Tensor] = {}
    for path in paths:
        loaded.update(load_file(str(path)))
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in loaded.items():
        if _PART in key:
            base, index = key.rsplit(_PART, 1)
            blocks.setdefault(base, {})[int(index)] = value
        else:
            state[key] = value
    for base, parts in blocks.items():
        state[base] = torch.cat([parts[i] for i in sorted(parts)])
    units = lowrank_layers_in_weights(state)
    names = {str(unit["name"]) for unit in units}
    config = LowRankConfig(
        rank=1, solver="svd",
        factorize_embeddings=any(unit["type"] == "LowRankEmbedding" for unit in units),
        rank_overrides={str(unit["name"]): int(unit["rank"]) for unit in units},  # type: ignore[call-overload]
    )
    rebuilt: set[str] = set()
    if names:  # shards of a dense model healed with layers=True hold no unit
        result = factorize_(module, config, filter_fn=lambda _m, name: name in names)
        rebuilt = {d.name for d in result.factorized}
    if rebuilt != names:
        raise LrtDeployError(
            f"the saved factors do not fit this model ({len(names - rebuilt)} units not "
            "rebuilt): load them into the architecture they were saved from"
        )
    reference = module.state_dict()
    missing = [key for key in state if key not in reference]
    if missing:
        raise LrtDeployError(f"the saved factors name {missing[:3]} which this model lacks")
    with torch.no_grad():
        for key, value in state.items():
            target = reference[key]
            if target.shape != value.shape:
                raise LrtDeployError(
                    f"{key}: saved shape {tuple(value.shape)} != model {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
    return units
