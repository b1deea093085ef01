"""Healing: a distillation of a factorized student to its dense teacher, on CPU or a GPU.

Truncation errors compound through depth; optimiser steps on calibration text let the low-rank
factors absorb each other's errors. Small runs cycle a list of batches on CPU; large runs stream a
corpus (:class:`lrt_deploy.data.stream.StreamingTextBatches`) on a GPU under bf16/fp16 autocast,
computing the teacher's targets batch by batch. The learning rate warms up linearly, then decays
along a cosine. ``heal_`` never hands back a model that is worse on the evaluation batches (keep
them out of training) than the one it was given.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lrt_deploy.compress.calibration import primary_output
from lrt_deploy.compress.fidelity import cosine_per_row
from lrt_deploy.errors import LrtDeployError
from lrt_deploy.nn.lowrank import LowRankEmbedding, is_lowrank_pair
from lrt_deploy.quant.simulate import (
    FakeQuantization,
    quantization_aware,
    smoothing_scales,
    snap_to_grid_,
)

__all__ = [
    "PRECISIONS",
    "TRAINABLE",
    "HealResult",
    "autocast_dtype",
    "heal_",
    "layer_parameters",
    "lr_multiplier",
    "select_device",
]

logger = logging.getLogger(__name__)

TRAINABLE = ("lowrank", "linear", "layers", "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

Batch = Mapping[str, Any]


@dataclass
class HealResult:
    """What one ``heal_`` call did, judged on the evaluation batches.

    Attributes:
        before_mean_cosine: Mean per-row cosine of the student's primary output to the
            teacher's before healing.
        before_worst_cosine: Worst per-row cosine before healing.
        after_mean_cosine: Mean cosine of the returned (best) weights.
        after_worst_cosine: Worst cosine of the returned weights.
        steps_run: Optimiser steps taken.
        best_step: Step whose weights were kept; 0 when no step beat the initial weights,
            which were then restored.
        seconds: Wall time of the call.
        stopped_early: Why training stopped before ``steps``, e.g. a non-finite loss; None
            when it ran them all.
        history: One ``{"step", "loss", "mean_cosine", "worst_cosine", "lr"}`` dict per
            evaluation.
        device: Where it trained (``"cpu"``, ``"cuda:0"``...).
        precision: ``"fp32"``, or the autocast dtype (``"bfloat16"``, ``"float16"``).
    """

    before_mean_cosine: float
    before_worst_cosine: float
    after_mean_cosine: float
    after_worst_cosine: float
    steps_run: int
    best_step: int
    seconds: float
    stopped_early: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    quantization: str | None = None

    @property
    def improved(self) -> bool:
        """Whether healing changed the weights (a step beat the initial ones)."""
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line: the fidelity change and which step was kept."""
        how = self.precision
        if self.quantization:
            how = f"{how}, {self.quantization} simulated"
        text = (
            f"healed {self.steps_run} steps in {self.seconds:.0f}s on {self.device} "
            f"({how}): mean cosine "
            f"{self.before_mean_cosine:.4f} -> {self.after_mean_cosine:.4f}, worst "
            f"{self.before_worst_cosine:.4f} -> {self.after_worst_cosine:.4f}"
        )
        if self.improved:
            return f"{text} (best at step {self.best_step})"
        return f"{text} (no step improved; initial weights kept)"


def _as_module(model: Any, role: str) -> nn.Module:
    # LoadedModel-like wrappers hold the trainable nn.Module in `.module`; their own
    # forward() runs under no_grad, so train through the module.
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(
        f"{role} must be an nn.Module or hold one in .module, got {type(model).__name__}"
    )


def layer_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """What ``trainable="layers"`` trains, by qualified name: every floating parameter but the
    embedding tables (a table row moves only when its token is in the training text, so tuning
    tables would fit them to the corpus's vocabulary)."""
    tables = {id(p) for m in module.modules() if isinstance(m, nn.Embedding)
              for p in m.parameters()}
    return {name: p for name, p in module.named_parameters()
            if p.is_floating_point() and id(p) not in tables}


def _trainable_parameters(student: nn.Module, trainable: str) -> list[nn.Parameter]:
    if trainable == "all":
        return [p for p in student.parameters() if p.is_floating_point()]
    if trainable == "layers":
        return list(layer_parameters(student).values())
    params: list[nn.Parameter] = []
    for module in student.modules():
        # "linear" leaves factorized embedding tables as they are: their shared projection
        # would otherwise be fitted to the tokens of the training corpus alone.
        if is_lowrank_pair(module) and not (
            trainable == "linear" and isinstance(module, LowRankEmbedding)
        ):
            params.extend(module.parameters())
    if not params:
        raise ValueError(
            "the student has no low-rank units to heal: factorize it first, or pass "
            "trainable='all' to fine-tune every parameter"
        )
    return params


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Capture:
    """Forward hooks keeping the primary output of named submodules."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        named = dict(model.named_modules())
        missing = [name for name in names if name not in named]
        if missing:
            raise KeyError(f"model has no modules named {missing}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [named[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[name] = primary_output(output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return 1.0 - nn.functional.cosine_similarity(student, teacher, dim=-1).mean()


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # Normalised by the teacher's energy so every matched layer weighs about the same.
    return (student - teacher).square().mean() / teacher.square().mean().clamp(min=1e-12)


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device healing runs on: ``"auto"`` (or None) is CUDA when PyTorch sees a GPU, else
    the CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` are taken as given.

    Raises:
        LrtDeployError: ``"cuda"`` was asked for but PyTorch sees no CUDA device, or the name
            is not a device.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LrtDeployError(
            f"unknown device {device!r}: use --device auto, cpu or cuda"
        ) from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LrtDeployError(
            "--device cuda was asked for but PyTorch sees no CUDA GPU: install a CUDA build of "
            "torch, or use --device auto or cpu"
        )
    if chosen.type not in ("cpu", "cuda"):
        raise LrtDeployError(f"unsupported healing device {device!r}: use auto, cpu or cuda")
    return chosen


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None means plain fp32.

    ``"auto"`` is bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU (CPU
    autocast is slower than fp32 for these small matrices).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lr_multiplier(step: int, steps: int, warmup_steps: int, final_fraction: float = 0.0) -> float:
    """Learning-rate factor at optimiser step ``step`` (1-based) of ``steps``: a linear warm-up
    over ``warmup_steps`` to 1, then a cosine decay to ``final_fraction`` at the last step."""
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    decay_steps = steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batch_stream(batches: Iterable[Batch]) -> Iterator[tuple[int | None, Batch]]:
    """(cache key, batch) forever: a Sequence is cycled (key = its index, so the teacher's
    targets can be cached); any other iterable is re-iterated pass after pass (key None: targets
    are computed on the fly and dropped). A one-shot iterator ends when it runs dry."""
    if isinstance(batches, Sequence):
        while True:
            yield from enumerate(batches)
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield None, batch
        if not produced or iter(batches) is batches:
            return


def heal_(
    student: nn.Module | Any,
    teacher: nn.Module | Callable[..., Any],
    batches: Iterable[Batch],
    *,
    steps: int,
    lr: float = 1e-4,
    eval_batches: Sequence[Batch] | None = None,
    eval_every: int | None = None,
    hidden_modules: Sequence[str] = (),
    trainable: str = "lowrank",
    progress: bool = True,
    device: str | torch.device | None = None,
    precision: str = "auto",
    warmup_steps: int | None = None,
    final_lr_fraction: float = 0.0,
    quantization: FakeQuantization | str | None = None,
    smoothing_batches: Sequence[Batch] | None = None,
) -> HealResult:
    """Distil the factorized ``student`` towards the dense ``teacher``, in place.

    The loss is ``1 - cosine`` between the primary outputs (a tensor itself, a dict's first
    value, a ``ModelOutput``'s ``last_hidden_state``): cosine is what fidelity is judged by and
    ignores the scale of normalised embeddings. ``hidden_modules`` adds the relative MSE of
    named submodules' outputs (e.g. each transformer layer), which gives many more targets per
    sentence than a pooled embedding. Adam runs in eval mode (no dropout, so the targets are
    exact) with gradients clipped to norm 1; the learning rate warms up linearly for
    ``warmup_steps`` and then follows a cosine down to ``final_lr_fraction * lr``.

    ``batches`` is either a list (cycled; the teacher's targets are cached, right for a few
    hundred sentences on CPU) or any re-iterable stream such as
    :class:`lrt_deploy.data.stream.StreamingTextBatches` (the teacher runs on each batch as it
    comes and nothing is kept, so the corpus can be far larger than memory).

    By default only the low-rank units' factors train: the error lives there and the rest of
    the student still equals the teacher. The fidelity on ``eval_batches`` is measured in fp32
    before training and every ``eval_every`` steps; the best weights are kept and, when no step
    beats the initial weights (or the loss diverges), the initial weights are restored.

    Args:
        student: The factorized model (or an object holding it in ``.module``), called as
            ``student(**batch)``; modified in place.
        teacher: The dense reference, an ``nn.Module`` (or holder) or any callable.
        batches: Training batches of keyword arguments (list or stream, see above).
        steps: Optimiser steps, >= 1.
        lr: Peak Adam learning rate.
        eval_batches: Batches the best step is chosen on; keep them out of ``batches``. The
            default (the training list) only measures the fit to the training data and is
            refused for a stream.
        eval_every: Steps between evaluations; default ``max(1, steps // 10)``.
        hidden_modules: Names of submodules present in both models whose outputs to match
            too; the teacher must then be an ``nn.Module``.
        trainable: ``"lowrank"`` (the factors of low-rank units), ``"linear"`` (those of
            low-rank linear layers only: factorized embeddings stay as factorized),
            ``"layers"`` (every parameter but the embedding tables, dense layers included:
            what quantisation-aware healing needs, since the export rounds those too) or
            ``"all"``.
        progress: Show a tqdm progress bar.
        device: Where to train: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``; None
            keeps the student where it is. Both models are moved there for the run and moved
            back afterwards.
        precision: ``"auto"`` (bf16/fp16 autocast on a GPU, fp32 on CPU), ``"fp32"``,
            ``"bf16"`` or ``"fp16"`` (with loss scaling).
        warmup_steps: Linear warm-up steps; default ``min(100, steps // 10)``.
        final_lr_fraction: Learning rate at the last step, as a fraction of ``lr``.
        quantization: Simulate the deployed precision in the loop (``"int8"``, ``"int4"`` or
            a :class:`~lrt_deploy.quant.simulate.FakeQuantization`): the student's
            layers compute on fake-quantised values while training and while being judged, so
            the step kept is the best one after rounding, and its trained weights are
            returned snapped to the export's grid (:func:`~lrt_deploy.quant.simulate.
            snap_to_grid_`). Use fp32 ``precision`` with it (bf16's 8-bit mantissa is as
            coarse as the int8 grid).
        smoothing_batches: With a smoothed int8 ``quantization``: the export's calibration
            batches, on whose first rows the outlier-smoothing scales are measured (as the
            export will measure them) before training, at each evaluation and for the kept
            weights.

    Returns:
        Before/after fidelity, steps run, the step kept, the device and precision.

    Raises:
        ValueError: Invalid ``steps``, ``trainable``, ``precision``, empty batches, a stream
            without ``eval_batches``, or a student without low-rank units under
            ``trainable="lowrank"``.
        LrtDeployError: ``device="cuda"`` without a GPU.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if isinstance(batches, Sequence) and not batches:
        raise ValueError("heal_ needs at least one training batch")
    spec = FakeQuantization(quantization) if isinstance(quantization, str) else quantization
    if spec is not None and spec.smooth and not smoothing_batches:
        raise ValueError("a smoothed int8 simulation needs smoothing_batches (the export's "
                         "calibration batches)")
    student_module = _as_module(student, "student")
    teacher_fn = teacher if not hasattr(teacher, "module") else _as_module(teacher, "teacher")
    if eval_batches is None:
        if not isinstance(batches, Sequence):
            raise ValueError("healing on a stream needs eval_batches held back from the stream")
        logger.warning("no eval_batches given: judging healing on the training batches")
        eval_batches = batches
    every = eval_every or max(1, steps // 10)
    warmup = min(100, steps // 10) if warmup_steps is None else max(0, warmup_steps)
    home = next(student_module.parameters()).device
    target_device = home if device is None else select_device(device)
    amp_dtype = autocast_dtype(target_device, precision)
    params = _trainable_parameters(student_module, trainable)
    started = time.perf_counter()

    teacher_module = teacher_fn if isinstance(teacher_fn, nn.Module) else None
    teacher_home = None
    if teacher_module is not None:
        teacher_home = next(teacher_module.parameters(), torch.empty(0)).device
        teacher_module.to(target_device)
    student_module.to(target_device)

    student_capture = _Capture(student_module, hidden_modules) if hidden_modules else None
    teacher_capture = None
    if hidden_modules:
        teacher_capture = _Capture(_as_module(teacher_fn, "teacher"), hidden_modules)
    teacher_cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def autocast() -> Any:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=target_device.type, dtype=amp_dtype)

    def teacher_targets(key: int | None, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if key is not None and key in teacher_cache:
            return teacher_cache[key]
        with torch.no_grad(), autocast():
            output = primary_output(teacher_fn(**inputs)).detach()
        hidden = {} if teacher_capture is None else dict(teacher_capture.outputs)
        targets = (output, {k: v.detach() for k, v in hidden.items()})
        if key is not None:
            teacher_cache[key] = targets
        return targets

    eval_inputs = [_to_device(batch, target_device) for batch in eval_batches]
    if not eval_inputs:
        raise ValueError("heal_ needs at least one evaluation batch")

    def evaluate() -> tuple[float, float]:
        # fp32 and no autocast: the figure the kept step is chosen by is the exported model's.
        with torch.no_grad():
            outputs = [
                primary_output(student_module(**b)).float().cpu().numpy() for b in eval_inputs
            ]
        cosine = np.concatenate(
            [cosine_per_row(r, o) for r, o in zip(eval_reference, outputs, strict=True)]
        )
        return float(cosine.mean()), float(cosine.min())

    requires_grad = {id(p): p.requires_grad for p in student_module.parameters()}
    chosen = {id(p) for p in params}
    was_training = student_module.training
    student_module.eval()
    for p in student_module.parameters():
        p.requires_grad_(id(p) in chosen)
    simulation = contextlib.ExitStack()
    # Outlier-smoothing scales follow the weights: measured again before each evaluation.
    scales: dict[nn.Module, torch.Tensor] = {}

    def measure_scales() -> None:
        if spec is not None and spec.smooth:
            scales.clear()
            scales.update(smoothing_scales(student_module, smoothing_batches))

    try:
        if spec is not None:
            measure_scales()
            simulation.enter_context(quantization_aware(student_module, spec, scales))
        with torch.no_grad():
            eval_reference = [
                primary_output(teacher_fn(**b)).float().cpu().numpy() for b in eval_inputs
            ]
        before_mean, before_worst = evaluate()
        best_mean, best_worst, best_step = before_mean, before_worst, 0
        best_state = [p.detach().clone() for p in params]
        history: list[dict[str, float]] = []
        optimizer = torch.optim.Adam(params, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda index: lr_multiplier(index + 1, steps, warmup, final_lr_fraction)
        )
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        stopped_early = None
        steps_run = 0
        stream = _batch_stream(batches)
        bar = tqdm(total=steps, desc="healing", unit="step", disable=not progress)
        for step in range(1, steps + 1):
            try:
                key, batch = next(stream)
            except StopIteration:
                stopped_early = f"the training data ran out after {steps_run} steps"
                logger.warning("healing stopped: %s", stopped_early)
                break
            inputs = _to_device(batch, target_device)
            target, target_hidden = teacher_targets(key, inputs)
            with autocast():
                output = primary_output(student_module(**inputs))
            loss = _cosine_loss(output.float(), target.float())
            if student_capture is not None:
                for name in hidden_modules:
                    loss = loss + _relative_mse(
                        student_capture.outputs[name].float(), target_hidden[name].float()
                    ) / len(hidden_modules)
            if not loss.requires_grad:
                raise ValueError(
                    "none of the trainable parameters reaches the healed outputs (e.g. only an "
                    "unused pooler was factorized): heal with trainable='all' or factorize more"
                )
            if not torch.isfinite(loss):
                stopped_early = f"loss became {loss.item()} at step {step}"
                logger.warning("healing stopped: %s", stopped_early)
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            steps_run = step
            bar.update(1)
            if step % every == 0 or step == steps:
                measure_scales()
                mean, worst = evaluate()
                history.append(
                    {"step": step, "loss": loss.item(), "mean_cosine": mean,
                     "worst_cosine": worst, "lr": optimizer.param_groups[0]["lr"]}
                )
                bar.set_postfix(loss=f"{loss.item():.4f}", cosine=f"{mean:.4f}")
                if mean > best_mean:
                    best_mean, best_worst, best_step = mean, worst, step
                    best_state = [p.detach().clone() for p in params]
        bar.close()
        with torch.no_grad():
            for param, saved in zip(params, best_state, strict=True):
                param.copy_(saved)
        if spec is not None and best_step > 0:
            # The kept weights go back on the grid the export rounds to (see snap_to_grid_).
            measure_scales()
            snap_to_grid_(student_module, spec, only=chosen, scales=scales)
    finally:
        simulation.close()
        for p in student_module.parameters():
            p.requires_grad_(requires_grad[id(p)])
        student_module.train(was_training)
        for capture in (student_capture, teacher_capture):
            if capture is not None:
                capture.remove()
        student_module.to(home)
        if teacher_module is not None and teacher_home is not None:
            teacher_module.to(teacher_home)

    result = HealResult(
        before_mean_cosine=before_mean,
        before_worst_cosine=before_worst,
        after_mean_cosine=best_mean,
        after_worst_cosine=best_worst,
        steps_run=steps_run,
        best_step=best_step,
        seconds=time.perf_counter() - started,
        stopped_early=stopped_early,
        history=history,
        device=str(target_device),
        precision=str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        quantization=None if spec is None else spec.describe(),
    )
    logger.info(result.summary())
    return result
