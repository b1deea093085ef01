"""The compression recipe, one call: (budget search) -> factorize -> (heal).

:func:`compress_model` factorizes a model in place and keeps a dense copy to compare with; the
choices it makes on data (the budget for a fidelity floor, the best healing step) are judged on
the last fifth of the calibration batches, never on the held-out test text. Healing on a large
user corpus (:func:`text_healing_data`) streams it and chooses its best step on the shipped
calibration corpus instead, which it never trains on.
:func:`lowrank_by_design` describes models built low-rank, which are not compressed further.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy.compress.config import LowRankConfig
from lrt_deploy.errors import LrtDeployError, UnsupportedOperationError

if TYPE_CHECKING:
    from lrt_deploy.compress.factorize import FactorizationResult
    from lrt_deploy.compress.heal import HealResult
    from lrt_deploy.compress.search import BudgetSearchResult, FloorVerdict
    from lrt_deploy.load import LoadedModel

__all__ = [
    "SELECTION_DATA",
    "CompressionOutcome",
    "HealingData",
    "check_compressible",
    "compress_model",
    "describe_config",
    "lowrank_by_design",
    "needs_calibration",
    "simulated_quantization",
    "text_healing_data",
]

logger = logging.getLogger(__name__)

#: Where data-driven choices are judged (written to the manifest and the report).
SELECTION_DATA = "last fifth of the calibration batches"
#: Lines of a user's healing corpus held back to choose the best step on, when the shipped
#: calibration corpus cannot serve (the user's corpus contains it).
HOLDBACK_LINES = 256
#: Lines of a user's corpus compared with the shipped calibration corpus to detect that it
#: contains it (a full scan would read a corpus of hundreds of MB once more).
OVERLAP_CHECK_LINES = 4096


@dataclass
class HealingData:
    """Where healing trains and where it chooses its best step, when that is not the
    calibration list (a large text corpus, streamed).

    Attributes:
        train: Training batches, a list or a re-iterable stream
            (:class:`lrt_deploy.data.stream.StreamingTextBatches`).
        selection: Batches the best step is chosen on, never trained on.
        train_data: What ``train`` is, for the manifest.
        selection_data: What ``selection`` is, for the manifest and the report.
    """

    train: Iterable[dict[str, Any]]
    selection: list[dict[str, Any]]
    train_data: str
    selection_data: str

    def to_dict(self) -> dict[str, Any]:
        """The manifest's description (with how far the stream read, when it is one)."""
        info: dict[str, Any] = {"training_data": self.train_data,
                                "streamed": not isinstance(self.train, list)}
        for name in ("lines_read", "passes", "batch_size"):
            if hasattr(self.train, name):
                info[name] = getattr(self.train, name)
        return info


def text_healing_data(
    loaded: LoadedModel, path: str | Path, *, batch_size: int = 32, seed: int = 0
) -> HealingData:
    """Healing data for a large text corpus: a stream of ``path`` to train on, and the shipped
    calibration corpus to choose the best step on.

    Choosing the step on held-back lines of the training corpus itself picked a worse step in
    the GPU runs (those lines are too close to what it trains on); the shipped corpus, never
    trained on, picked well. Only when the corpus's first lines contain shipped calibration
    sentences (so it may train on them) are its first :data:`HOLDBACK_LINES` lines held back
    and used instead.
    """
    from lrt_deploy.data.readers import CALIBRATION_TEXT
    from lrt_deploy.data.stream import (
        StreamingTextBatches,
        healing_data,
        read_head,
        shipped_lines,
    )

    name = Path(path).name
    shipped = shipped_lines(CALIBRATION_TEXT)
    if not set(read_head(path, OVERLAP_CHECK_LINES)) & set(shipped):
        stream = StreamingTextBatches(path, loaded.tokenize, batch_size=batch_size, seed=seed)
        selection = [loaded.tokenize(shipped[i : i + batch_size])
                     for i in range(0, len(shipped), batch_size)]
        return HealingData(stream, selection, f"{name} (streamed)",
                           f"the shipped {CALIBRATION_TEXT} (never trained on)")
    stream, selection = healing_data(path, loaded.tokenize, holdback_lines=HOLDBACK_LINES,
                                     batch_size=batch_size, seed=seed)
    return HealingData(
        stream, selection, f"{name} (streamed, first {HOLDBACK_LINES} lines held back)",
        f"the first {HOLDBACK_LINES} lines of {name}, held back from training ({name} "
        f"contains shipped {CALIBRATION_TEXT} sentences)",
    )


@dataclass
class CompressionOutcome:
    """What :func:`compress_model` did.

    Attributes:
        factorization: Per-layer decisions and parameter counts.
        dense: The model as it was before factorizing (a deep copy), to compare with.
        config: The config factorized with (the searched budget filled in); None when
            nothing was factorized (quantisation-aware healing of the dense model alone).
        budget_search: The fidelity-floor search, when one ran.
        healing: The distillation run, when one ran.
        heal_steps: Steps healing was asked for.
        healing_data: Where healing trained and chose its step, when not on the calibration
            list (None: trained on the first four fifths, chosen on the last fifth).
        selection_fidelity: With a fidelity floor, ``{"mean_cosine", "worst_cosine"}`` of the
            final (factorized, healed) model on the selection batches, in PyTorch.
        floor_verdict: Whether the floor held on held-out text, set by the caller once the
            deployed variant is measured (:func:`lrt_deploy.compress.search.judge_floor`).
    """

    factorization: FactorizationResult
    dense: LoadedModel
    config: LowRankConfig
    budget_search: BudgetSearchResult | None = None
    healing: HealResult | None = None
    heal_steps: int = 0
    healing_data: HealingData | None = None
    selection_fidelity: dict[str, float] | None = None
    floor_verdict: FloorVerdict | None = None
    heal_options: dict[str, Any] = field(default_factory=dict)

    @property
    def healing_selection(self) -> str:
        """What healing chose its best step on."""
        return self.healing_data.selection_data if self.healing_data else SELECTION_DATA

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``lowrank`` section."""
        healing = None
        if self.healing is not None:
            result = self.healing
            healing = {
                "steps": self.heal_steps,
                "steps_run": result.steps_run,
                "best_step": result.best_step,
                "seconds": result.seconds,
                "device": result.device,
                "precision": result.precision,
                **self.heal_options,
                "selection_data": self.healing_selection,
                **(self.healing_data.to_dict() if self.healing_data else
                   {"training_data": "first four fifths of the calibration batches",
                    "streamed": False}),
                "before": {"mean_cosine": result.before_mean_cosine,
                           "worst_cosine": result.before_worst_cosine},
                "after": {"mean_cosine": result.after_mean_cosine,
                          "worst_cosine": result.after_worst_cosine},
                "stopped_early": result.stopped_early,
            }
        search = None
        if self.budget_search is not None:
            search = {**self.budget_search.to_dict(), "selection_data": SELECTION_DATA}
        floor = None if self.floor_verdict is None else self.floor_verdict.to_dict()
        return {
            "origin": ("post-training factorization" if self.config is not None
                       else "quantisation-aware healing"),
            "config": self.config.to_dict() if self.config is not None else None,
            "layers": [d.to_dict() for d in self.factorization.layers],
            "params_before": self.factorization.params_before,
            "params_after": self.factorization.params_after,
            "budget_search": search,
            "healing": healing,
            "fidelity_floor": floor,
        }


def describe_config(config: LowRankConfig) -> str:
    """A short description of what a factorization config asks for, for progress and errors."""
    if config.policy == "budget":
        what = f"budget {config.budget:g} of the candidate parameters"
    elif config.policy == "energy":
        what = f"energy {config.energy:g} of each layer's spectrum"
    else:
        what = f"rank {config.rank}"
    embeddings = ", embeddings too" if config.factorize_embeddings else ""
    return f"{config.solver}, {what}{embeddings}"


def check_compressible(loaded: LoadedModel) -> None:
    """Raise :class:`UnsupportedOperationError` when ``loaded`` has no layers to swap."""
    if not loaded.can_compress:
        raise UnsupportedOperationError(
            f"--rank needs an nn.Module to factorize, but '{loaded.name}' is a "
            f"{loaded.format} graph whose layers cannot be swapped: export it without "
            "--rank, or load the original module (.pt with --trust-pickle, or a Hugging "
            "Face folder)"
        )


def needs_calibration(
    config: LowRankConfig, heal_steps: int = 0, fidelity_floor: float | None = None
) -> bool:
    """Whether :func:`compress_model` with these arguments reads calibration batches."""
    return config.solver == "asvd" or bool(heal_steps) or fidelity_floor is not None


def compress_model(
    loaded: LoadedModel,
    config: LowRankConfig | None,
    batches: list[dict[str, Any]],
    *,
    heal_steps: int = 0,
    fidelity_floor: float | None = None,
    progress: Callable[[str], None] = lambda _line: None,
    device: str = "auto",
    heal_precision: str = "auto",
    healing_data: HealingData | None = None,
    probe: list[dict[str, Any]] | None = None,
    probe_data: str = "probe batches",
    heal_quantization: Any = None,
    heal_lr: float = 1e-4,
) -> CompressionOutcome:
    """Factorize ``loaded.module`` in place: search a budget, factorize, heal, as asked.

    Args:
        loaded: The model; its module is replaced layer by layer.
        config: Factorization settings (with ``fidelity_floor``, the budget is searched);
            None factorizes nothing: quantisation-aware healing of the dense model alone
            (needs ``heal_steps`` and ``heal_quantization``).
        batches: Calibration batches (needed when :func:`needs_calibration` says so).
        heal_steps: Distil towards the dense model for this many steps (keeps the best step).
        fidelity_floor: Search the smallest budget keeping this mean cosine to the dense model.
        progress: Called with a short line as each step starts.
        device: Where healing runs: ``"auto"`` (CUDA when PyTorch sees a GPU), ``"cpu"`` or
            ``"cuda"``. Factorization and the search stay on the CPU.
        heal_precision: Healing autocast: ``"auto"`` (bf16/fp16 on a GPU, fp32 on CPU),
            ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        healing_data: Heal on this (e.g. :func:`text_healing_data`, a streamed corpus) instead
            of the first four fifths of ``batches``.
        probe: Batches of other text whose drop from the selection batches sets the search's
            margin (e.g. the shipped different-domain held-out set).
        probe_data: Name of the probe data, for the manifest and the report.
        heal_quantization: Heal quantisation-aware: a
            :class:`~lrt_deploy.quant.simulate.FakeQuantization` (see
            :func:`simulated_quantization`) the student computes under while healing; every
            weight but the embedding tables then trains (``trainable="layers"``).
        heal_lr: Peak learning rate of healing.

    Returns:
        The :class:`CompressionOutcome`, with the dense copy to compare against.

    Raises:
        UnsupportedOperationError: The model is a graph whose layers cannot be swapped.
        LrtDeployError: Nothing would be saved, too little calibration data, or
            ``device="cuda"`` without a GPU (checked before any work).
    """
    from lrt_deploy.compress.factorize import FactorizationResult, factorize_
    from lrt_deploy.compress.heal import select_device
    from lrt_deploy.compress.search import search_budget

    check_compressible(loaded)
    if config is None and not (heal_steps and heal_quantization is not None):
        raise LrtDeployError("nothing to do without a factorization: add --rank/--budget, or "
                             "heal quantisation-aware (--heal STEPS --heal-quantized)")
    if heal_steps:
        select_device(device)  # a missing GPU fails now, not after minutes of factorizing
    dense = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
    split = (heal_steps and healing_data is None) or fidelity_floor is not None
    fit, select = _split(batches) if split else (batches, [])
    solver_data = fit if config is not None and config.solver == "asvd" else None
    search = None
    if config is None:
        result = FactorizationResult()
    elif fidelity_floor is not None:
        progress(f"searching the smallest budget with mean cosine >= {fidelity_floor}")
        search = search_budget(
            loaded.module, config, solver_data, select, fidelity_floor, progress=progress,
            probe=probe, selection_data=SELECTION_DATA, probe_data=probe_data,
        )
        config = dataclasses.replace(config, budget=search.budget)
    if config is not None:
        progress(f"factorizing ({describe_config(config)})")
        result = factorize_(loaded.module, config, calibration=solver_data)
        if not result.factorized:
            reasons = "; ".join(sorted({d.reason for d in result.kept_dense})[:3])
            raise LrtDeployError(
                f"{describe_config(config)} saves parameters in no layer ({reasons}): choose a "
                "smaller rank or budget, e.g. --rank 0.25"
            )
        logger.info(result.summary())
    options: dict[str, Any] = {"device_asked": device, "precision_asked": heal_precision,
                               "lr": heal_lr}
    if heal_quantization is not None:
        options["quantization"] = heal_quantization.describe()
        options["trainable"] = "layers"
    healing = None
    if heal_steps:
        data = healing_data or HealingData(fit, select, "", SELECTION_DATA)
        healing = _heal(loaded, dense, data, heal_steps, progress, options, heal_quantization,
                        smoothing_batches=batches)
    outcome = CompressionOutcome(result, dense, config, search, healing, heal_steps,
                                 healing_data, heal_options=options if heal_steps else {})
    if fidelity_floor is not None:
        outcome.selection_fidelity = _fidelity(loaded.module, dense.module, select)
    return outcome


def simulated_quantization(precision: Any) -> Any:
    """The healing loop's simulation of a target precision recipe
    (:mod:`lrt_deploy.quant.recipes`): dynamic int8 per channel (outlier smoothing
    included, when the recipe smooths) and 4-bit weight-only with embedding tables are
    simulated exactly (tested against ONNX Runtime).

    Raises:
        LrtDeployError: No precision (fp32), or a recipe the simulation does not mirror.
    """
    from lrt_deploy.quant.recipes import DynamicInt8, Int4WeightOnly
    from lrt_deploy.quant.simulate import FakeQuantization

    if isinstance(precision, DynamicInt8) and precision.per_channel:
        return FakeQuantization("int8", smooth=precision.smooth,
                                weight_grid=precision.weight_grid)
    if isinstance(precision, Int4WeightOnly) and precision.embeddings:
        return FakeQuantization("int4", precision.block)
    what = "an fp32 target" if precision is None else precision.describe()
    raise LrtDeployError(
        f"--heal-quantized simulates dynamic int8 per channel and int4, not {what}: add "
        "--quantize int8 (without --per-tensor/--quant-format qdq) or --quantize int4"
    )


def _fidelity(model: Any, dense: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and worst per-row cosine of ``model``'s primary output to ``dense``'s (PyTorch)."""
    import numpy as np
    import torch

    from lrt_deploy.compress.calibration import primary_output
    from lrt_deploy.compress.fidelity import cosine_per_row

    rows = []
    with torch.no_grad():
        for batch in batches:
            reference = primary_output(dense(**batch)).detach().cpu().numpy()
            output = primary_output(model(**batch)).detach().cpu().numpy()
            rows.append(cosine_per_row(reference, output))
    values = np.concatenate(rows)
    return {"mean_cosine": float(values.mean()), "worst_cosine": float(values.min())}


def _split(batches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if len(batches) < 2:
        raise LrtDeployError(
            "--heal and --fidelity-floor need at least two calibration batches: give more "
            "calibration data"
        )
    split = max(1, len(batches) // 5)
    return batches[:-split], batches[-split:]


def _heal(
    loaded: LoadedModel, dense: LoadedModel, data: HealingData, steps: int,
    progress: Callable[[str], None], options: dict[str, Any], quantization: Any = None,
    smoothing_batches: list[dict[str, Any]] | None = None,
) -> HealResult:
    """Distil the factorized model towards the dense one on ``data.train``, keeping the step
    that does best on ``data.selection`` (under ``quantization`` when given; a smoothed int8
    one measures its scales on ``smoothing_batches``, the export's calibration batches)."""
    from lrt_deploy.compress.heal import heal_

    source = (f"{len(data.train)} calibration batches" if isinstance(data.train, list)
              else f"a stream of {data.train_data}")
    simulated = f", {quantization.describe()} simulated" if quantization is not None else ""
    progress(f"healing: {steps} distillation steps on {source} (device "
             f"{options['device_asked']}, precision {options['precision_asked']}{simulated})")
    result = heal_(
        loaded.module, dense.module, data.train, steps=steps, lr=options["lr"],
        eval_batches=data.selection,
        hidden_modules=_block_names(loaded.module), progress=True,
        device=options["device_asked"], precision=options["precision_asked"],
        quantization=quantization, smoothing_batches=smoothing_batches,
        trainable="layers" if quantization is not None else "lowrank",
    )
    progress(
        f"healing kept step {result.best_step} ({result.device}, {result.precision}, "
        f"{result.seconds:.0f}s): mean cosine on {data.selection_data} "
        f"{result.before_mean_cosine:.4f} -> {result.after_mean_cosine:.4f}"
    )
    return result


def _block_names(module: Any) -> list[str]:
    """Names of the repeated blocks (the first ModuleList with several entries), whose outputs
    healing matches besides the final output."""
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
            return [f"{name}.{index}" for index in range(len(child))]
    return []


def lowrank_by_design(module: Any) -> list[dict[str, Any]]:
    """Low-rank units a model was built with, read from its modules or, for graphs whose
    module classes are gone (.pt2, TorchScript), from the shapes of its weights."""
    import torch

    from lrt_deploy.nn import lowrank_layers_in_weights, lowrank_rank

    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        return [
            {
                "name": name,
                "rank": lowrank_rank(sub),
                "type": type(sub).__name__,
                "action": "low-rank by design",
            }
            for name, sub in module.named_modules()
            if lowrank_rank(sub) is not None
        ]
    state = module.state_dict() if callable(getattr(module, "state_dict", None)) else {}
    if isinstance(module, torch.export.ExportedProgram):
        state = dict(module.state_dict)
    return [{**layer, "action": "low-rank by design"} for layer in lowrank_layers_in_weights(state)]
