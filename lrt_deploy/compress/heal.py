"""Healing: a short distillation of a factorized student to its dense teacher, on CPU.

Truncation errors compound through depth; a few hundred optimiser steps on the calibration
batches let the low-rank factors absorb each other's errors. ``heal_`` never hands back a model
that is worse on the held-out batches than the one it was given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lrt_deploy.compress.calibration import primary_output
from lrt_deploy.compress.fidelity import cosine_per_row
from lrt_deploy.nn.lowrank import is_lowrank_pair

__all__ = [
    "TRAINABLE",
    "HealResult",
    "heal_",
]

logger = logging.getLogger(__name__)

TRAINABLE = ("lowrank", "all")

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
        history: One ``{"step", "loss", "mean_cosine", "worst_cosine"}`` dict per evaluation.
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

    @property
    def improved(self) -> bool:
        """Whether healing changed the weights (a step beat the initial ones)."""
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line: the fidelity change and which step was kept."""
        text = (
            f"healed {self.steps_run} steps in {self.seconds:.0f}s: mean cosine "
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


def _trainable_parameters(student: nn.Module, trainable: str) -> list[nn.Parameter]:
    if trainable == "all":
        return [p for p in student.parameters() if p.is_floating_point()]
    params: list[nn.Parameter] = []
    for module in student.modules():
        if is_lowrank_pair(module):
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


def heal_(
    student: nn.Module | Any,
    teacher: nn.Module | Callable[..., Any],
    batches: Sequence[Batch],
    *,
    steps: int,
    lr: float = 1e-4,
    eval_batches: Sequence[Batch] | None = None,
    eval_every: int | None = None,
    hidden_modules: Sequence[str] = (),
    trainable: str = "lowrank",
    progress: bool = True,
) -> HealResult:
    """Distil the factorized ``student`` towards the dense ``teacher``, in place.

    The loss is ``1 - cosine`` between the primary outputs (a tensor itself, a dict's first
    value, a ``ModelOutput``'s ``last_hidden_state``): cosine is what fidelity is judged by and
    ignores the scale of normalised embeddings. ``hidden_modules`` adds the relative MSE of
    named submodules' outputs (e.g. each transformer layer), which gives many more targets per
    sentence than a pooled embedding. Adam runs in eval mode (no dropout, so the targets are
    exact) with gradients clipped to norm 1.

    By default only the low-rank units' factors train: the error lives there, the rest of the
    student still equals the teacher, and a few hundred calibration sentences overfit fewer
    parameters less. The held-out fidelity is measured before training and every
    ``eval_every`` steps; the best weights are kept and, when no step beats the initial
    weights (or the loss diverges), the initial weights are restored.

    Args:
        student: The factorized model (or an object holding it in ``.module``), called as
            ``student(**batch)``; modified in place.
        teacher: The dense reference, an ``nn.Module`` (or holder) or any callable.
        batches: Training batches of keyword arguments, cycled for ``steps`` steps.
        steps: Optimiser steps, >= 1.
        lr: Adam learning rate.
        eval_batches: Held-out batches fidelity is judged on; defaults to ``batches``, which
            only measures the fit to the training data.
        eval_every: Steps between evaluations; default ``max(1, steps // 10)``.
        hidden_modules: Names of submodules present in both models whose outputs to match
            too; the teacher must then be an ``nn.Module``.
        trainable: ``"lowrank"`` (the factors of low-rank units) or ``"all"``.
        progress: Show a tqdm progress bar.

    Returns:
        Before/after fidelity, steps run and the step kept.

    Raises:
        ValueError: Invalid ``steps``, ``trainable``, empty batches, or a student without
            low-rank units under ``trainable="lowrank"``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if not batches:
        raise ValueError("heal_ needs at least one training batch")
    student_module = _as_module(student, "student")
    teacher_fn = teacher if not hasattr(teacher, "module") else _as_module(teacher, "teacher")
    if eval_batches is None:
        logger.warning("no eval_batches given: judging healing on the training batches")
        eval_batches = batches
    every = eval_every or max(1, steps // 10)
    device = next(student_module.parameters()).device
    params = _trainable_parameters(student_module, trainable)
    started = time.perf_counter()

    student_capture = _Capture(student_module, hidden_modules) if hidden_modules else None
    teacher_capture = None
    if hidden_modules:
        teacher_capture = _Capture(_as_module(teacher_fn, "teacher"), hidden_modules)
    teacher_cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def teacher_targets(index: int, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if index not in teacher_cache:
            with torch.no_grad():
                output = primary_output(teacher_fn(**inputs)).detach()
            hidden = {} if teacher_capture is None else dict(teacher_capture.outputs)
            teacher_cache[index] = (output, {k: v.detach() for k, v in hidden.items()})
        return teacher_cache[index]

    eval_inputs = [_to_device(batch, device) for batch in eval_batches]
    with torch.no_grad():
        eval_reference = [
            primary_output(teacher_fn(**b)).float().cpu().numpy() for b in eval_inputs
        ]

    def evaluate() -> tuple[float, float]:
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
    try:
        before_mean, before_worst = evaluate()
        best_mean, best_worst, best_step = before_mean, before_worst, 0
        best_state = [p.detach().clone() for p in params]
        history: list[dict[str, float]] = []
        optimizer = torch.optim.Adam(params, lr=lr)
        stopped_early = None
        steps_run = 0
        bar = tqdm(total=steps, desc="healing", unit="step", disable=not progress)
        for step in range(1, steps + 1):
            index = (step - 1) % len(batches)
            inputs = _to_device(batches[index], device)
            target, target_hidden = teacher_targets(index, inputs)
            loss = _cosine_loss(primary_output(student_module(**inputs)).float(), target.float())
            if student_capture is not None:
                for name in hidden_modules:
                    loss = loss + _relative_mse(
                        student_capture.outputs[name].float(), target_hidden[name].float()
                    ) / len(hidden_modules)
            if not torch.isfinite(loss):
                stopped_early = f"loss became {loss.item()} at step {step}"
                logger.warning("healing stopped: %s", stopped_early)
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            steps_run = step
            bar.update(1)
            if step % every == 0 or step == steps:
                mean, worst = evaluate()
                history.append(
                    {"step": step, "loss": loss.item(), "mean_cosine": mean, "worst_cosine": worst}
                )
                bar.set_postfix(loss=f"{loss.item():.4f}", cosine=f"{mean:.4f}")
                if mean > best_mean:
                    best_mean, best_worst, best_step = mean, worst, step
                    best_state = [p.detach().clone() for p in params]
        bar.close()
        with torch.no_grad():
            for param, saved in zip(params, best_state, strict=True):
                param.copy_(saved)
    finally:
        for p in student_module.parameters():
            p.requires_grad_(requires_grad[id(p)])
        student_module.train(was_training)
        for capture in (student_capture, teacher_capture):
            if capture is not None:
                capture.remove()

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
    )
    logger.info(result.summary())
    return result
