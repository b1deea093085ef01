"""Fidelity floors: chosen on calibration data, judged on held-out text of another domain."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lrt_deploy.compress import LowRankConfig, factorize_
from lrt_deploy.compress.calibration import primary_output
from lrt_deploy.compress.search import judge_floor, search_budget
from lrt_deploy.config import BudgetRank
from lrt_deploy.data.readers import DOMAIN_HELDOUT_TEXT as DOMAIN_HELDOUT
from lrt_deploy.data.readers import HELDOUT_TEXT as HELDOUT
from lrt_deploy.data.stream import shipped_lines
from lrt_deploy.metrics import embedding_fidelity
from tests.tiny_models import make_tiny_encoder

CONFIG = LowRankConfig(BudgetRank(0.5), solver="asvd", factorize_embeddings=True)


def _batches(generator: torch.Generator, low: int, high: int, count: int) -> list[dict]:
    # Token ids in [low, high): two ranges stand for two text domains.
    return [{"input_ids": torch.randint(low, high, (8, 6), generator=generator)}
            for _ in range(count)]


def _domains() -> dict[str, list[dict]]:
    generator = torch.Generator().manual_seed(0)
    return {
        "calibration": _batches(generator, 0, 25, 6),
        "selection": _batches(generator, 0, 25, 2),
        "probe": _batches(generator, 25, 50, 2),
        "other": _batches(generator, 25, 50, 2),
    }


def _fidelity(model: torch.nn.Module, budget: float, calibration: list, data: list) -> dict:
    candidate = copy.deepcopy(model)
    factorize_(candidate, dataclasses.replace(CONFIG, policy=BudgetRank(budget)),
               calibration=calibration)
    with torch.no_grad():
        reference = torch.cat([primary_output(model(**b)) for b in data])
        output = torch.cat([primary_output(candidate(**b)) for b in data])
    return embedding_fidelity(reference.numpy(), output.numpy())


def test_floor_met_on_calibration_but_missed_on_other_domain_is_reported_missed() -> None:
    model, data = make_tiny_encoder(), _domains()
    search = search_budget(model, CONFIG, data["calibration"], data["selection"], 0.99)
    assert search.mean_cosine >= 0.99 and search.margin == 0.0
    figures = {
        "calibration split": {"mean_cosine": search.mean_cosine, "worst_cosine": 0.0},
        "other domain": _fidelity(model, search.budget, data["calibration"], data["other"]),
    }
    assert figures["other domain"]["mean_cosine"] < 0.99  # the embeddings never saw its tokens
    verdict = judge_floor(0.99, figures, selection_data="calibration split")
    assert not verdict.met
    assert verdict.missed_on == ["other domain"] and verdict.met_on == []
    lines = verdict.lines()
    assert any("MISSED on other domain (held out)" in line for line in lines)
    assert any("on calibration split (selection data)" in line for line in lines)
    assert lines[-1].startswith("warning: the fidelity floor 0.99 was not kept on other domain")
    assert verdict.to_dict()["met"] is False


def test_probe_margin_raises_the_budget_and_helps_the_other_domain() -> None:
    model, data = make_tiny_encoder(), _domains()
    plain = search_budget(model, CONFIG, data["calibration"], data["selection"], 0.99)
    guarded = search_budget(model, CONFIG, data["calibration"], data["selection"], 0.99,
                            probe=data["probe"], probe_data="probe domain")
    assert guarded.margin > 0.0 and guarded.target == pytest.approx(0.99 + guarded.margin)
    assert guarded.mean_cosine >= guarded.target
    assert guarded.budget > plain.budget
    assert guarded.probe_data == "probe domain" and guarded.probe_mean_cosine is not None
    assert all("probe_mean_cosine" in trial for trial in guarded.trials)
    before = _fidelity(model, plain.budget, data["calibration"], data["other"])["mean_cosine"]
    after = _fidelity(model, guarded.budget, data["calibration"], data["other"])["mean_cosine"]
    assert after > before


def test_judge_floor_met_everywhere_and_errors() -> None:
    figures = {"a": {"mean_cosine": 0.995, "worst_cosine": 0.97},
               "b": {"mean_cosine": 0.991, "worst_cosine": 0.96}}
    verdict = judge_floor(0.99, figures)
    assert verdict.met and verdict.met_on == ["a", "b"] and verdict.missed_on == []
    assert not any(line.startswith("warning") for line in verdict.lines())
    with pytest.raises(ValueError, match="held-out"):
        judge_floor(0.99, {"a": figures["a"]}, selection_data="a")


def test_shipped_domain_heldout_is_a_separate_corpus() -> None:
    domain = shipped_lines(DOMAIN_HELDOUT)
    others = set(shipped_lines(HELDOUT)) | set(shipped_lines("calibration.txt"))
    assert len(domain) >= 250 and len(set(domain)) == len(domain)
    assert not others & set(domain)
