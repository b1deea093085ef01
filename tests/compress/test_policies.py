from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from lrt_deploy.compress import (
    EmbeddingIndexCounter,
    LowRankConfig,
    LowRankConfigError,
    RankedLayer,
    budget_ranks,
    collect_input_covariances,
    cosine_per_row,
    energy_ranks,
    factorize_,
    svd_spectrum,
    whitened_spectrum,
)
from lrt_deploy.compress.policies import max_saving_rank
from lrt_deploy.config import BudgetRank, EnergyRank, FidelityFloor, UniformRank
from lrt_deploy.config.ranks import policy_from_dict
from lrt_deploy.nn import LowRankEmbedding, LowRankLinear

DIM, HIDDEN, VOCAB = 32, 64, 400


def _inputs(n: int, generator: torch.Generator, directions: int = 6) -> torch.Tensor:
    """Inputs dominated by a few fixed directions with very different scales."""
    mixing = torch.randn(directions, DIM, generator=torch.Generator().manual_seed(7))
    scales = torch.logspace(1, -1, directions)[:, None]
    return torch.randn(n, directions, generator=generator) @ (mixing * scales) + 0.02 * torch.randn(
        n, DIM, generator=generator
    )


class Stack(nn.Module):
    """Layers with different spectra, so an even rank split is far from the best one."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(DIM, HIDDEN)
        self.narrow = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, DIM)
        with torch.no_grad():
            # A nearly rank-4 weight: cheap to approximate, unlike the others.
            self.head.weight.copy_(torch.randn(DIM, 4) @ torch.randn(4, DIM) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.narrow(torch.tanh(self.wide(x)))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        with torch.no_grad():
            # Real token tables have decaying spectra; a random one would be flat.
            self.embed.weight.copy_(torch.randn(VOCAB, 6) @ torch.randn(6, DIM) / 2)
            self.embed.weight.add_(0.05 * torch.randn(VOCAB, DIM))
            self.embed.weight[0] = 0.0
        self.ffn_in = nn.Linear(DIM, HIDDEN)
        self.ffn_out = nn.Linear(HIDDEN, DIM)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        return h + self.ffn_out(torch.relu(self.ffn_in(h)))


def _stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def _batches(seed: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": _inputs(64, generator)} for _ in range(count)]


def _token_batches(seed: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        # Zipf-like: low ids are frequent, most of the vocabulary is rare.
        ids = (torch.rand(8, 12, generator=generator) ** 3 * (VOCAB - 1)).long() + 1
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[4:, 9:] = 0
        ids[mask == 0] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _whitened_error(model: nn.Module, reference: nn.Module, covariances: dict) -> float:
    """Sum over layers of the mean squared output error on the calibration inputs."""
    total = 0.0
    for name, cov in covariances.items():
        dense = reference.get_submodule(name).weight.double()
        module = model.get_submodule(name)
        approx = module.to_dense().weight if isinstance(module, LowRankLinear) else module.weight
        delta = dense - approx.double()
        total += float(torch.trace(delta @ cov @ delta.T).detach())
    return total


def _cosine(reference: nn.Module, candidate: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        ref = np.concatenate([reference(**b).numpy().reshape(-1, DIM) for b in batches])
        out = np.concatenate([candidate(**b).numpy().reshape(-1, DIM) for b in batches])
    return float(cosine_per_row(ref, out).mean())


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LowRankConfig(), "needs a rank policy"),
        (lambda: LowRankConfig(policy="budget"), "needs a rank policy"),
        (lambda: LowRankConfig(UniformRank(4), rank=4), "not both"),
        (lambda: UniformRank(0), "UniformRank.rank must be"),
        (lambda: BudgetRank(1.0), "BudgetRank.budget must be a fraction in \\(0, 1\\)"),
        (lambda: BudgetRank(0.0), "BudgetRank.budget must be"),
        (lambda: BudgetRank(True), "BudgetRank.budget must be"),
        (lambda: BudgetRank(0.5, budget_error="l2"), "BudgetRank.budget_error must be"),
        (lambda: EnergyRank(1.5), "EnergyRank.energy must be a fraction in \\(0, 1\\]"),
        (lambda: EnergyRank(0.0), "EnergyRank.energy must be"),
        (lambda: FidelityFloor(1.0), "FidelityFloor.floor must be a fraction in \\(0, 1\\)"),
        (lambda: FidelityFloor(0.9, low=0.9, high=0.5), "FidelityFloor.low 0.9 is above"),
        (lambda: FidelityFloor(0.9, steps=-1), "FidelityFloor.steps must be"),
        (lambda: FidelityFloor(0.9, budget_error="l2"), "FidelityFloor.budget_error must be"),
    ],
)
def test_policy_validation_names_the_field(make, message: str) -> None:
    with pytest.raises(LowRankConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"policy": "greedy", "rank": 4}, "policy must be one of"),
        ({}, "needs a 'rank'"),
        ({"policy": "budget"}, "policy='budget' needs a 'budget'"),
        ({"policy": "energy"}, "policy='energy' needs a 'energy'"),
        ({"rank": 4, "budget": 0.5}, "budget=0.5 only applies to policy='budget'"),
        ({"policy": "budget", "budget": 0.5, "energy": 0.9}, "energy=0.9 only applies"),
        ({"rank": 4, "budget_error": "layer"}, "budget_error='layer' only applies"),
        ({"policy": "budget", "budget": 1.5}, "BudgetRank.budget must be"),
    ],
)
def test_policy_from_dict_validation(data: dict, message: str) -> None:
    with pytest.raises(LowRankConfigError, match=message):
        LowRankConfig.from_dict(data)


@pytest.mark.parametrize(
    "policy",
    [UniformRank(4), UniformRank(0.5), EnergyRank(0.95), BudgetRank(0.6),
     BudgetRank(0.6, budget_error="layer"), FidelityFloor(0.99),
     FidelityFloor(0.95, budget_error="layer", low=0.4, high=0.9, steps=2)],
)
def test_each_policy_round_trips_through_its_dict(policy) -> None:
    assert policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    config = LowRankConfig(policy, skip=["pooler"], rank_overrides={"head": 4})
    assert LowRankConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_manifest_keys_are_the_flat_ones_in_their_order() -> None:
    assert LowRankConfig(BudgetRank(0.6), factorize_embeddings=True).to_dict() == {
        "rank": None, "solver": "asvd", "factorize_embeddings": True, "min_param_saving": 0.0,
        "skip": [], "rank_overrides": {}, "damping": 1e-4, "policy": "budget", "budget": 0.6,
        "energy": None, "budget_error": "output",
    }
    assert list(LowRankConfig(rank=0.5).to_dict()) == [
        "rank", "solver", "factorize_embeddings", "min_param_saving", "skip", "rank_overrides",
        "damping", "policy", "budget", "energy", "budget_error",
    ]
    assert LowRankConfig(rank=0.5).to_dict()["policy"] == "uniform"
    assert LowRankConfig(EnergyRank(0.9)).to_dict()["energy"] == 0.9


def test_policy_config_round_trip() -> None:
    for config in (
        LowRankConfig(BudgetRank(0.6), factorize_embeddings=True, skip=["pooler"]),
        LowRankConfig(BudgetRank(0.6, budget_error="layer")),
        LowRankConfig(EnergyRank(0.95), rank_overrides={"head": 4}),
        LowRankConfig(rank=0.5),
    ):
        assert LowRankConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert LowRankConfig.from_dict({"policy": "budget", "budget": 0.5}).policy == BudgetRank(0.5)
    with pytest.raises(LowRankConfigError, match="no rank for 'x'"):
        LowRankConfig(BudgetRank(0.5)).rank_for("x", 8)


def test_factorize_refuses_a_floor_it_must_search_first() -> None:
    with pytest.raises(LowRankConfigError, match="FidelityFloor is searched"):
        factorize_(nn.Sequential(nn.Linear(8, 8)), LowRankConfig(FidelityFloor(0.9), solver="svd"))


# --- pure policies ------------------------------------------------------------------------------


def _ranked(name: str, weight: torch.Tensor, cov: torch.Tensor | None = None) -> RankedLayer:
    rows, cols = weight.shape
    spectrum = svd_spectrum(weight) if cov is None else whitened_spectrum(weight, cov)
    return RankedLayer(name, spectrum, rows + cols, 0, rows * cols, max_saving_rank(rows, cols, 0))


def test_max_saving_rank() -> None:
    assert max_saving_rank(32, 32, 0) == 15  # 16 * 64 == 1024 saves nothing
    assert max_saving_rank(32, 32, 32) == 15
    assert max_saving_rank(64, 32, 0, min_param_saving=0.5) == 10
    assert max_saving_rank(2, 2, 0) == 0


def test_energy_ranks_smallest_rank_reaching_target() -> None:
    generator = torch.Generator().manual_seed(0)
    layers = [
        _ranked("low", torch.randn(40, 3, generator=generator) @ torch.randn(3, 40)),
        _ranked("flat", torch.randn(40, 40, generator=generator)),
    ]
    choices = energy_ranks(layers, 0.9)
    assert choices["low"].rank <= 3 and choices["low"].energy_kept >= 0.9
    assert layers[0].spectrum.energy_kept(choices["low"].rank - 1) < 0.9
    assert "energy: rank" in choices["low"].reason
    # A flat 40x40 spectrum needs far more than rank 19 (the largest that saves parameters).
    assert choices["flat"].rank is None and "needs rank" in choices["flat"].reason


def test_budget_ranks_meets_budget_and_beats_even_split() -> None:
    generator = torch.Generator().manual_seed(1)
    decays = (0.5, 0.8, 0.95)
    layers = []
    for index, decay in enumerate(decays):
        u, _ = torch.linalg.qr(torch.randn(48, 24, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(24, 24, generator=generator))
        weight = (u * decay ** torch.arange(24.0)) @ v.T
        layers.append(_ranked(f"layer{index}", weight))
    per_rank = 48 + 24
    budget = 3 * 8 * per_rank  # what rank 8 everywhere costs
    choices = budget_ranks(layers, budget)
    spent = sum(layer.params_at(choices[layer.name].rank) for layer in layers)
    assert budget - per_rank < spent <= budget
    ranks = [choices[layer.name].rank for layer in layers]
    spent_per_layer = [layer.params_at(rank) for layer, rank in zip(layers, ranks, strict=True)]
    # Slower decay gets more parameters (the slowest may even stay dense: its last jump is cheap).
    assert spent_per_layer[0] < spent_per_layer[1] < spent_per_layer[2]
    budget_error = sum(
        layer.spectrum.error(rank) if rank else 0.0
        for layer, rank in zip(layers, ranks, strict=True)
    )
    even_error = sum(layer.spectrum.error(8) for layer in layers)
    assert budget_error < even_error
    assert choices["layer0"].reason.startswith("budget: keeps ")
    with pytest.raises(LowRankConfigError, match="rank 1 everywhere already needs"):
        budget_ranks(layers, 3 * per_rank - 1)


def test_budget_ranks_keeps_a_layer_dense_when_that_is_the_best_use() -> None:
    generator = torch.Generator().manual_seed(2)
    flat = _ranked("flat", torch.randn(32, 32, generator=generator) * 10)
    low = _ranked("low", torch.randn(32, 2, generator=generator) @ torch.randn(2, 32))
    # Enough for one layer dense and the other at a low rank.
    choices = budget_ranks([flat, low], 32 * 32 + 4 * 64)
    assert choices["flat"].rank is None and "dense is worth" in choices["flat"].reason
    assert choices["low"].rank is not None and choices["low"].energy_kept > 0.999


# --- factorize_ with policies ----------------------------------------------------------------


def test_uniform_policy_records_energy() -> None:
    model = _stack()
    result = factorize_(model, LowRankConfig(rank=4), calibration=_batches(0))
    for decision in result.factorized:
        assert 0.0 < decision.energy_kept <= 1.0
        assert decision.reason.startswith("uniform rank 4 keeps ")
        assert "whitened energy; asvd" in decision.reason


def test_energy_policy_in_factorize() -> None:
    model = _stack()
    result = factorize_(model, LowRankConfig(EnergyRank(0.99)), calibration=_batches(0))
    decisions = {d.name: d for d in result.layers}
    assert all(d.energy_kept >= 0.99 for d in result.factorized)
    # The nearly rank-4 head needs few directions.
    assert decisions["head"].rank <= 6 and isinstance(model.head, LowRankLinear)
    assert "energy: rank" in decisions["head"].reason


def _uniform_at_most(reference: nn.Module, params: int, calibration: list) -> nn.Module:
    """The reference factorized at the largest uniform rank costing at most ``params``."""
    rank = 1
    while (
        factorize_(
            copy.deepcopy(reference), LowRankConfig(rank=rank + 1, solver="svd")
        ).params_after
        <= params
    ):
        rank += 1
    uniform = copy.deepcopy(reference)
    assert (
        factorize_(uniform, LowRankConfig(rank=rank), calibration=calibration).params_after
        <= params
    )
    return uniform


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_budget_policy_hits_budget_and_minimises_layer_error(budget: float) -> None:
    calibration = _batches(0)
    reference = _stack()
    names = ["wide", "narrow", "head"]
    covariances = collect_input_covariances(reference, names, calibration, mask_key=None)

    budgeted = copy.deepcopy(reference)
    config = LowRankConfig(BudgetRank(budget, budget_error="layer"))
    result = factorize_(budgeted, config, calibration=calibration)
    largest_step = max(sum(d.shape) for d in result.layers)
    assert budget * result.params_before - largest_step < result.params_after
    assert result.params_after <= budget * result.params_before
    assert all(d.reason.startswith("budget: ") for d in result.layers)
    assert not any("output gain" in d.reason for d in result.layers)

    uniform = _uniform_at_most(reference, result.params_after, calibration)
    assert _whitened_error(budgeted, reference, covariances) < _whitened_error(
        uniform, reference, covariances
    )


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_budget_policy_output_error_beats_uniform(budget: float) -> None:
    calibration = _batches(0)
    reference = _stack()
    budgeted = copy.deepcopy(reference)
    config = LowRankConfig(BudgetRank(budget))
    result = factorize_(budgeted, config, calibration=calibration)
    assert result.params_after <= budget * result.params_before
    assert all("output gain" in d.reason for d in result.layers)
    uniform = _uniform_at_most(reference, result.params_after, calibration)
    held_out = _batches(99)
    assert _cosine(reference, budgeted, held_out) > _cosine(reference, uniform, held_out)


def test_budget_policy_on_rank_deficient_inputs() -> None:
    generator = torch.Generator().manual_seed(3)
    basis = torch.randn(3, DIM, generator=generator)
    calibration = [{"x": torch.randn(64, 3, generator=generator) @ basis} for _ in range(3)]
    reference = _stack()
    model = copy.deepcopy(reference)
    config = LowRankConfig(BudgetRank(0.4, budget_error="layer"))
    result = factorize_(model, config, calibration=calibration)
    assert result.params_after <= 0.4 * result.params_before
    held_out = [{"x": torch.randn(64, 3, generator=generator) @ basis}]
    with torch.no_grad():
        assert torch.isfinite(model(**held_out[0])).all()
    assert all(0.0 <= d.energy_kept <= 1.0 for d in result.layers)
    # The inputs span 3 directions, so the first layer keeps its output almost exactly.
    assert result.layers[0].energy_kept > 0.999
    assert _cosine(reference, model, held_out) > 0.99


def test_rank_overrides_are_pinned_under_budget() -> None:
    model = _stack()
    config = LowRankConfig(BudgetRank(0.5), rank_overrides={"head": 2})
    result = factorize_(model, config, calibration=_batches(0))
    decisions = {d.name: d for d in result.layers}
    assert decisions["head"].rank == 2 and decisions["head"].reason.startswith("rank 2 from")
    assert result.params_after <= 0.5 * result.params_before


# --- embeddings ---------------------------------------------------------------------------------


def test_embedding_index_counter_skips_padding() -> None:
    embedding = nn.Embedding(5, 3)
    ids = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    with EmbeddingIndexCounter({"e": embedding}) as counter:
        counter.set_token_mask(mask)
        embedding(ids)
    assert counter.counts["e"].tolist() == [0.0, 2.0, 1.0, 1.0, 0.0]


def test_embedding_factorization_under_budget_round_trip() -> None:
    torch.manual_seed(0)
    reference = Encoder().eval()
    model = copy.deepcopy(reference)
    config = LowRankConfig(BudgetRank(0.6), factorize_embeddings=True)
    result = factorize_(model, config, calibration=_token_batches(0))
    decisions = {d.name: d for d in result.layers}
    assert set(decisions) == {"embed", "ffn_in", "ffn_out"}
    assert result.params_after <= 0.6 * result.params_before
    embed = decisions["embed"]
    assert embed.kind == "embedding" and embed.action == "factorized"
    assert "frequency-weighted energy" in embed.reason and "weighted-svd" in embed.reason
    assert isinstance(model.embed, LowRankEmbedding) and model.embed.rank == embed.rank
    assert torch.equal(model.embed(torch.tensor([0])), torch.zeros(1, DIM))
    dense = model.embed.to_dense()
    ids = torch.randint(0, VOCAB, (3, 7))
    torch.testing.assert_close(dense(ids), model.embed(ids))
    assert _cosine(reference, model, _token_batches(5)) > 0.95
    data = json.loads(json.dumps(result.to_dict()))
    assert data["layers"][0]["energy_kept"] == pytest.approx(embed.energy_kept)


def test_search_budget_finds_the_smallest_budget_meeting_the_floor():
    import copy

    from lrt_deploy.compress import LowRankConfig, search_budget
    from lrt_deploy.compress.calibration import primary_output
    from lrt_deploy.metrics import cosine_per_row

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 16)).eval()

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    wrapped = Wrapped(model)
    generator = torch.Generator().manual_seed(1)
    basis = torch.randn(6, 32, generator=generator)
    batches = [{"x": torch.randn(64, 6, generator=generator) @ basis
                + 0.05 * torch.randn(64, 32, generator=generator)} for _ in range(4)]
    config = LowRankConfig(BudgetRank(0.9), solver="asvd")
    result = search_budget(wrapped, config, batches[:3], batches[3:], floor=0.98, steps=4)
    assert result.mean_cosine >= 0.98
    assert result.trials[0]["budget"] == pytest.approx(0.98)
    passing = [t["budget"] for t in result.trials if t["mean_cosine"] >= 0.98]
    assert result.budget == min(passing)
    # The input model is untouched and the chosen budget reproduces the measured fidelity.
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
    from lrt_deploy.compress import factorize_

    candidate = copy.deepcopy(wrapped)
    factorize_(candidate, LowRankConfig(BudgetRank(result.budget), solver="asvd"),
               calibration=batches[:3])
    with torch.no_grad():
        score = cosine_per_row(primary_output(wrapped(**batches[3])).numpy(),
                               primary_output(candidate(**batches[3])).numpy()).mean()
    assert score == pytest.approx(result.mean_cosine, abs=1e-6)


def test_search_budget_unreachable_floor_is_an_error():
    from lrt_deploy.compress import LowRankConfig, LowRankConfigError, search_budget

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    batches = [{"x": torch.randn(16, 32)} for _ in range(2)]
    with pytest.raises(LowRankConfigError, match="lower FidelityFloor.floor"):
        search_budget(Net().eval(), LowRankConfig(BudgetRank(0.5), solver="svd"),
                      None, batches[1:], floor=0.999999, high=0.3)
