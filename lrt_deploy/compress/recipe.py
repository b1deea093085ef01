"""The compression recipe: (budget search) -> factorize -> (heal), choosing off the test text."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy.config.heal import HealConfig
from lrt_deploy.config.lowrank import LowRankConfig
from lrt_deploy.config.ranks import BudgetRank, FidelityFloor
from lrt_deploy.errors import ConfigError, LrtDeployError, UnsupportedOperationError

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
    "check_simulatable",
    "compress_model",
    "lowrank_by_design",
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
    """Where healing trains (a list or a re-iterable stream) and chooses its best step."""

    train: Iterable[dict[str, Any]]
    #: Batches the best step is chosen on, never trained on.
    selection: list[dict[str, Any]]
    #: What ``train`` is, for the manifest.
    train_data: str
    #: What ``selection`` is, for the manifest and the report.
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
    """A stream of ``path`` to train on; the step is chosen on the shipped calibration corpus,
    or on held-back head lines of ``path`` when ``path`` contains that corpus."""
    # Held-back lines of the training corpus itself are too close to what it trains on to
    # choose a step well; the shipped corpus, never trained on, is not.
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
    """What :func:`compress_model` did."""

    #: Per-layer decisions and parameter counts.
    factorization: FactorizationResult
    #: The model as it was before factorizing (a deep copy), to compare with.
    dense: LoadedModel
    #: The config factorized with (the searched budget filled in); None when nothing was factorized
    #: (quantisation-aware healing of the dense model alone).
    config: LowRankConfig
    #: The fidelity-floor search, when one ran.
    budget_search: BudgetSearchResult | None = None
    #: The distillation run, when one ran.
    healing: HealResult | None = None
    #: Steps healing was asked for.
    heal_steps: int = 0
    #: Where healing trained and chose its step, when not on the calibration list (None: trained on
    #: the first four fifths, chosen on the last fifth).
    healing_data: HealingData | None = None
    #: With a fidelity floor, ``{"mean_cosine", "worst_cosine"}`` of the final (factorized, healed)
    #: model on the selection batches, in PyTorch.
    selection_fidelity: dict[str, float] | None = None
    #: Whether the floor held on held-out text, set by the caller once the deployed variant is
    #: measured (:func:`lrt_deploy.compress.search.judge_floor`).
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


def check_compressible(loaded: Any) -> None:
    """Raise :class:`UnsupportedOperationError` when ``loaded`` (a LoadedModel or its facts)
    has no layers to swap."""
    if not loaded.can_compress:
        raise UnsupportedOperationError(
            f"factorizing needs an nn.Module, but '{loaded.name}' is a {loaded.format} graph "
            "whose layers cannot be swapped: export it without compress=, or load the original "
            "module (.pt with trust_pickle=True, or a Hugging Face folder)"
        )


def compress_model(
    loaded: LoadedModel,
    config: LowRankConfig | None,
    batches: list[dict[str, Any]],
    *,
    heal: HealConfig | None = None,
    quantization: Any = None,
    progress: Callable[[str], None] = lambda _line: None,
    healing_data: HealingData | None = None,
    probe: list[dict[str, Any]] | None = None,
    probe_data: str = "probe batches",
) -> CompressionOutcome:
    """Factorize ``loaded.module`` in place (a FidelityFloor's budget searched first), then heal
    (under ``quantization``, a FakeQuantization, when given); keeps a dense copy."""
    from lrt_deploy.compress.factorize import FactorizationResult
    from lrt_deploy.compress.heal import select_device

    check_compressible(loaded)
    if config is None and not (heal is not None and quantization is not None):
        raise ConfigError("nothing to do without a factorization: pass compress=LowRankConfig("
                          "...), or heal quantisation-aware (HealConfig.quantized=True)")
    if heal is not None:
        select_device(heal.device)  # a missing GPU fails now, not after minutes of factorizing
    dense = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
    floor = config.policy if config is not None else None
    floor = floor if isinstance(floor, FidelityFloor) else None
    split = (heal is not None and healing_data is None) or floor is not None
    fit, select = _split(batches) if split else (batches, [])
    solver_data = fit if config is not None and config.solver == "asvd" else None
    search = None
    if floor is not None:
        progress(f"searching {floor.describe()}")
        search = _search(loaded, config, floor, solver_data, select, probe, probe_data, progress)
        config = dataclasses.replace(config, policy=BudgetRank(search.budget, floor.budget_error))
    result = (_factorize(loaded, config, solver_data, progress) if config is not None
              else FactorizationResult())
    healing, options = None, {}
    if heal is not None:
        options = {**heal.options(), **_simulation_options(quantization)}
        data = healing_data or HealingData(fit, select, "", SELECTION_DATA)
        healing = _heal(loaded, dense, data, heal, progress, quantization, batches)
    outcome = CompressionOutcome(result, dense, config, search, healing,
                                 heal.steps if heal is not None else 0, healing_data,
                                 heal_options=options)
    if floor is not None:
        outcome.selection_fidelity = _fidelity(loaded.module, dense.module, select)
    return outcome


def _search(loaded: LoadedModel, config: LowRankConfig, floor: FidelityFloor,
            solver_data: list[dict[str, Any]] | None, select: list[dict[str, Any]],
            probe: list[dict[str, Any]] | None, probe_data: str,
            progress: Callable[[str], None]) -> BudgetSearchResult:
    """The budget search a FidelityFloor asks for, from its ``high`` budget down."""
    from lrt_deploy.compress.search import search_budget

    start = dataclasses.replace(config, policy=floor.start())
    return search_budget(
        loaded.module, start, solver_data, select, floor.floor, low=floor.low, high=floor.high,
        steps=floor.steps, progress=progress, probe=probe, selection_data=SELECTION_DATA,
        probe_data=probe_data,
    )


def _factorize(loaded: LoadedModel, config: LowRankConfig,
               solver_data: list[dict[str, Any]] | None,
               progress: Callable[[str], None]) -> FactorizationResult:
    """``factorize_`` with progress, refusing a config that saves nothing."""
    from lrt_deploy.compress.factorize import factorize_

    progress(f"factorizing ({config.describe()})")
    result = factorize_(loaded.module, config, calibration=solver_data)
    if not result.factorized:
        reasons = "; ".join(sorted({d.reason for d in result.kept_dense})[:3])
        raise ConfigError(
            f"{config.describe()} saves parameters in no layer ({reasons}): choose a smaller "
            "rank or budget, e.g. rank=0.25"
        )
    logger.info(result.summary())
    return result


def _simulation_options(quantization: Any) -> dict[str, Any]:
    """The manifest's record of a simulated quantisation (every weight but tables trains)."""
    if quantization is None:
        return {}
    return {"quantization": quantization.describe(), "trainable": "layers"}


def check_simulatable(precision: Any) -> None:
    """Raise unless healing can simulate ``precision`` exactly (dynamic int8 per channel, or
    4-bit weight-only with tables); pure: imports no torch."""
    from lrt_deploy.quant.recipes import DynamicInt8, Int4WeightOnly

    if isinstance(precision, DynamicInt8) and precision.per_channel:
        return
    if isinstance(precision, Int4WeightOnly) and precision.embeddings:
        return
    what = "an fp32 target" if precision is None else precision.describe()
    raise ConfigError(
        f"HealConfig.quantized=True simulates dynamic int8 per channel and int4, not {what}: "
        "use precision=DynamicInt8(per_channel=True) or precision=Int4WeightOnly()"
    )


def simulated_quantization(precision: Any) -> Any:
    """The healing loop's exact simulation of ``precision`` (see :func:`check_simulatable`)."""
    from lrt_deploy.quant.recipes import DynamicInt8
    from lrt_deploy.quant.simulate import FakeQuantization

    check_simulatable(precision)
    if isinstance(precision, DynamicInt8):
        return FakeQuantization("int8", smooth=precision.smooth,
                                weight_grid=precision.weight_grid)
    return FakeQuantization("int4", precision.block)


def _fidelity(model: Any, dense: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and worst per-row cosine of ``model``'s primary output to ``dense``'s (PyTorch)."""
    import numpy as np
    import torch

    from lrt_deploy.compress.calibration import primary_output
    from lrt_deploy.metrics import cosine_per_row

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
            "healing and a FidelityFloor need at least two calibration batches: give more "
            "calibration data"
        )
    split = max(1, len(batches) // 5)
    return batches[:-split], batches[-split:]


def _heal(
    loaded: LoadedModel, dense: LoadedModel, data: HealingData, heal: HealConfig,
    progress: Callable[[str], None], quantization: Any, smoothing_batches: list[dict[str, Any]],
) -> HealResult:
    """Heal the factorized model towards the dense one on ``data``, with progress lines."""
    from lrt_deploy.compress.heal import Healer

    source = (f"{len(data.train)} calibration batches" if isinstance(data.train, list)
              else f"a stream of {data.train_data}")
    simulated = f", {quantization.describe()} simulated" if quantization is not None else ""
    progress(f"healing: {heal.steps} distillation steps on {source} (device {heal.device}, "
             f"precision {heal.precision}{simulated})")
    healer = Healer(
        loaded.module, dense.module, lr=heal.lr, hidden_modules=_block_names(loaded.module),
        device=heal.device, precision=heal.precision, quantization=quantization,
        smoothing_batches=smoothing_batches,
        trainable="layers" if quantization is not None else "lowrank",
    )
    result = healer.run(data.train, heal.steps, data.selection)
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
