from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lrt_deploy.compress import HealResult, LowRankConfig, factorize_, heal_
from lrt_deploy.compress.calibration import primary_output
from lrt_deploy.nn import LowRankLinear

DIM = 16


class Teacher(nn.Module):
    def __init__(self, dict_output: bool = False) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(DIM, 48), nn.GELU(), nn.Linear(48, DIM))
        self.head = nn.Linear(DIM, DIM)
        self.dict_output = dict_output

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.head(torch.tanh(self.block(x)))
        return {"embedding": out, "other": out * 0} if self.dict_output else out


def _pair(dict_output: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = Teacher(dict_output).eval()
    student = copy.deepcopy(teacher)
    factorize_(student, LowRankConfig(rank=3, solver="svd"), filter_fn=lambda m, n: "block" in n)
    return student, teacher


def _batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(32, DIM, generator=generator)} for _ in range(count)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_heal_improves_and_trains_only_lowrank_factors() -> None:
    student, teacher = _pair()
    head_before = student.head.weight.clone()
    result = heal_(
        student,
        teacher,
        _batches(0, 8),
        steps=60,
        lr=3e-3,
        eval_batches=_batches(1, 2),
        eval_every=10,
        progress=False,
    )
    assert isinstance(result, HealResult)
    assert result.after_mean_cosine > result.before_mean_cosine + 0.01
    assert result.after_worst_cosine >= result.before_worst_cosine
    assert result.improved and result.best_step > 0 and result.steps_run == 60
    assert [h["step"] for h in result.history] == [10, 20, 30, 40, 50, 60]
    assert torch.equal(student.head.weight, head_before)  # dense layers stay the teacher's
    assert isinstance(student.block[0], LowRankLinear)
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert "best at step" in result.summary()


def test_heal_never_regresses_when_training_diverges() -> None:
    student, teacher = _pair()
    initial = _state(student)
    result = heal_(
        student,
        teacher,
        _batches(0, 4),
        steps=20,
        lr=1e6,
        trainable="all",
        eval_batches=_batches(1, 1),
        eval_every=5,
        progress=False,
    )
    assert result.best_step == 0 and not result.improved
    assert result.after_mean_cosine == result.before_mean_cosine
    for name, value in _state(student).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    assert "initial weights kept" in result.summary()


def test_heal_stops_on_non_finite_loss() -> None:
    student, teacher = _pair()
    initial = _state(student)
    batches = [{"x": torch.full((4, DIM), float("nan"))}]
    result = heal_(student, teacher, batches, steps=5, eval_batches=_batches(1, 1), progress=False)
    assert result.steps_run == 0 and result.stopped_early.startswith("loss became nan")
    for name, value in _state(student).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)


def test_heal_dict_outputs_holders_and_hidden_states() -> None:
    student, teacher = _pair(dict_output=True)
    holder = SimpleNamespace(module=student)  # LoadedModel-like
    result = heal_(
        holder,
        SimpleNamespace(module=teacher),
        _batches(0, 4),
        steps=30,
        lr=3e-3,
        eval_batches=_batches(1, 1),
        hidden_modules=["block"],
        progress=False,
    )
    assert result.after_mean_cosine >= result.before_mean_cosine
    assert result.improved
    assert result.to_dict()["steps_run"] == 30


def test_heal_argument_errors() -> None:
    torch.manual_seed(0)
    dense = Teacher()
    with pytest.raises(ValueError, match="no low-rank units"):
        heal_(copy.deepcopy(dense), dense, _batches(0, 1), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        heal_(copy.deepcopy(dense), dense, _batches(0, 1), steps=0, progress=False)
    with pytest.raises(ValueError, match="trainable must be"):
        heal_(dense, dense, _batches(0, 1), steps=1, trainable="some", progress=False)
    with pytest.raises(TypeError, match="student must be"):
        heal_(object(), dense, _batches(0, 1), steps=1, progress=False)


def test_primary_output_rules() -> None:
    tensor = torch.ones(2)
    assert primary_output(tensor) is tensor
    assert primary_output({"a": tensor, "b": tensor * 2}) is tensor
    assert primary_output((tensor, tensor * 2)) is tensor
    assert primary_output(SimpleNamespace(last_hidden_state=tensor)) is tensor
    with pytest.raises(TypeError, match="primary output"):
        primary_output("text")
