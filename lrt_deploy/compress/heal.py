"""Healing: distil a factorized student towards its dense teacher, on CPU or a GPU."""

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
from lrt_deploy.errors import LrtDeployError
from lrt_deploy.metrics import cosine_per_row
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
    "Healer",
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
    """What one healing run did; cosines are of the primary output to the teacher's."""

    before_mean_cosine: float
    before_worst_cosine: float
    #: Of the returned (best) weights.
    after_mean_cosine: float
    after_worst_cosine: float
    steps_run: int
    #: The step whose weights were kept; 0: no step beat the initial weights (restored).
    best_step: int
    seconds: float
    #: Why training stopped before its steps (data ran out, a non-finite loss), or None.
    stopped_early: str | None = None
    #: One ``{"step", "loss", "mean_cosine", "worst_cosine", "lr"}`` per evaluation.
    history: list[dict[str, float]] = field(default_factory=list)
    #: Where it trained (``"cpu"``, ``"cuda:0"``...).
    device: str = "cpu"
    #: ``"fp32"`` or the autocast dtype (``"bfloat16"``, ``"float16"``).
    precision: str = "fp32"
    #: The simulated quantisation, or None.
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
    """What ``trainable="layers"`` trains: every floating parameter but the embedding tables."""
    # A table row moves only when its token is in the training text: tuning tables would fit
    # them to the corpus's vocabulary.
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
    """The device healing runs on: ``"auto"`` (or None) is CUDA when PyTorch sees a GPU, else the
    CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` are taken as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LrtDeployError(
            f"unknown device {device!r}: use device='auto', 'cpu' or 'cuda'"
        ) from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LrtDeployError(
            "device='cuda' was asked for but PyTorch sees no CUDA GPU: install a CUDA build of "
            "torch, or use device='auto' or 'cpu'"
        )
    if chosen.type not in ("cpu", "cuda"):
        raise LrtDeployError(f"unsupported healing device {device!r}: use auto, cpu or cuda")
    return chosen


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: None means plain fp32."""
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
    """(cache key, batch) forever: a Sequence cycled (key: its index), another iterable
    re-read pass after pass (key None); a one-shot iterator ends when it runs dry."""
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


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


class Healer:
    """Distils a factorized student towards its dense teacher in place; ``run`` never returns
    weights worse on the evaluation batches than the ones it started from."""

    def __init__(
        self, student: nn.Module | Any, teacher: nn.Module | Callable[..., Any], *,
        lr: float = 1e-4, hidden_modules: Sequence[str] = (), trainable: str = "lowrank",
        device: str | torch.device | None = None, precision: str = "auto",
        quantization: FakeQuantization | str | None = None,
        smoothing_batches: Sequence[Batch] | None = None, warmup_steps: int | None = None,
        final_lr_fraction: float = 0.0, eval_every: int | None = None, progress: bool = True,
    ) -> None:
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.spec = (FakeQuantization(quantization) if isinstance(quantization, str)
                     else quantization)
        if self.spec is not None and self.spec.smooth and not smoothing_batches:
            raise ValueError("a smoothed int8 simulation needs smoothing_batches (the export's "
                             "calibration batches)")
        self.student = _as_module(student, "student")
        self.teacher = teacher if not hasattr(teacher, "module") else _as_module(teacher, "teacher")
        self.home = next(self.student.parameters()).device
        self.device = self.home if device is None else select_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.params = _trainable_parameters(self.student, trainable)
        self.lr, self.hidden_modules, self.progress = lr, tuple(hidden_modules), progress
        self.smoothing_batches, self.warmup_steps = smoothing_batches, warmup_steps
        self.final_lr_fraction, self.eval_every = final_lr_fraction, eval_every
        # Outlier-smoothing scales follow the weights: measured again before each evaluation.
        self.scales: dict[nn.Module, torch.Tensor] = {}
        self.cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def run(self, batches: Iterable[Batch], steps: int,
            eval_batches: Sequence[Batch] | None = None) -> HealResult:
        """Train ``steps`` optimiser steps on ``batches`` (a list is cycled, a stream re-read),
        keeping the step that does best on ``eval_batches``."""
        _check_steps(steps)
        if isinstance(batches, Sequence) and not batches:
            raise ValueError("healing needs at least one training batch")
        if eval_batches is None:
            if not isinstance(batches, Sequence):
                raise ValueError("healing on a stream needs eval_batches held back from the stream")
            logger.warning("no eval_batches given: judging healing on the training batches")
            eval_batches = batches
        if not eval_batches:
            raise ValueError("healing needs at least one evaluation batch")
        started = time.perf_counter()
        with self._session(eval_batches):
            before = self._evaluate()
            self.best = (*before, 0, [p.detach().clone() for p in self.params])
            self.history: list[dict[str, float]] = []
            stopped, steps_run = self._train(batches, steps)
            self._keep_best()
        result = HealResult(
            before_mean_cosine=before[0], before_worst_cosine=before[1],
            after_mean_cosine=self.best[0], after_worst_cosine=self.best[1], steps_run=steps_run,
            best_step=self.best[2], seconds=time.perf_counter() - started,
            stopped_early=stopped, history=self.history, device=str(self.device),
            precision=str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
            quantization=None if self.spec is None else self.spec.describe(),
        )
        logger.info(result.summary())
        return result

    def _train(self, batches: Iterable[Batch], steps: int) -> tuple[str | None, int]:
        """The loop: (why it stopped early or None, steps run)."""
        every = self.eval_every or max(1, steps // 10)
        warmup = min(100, steps // 10) if self.warmup_steps is None else max(0, self.warmup_steps)
        optimizer = torch.optim.Adam(self.params, lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: lr_multiplier(
            index + 1, steps, warmup, self.final_lr_fraction))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        stream, stopped, steps_run = _batch_stream(batches), None, 0
        bar = tqdm(total=steps, desc="healing", unit="step", disable=not self.progress)
        for step in range(1, steps + 1):
            try:
                key, batch = next(stream)
            except StopIteration:
                stopped = f"the training data ran out after {steps_run} steps"
                break
            loss = self._loss(key, _to_device(batch, self.device))
            if not torch.isfinite(loss):
                stopped = f"loss became {loss.item()} at step {step}"
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            steps_run = step
            bar.update(1)
            if step % every == 0 or step == steps:
                self._judge(step, loss.item(), optimizer.param_groups[0]["lr"], bar)
        bar.close()
        if stopped is not None:
            logger.warning("healing stopped: %s", stopped)
        return stopped, steps_run

    def _loss(self, key: int | None, inputs: dict[str, Any]) -> torch.Tensor:
        """1 - cosine of the primary outputs, plus the mean relative MSE of the hidden modules."""
        target, target_hidden = self._targets(key, inputs)
        with self._autocast():
            output = primary_output(self.student(**inputs))
        loss = _cosine_loss(output.float(), target.float())
        for name in self.hidden_modules:
            loss = loss + _relative_mse(self.student_capture.outputs[name].float(),
                                        target_hidden[name].float()) / len(self.hidden_modules)
        if not loss.requires_grad:
            raise ValueError(
                "none of the trainable parameters reaches the healed outputs (e.g. only an "
                "unused pooler was factorized): heal with trainable='all' or factorize more"
            )
        return loss

    def _targets(self, key: int | None,
                 inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher's outputs for ``inputs`` (cached by ``key`` when it is not None)."""
        if key is not None and key in self.cache:
            return self.cache[key]
        with torch.no_grad(), self._autocast():
            output = primary_output(self.teacher(**inputs)).detach()
        hidden = {} if self.teacher_capture is None else dict(self.teacher_capture.outputs)
        targets = (output, {k: v.detach() for k, v in hidden.items()})
        if key is not None:
            self.cache[key] = targets
        return targets

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _evaluate(self) -> tuple[float, float]:
        """Mean and worst cosine to the teacher on the evaluation batches, in fp32."""
        self._measure_scales()
        with torch.no_grad():
            outputs = [primary_output(self.student(**b)).float().cpu().numpy()
                       for b in self.eval_inputs]
        cosine = np.concatenate(
            [cosine_per_row(r, o) for r, o in zip(self.eval_reference, outputs, strict=True)]
        )
        return float(cosine.mean()), float(cosine.min())

    def _judge(self, step: int, loss: float, lr: float, bar: Any) -> None:
        """Evaluate, record the step and keep its weights when they are the best so far."""
        mean, worst = self._evaluate()
        self.history.append({"step": step, "loss": loss, "mean_cosine": mean,
                             "worst_cosine": worst, "lr": lr})
        bar.set_postfix(loss=f"{loss:.4f}", cosine=f"{mean:.4f}")
        if mean > self.best[0]:
            self.best = (mean, worst, step, [p.detach().clone() for p in self.params])

    def _keep_best(self) -> None:
        """Restore the best weights; under a simulation, snap them to the export's grid."""
        with torch.no_grad():
            for param, saved in zip(self.params, self.best[3], strict=True):
                param.copy_(saved)
        if self.spec is not None and self.best[2] > 0:
            self._measure_scales()
            snap_to_grid_(self.student, self.spec, only={id(p) for p in self.params},
                          scales=self.scales)

    def _measure_scales(self) -> None:
        if self.spec is not None and self.spec.smooth:
            self.scales.clear()
            self.scales.update(smoothing_scales(self.student, self.smoothing_batches))

    @contextlib.contextmanager
    def _session(self, eval_batches: Sequence[Batch]) -> Iterator[None]:
        """Both models on the device, hooks and simulation in place; all undone on exit."""
        teacher_module = self.teacher if isinstance(self.teacher, nn.Module) else None
        teacher_home = (next(teacher_module.parameters(), torch.empty(0)).device
                        if teacher_module is not None else None)
        requires_grad = {id(p): p.requires_grad for p in self.student.parameters()}
        was_training, chosen = self.student.training, {id(p) for p in self.params}
        hooks = self.hidden_modules
        self.student_capture = _Capture(self.student, hooks) if hooks else None
        self.teacher_capture = (_Capture(_as_module(self.teacher, "teacher"), hooks) if hooks
                                else None)
        try:
            if teacher_module is not None:
                teacher_module.to(self.device)
            self.student.to(self.device).eval()
            for p in self.student.parameters():
                p.requires_grad_(id(p) in chosen)
            self.eval_inputs = [_to_device(batch, self.device) for batch in eval_batches]
            with contextlib.ExitStack() as simulation:
                if self.spec is not None:
                    self._measure_scales()
                    simulation.enter_context(
                        quantization_aware(self.student, self.spec, self.scales))
                with torch.no_grad():
                    self.eval_reference = [primary_output(self.teacher(**b)).float().cpu().numpy()
                                           for b in self.eval_inputs]
                yield
        finally:
            for p in self.student.parameters():
                p.requires_grad_(requires_grad[id(p)])
            self.student.train(was_training)
            for capture in (self.student_capture, self.teacher_capture):
                if capture is not None:
                    capture.remove()
            self.student.to(self.home)
            if teacher_module is not None:
                teacher_module.to(teacher_home)


def heal_(
    student: nn.Module | Any,
    teacher: nn.Module | Callable[..., Any],
    batches: Iterable[Batch],
    *,
    steps: int,
    eval_batches: Sequence[Batch] | None = None,
    **options: Any,
) -> HealResult:
    """``Healer(student, teacher, **options).run(batches, steps, eval_batches)``."""
    _check_steps(steps)
    return Healer(student, teacher, **options).run(batches, steps, eval_batches)
