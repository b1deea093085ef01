from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lrt_deploy.compress.handlers as handlers_module
from lrt_deploy.compress import (
    FactorizationResult,
    InputCovarianceCollector,
    LowRankConfig,
    LowRankConfigError,
    collect_input_covariances,
    cosine_per_row,
    embedding_factors,
    factorize_,
    register_handler,
    svd_factors,
    whitened_svd_factors,
)
from lrt_deploy.nn import LowRankEmbedding, LowRankLinear

VOCAB, DIM, HIDDEN = 40, 32, 64


def _anisotropic_inputs(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs dominated by a few fixed directions, like real activations."""
    # The directions do not depend on `generator`, so calibration and held-out data share them.
    mixing = torch.randn(4, dim, generator=torch.Generator().manual_seed(1234)) * 3.0
    return torch.randn(n, 4, generator=generator) @ mixing + 0.05 * torch.randn(
        n, dim, generator=generator
    )


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyEncoder(nn.Module):
    """Embedding, one attention block, an FFN and a pooler: BERT in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        with torch.no_grad():
            # Token vectors near a 4-dim subspace make the layer inputs anisotropic.
            self.embed.weight.copy_(torch.randn(VOCAB, 4) @ torch.randn(4, DIM))
            self.embed.weight[0] = 0.0
        self.query = nn.Linear(DIM, DIM)
        self.key = nn.Linear(DIM, DIM)
        self.value = nn.Linear(DIM, DIM)
        self.attn_out = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.ffn_in = nn.Linear(DIM, HIDDEN)
        self.ffn_out = nn.Linear(HIDDEN, DIM)
        self.pooler = nn.Linear(DIM, DIM)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        scores = self.query(h) @ self.key(h).transpose(1, 2) / math.sqrt(DIM)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], -1e9)
        h = self.norm(h + self.attn_out(scores.softmax(-1) @ self.value(h)))
        h = h + self.ffn_out(torch.nn.functional.gelu(self.ffn_in(h)))
        return torch.tanh(self.pooler(h))


def _mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def _encoder() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder()


def _mlp_batches(seed: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": _anisotropic_inputs(32, DIM, generator)} for _ in range(count)]


def _encoder_batches(seed: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, VOCAB, (4, 10), generator=generator)
        attention_mask = torch.ones(4, 10, dtype=torch.long)
        attention_mask[1:, 7:] = 0
        input_ids[attention_mask == 0] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def _output_cosine(
    reference: nn.Module, candidate: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> float:
    with torch.no_grad():
        ref = np.concatenate([reference(**b).numpy().reshape(-1, DIM) for b in batches])
        cand = np.concatenate([candidate(**b).numpy().reshape(-1, DIM) for b in batches])
    return float(cosine_per_row(ref, cand).mean())


def _decisions(result: FactorizationResult) -> dict[str, object]:
    return {layer.name: layer for layer in result.layers}


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": -3}, "rank must be a positive int or a fraction in \\(0, 1\\], got -3"),
        ({"rank": 0}, "rank must be"),
        ({"rank": 1.5}, "rank must be"),
        ({"rank": 0.0}, "rank must be"),
        ({"rank": True}, "rank must be"),
        ({"rank": 4, "solver": "qr"}, "solver must be one of"),
        ({"rank": 4, "min_param_saving": 1.0}, "min_param_saving"),
        ({"rank": 4, "min_param_saving": -0.1}, "min_param_saving"),
        ({"rank": 4, "skip": "pooler.*"}, "not a bare string"),
        ({"rank": 4, "rank_overrides": {"fc*": 0}}, "rank_overrides\\['fc\\*'\\]"),
        ({"rank": 4, "damping": 0.0}, "damping"),
        ({"rank": 4, "damping": float("nan")}, "damping"),
        ({"rank": 4, "factorize_embeddings": "yes"}, "factorize_embeddings"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(LowRankConfigError, match=message):
        LowRankConfig(**kwargs)


def test_config_error_is_value_error() -> None:
    assert issubclass(LowRankConfigError, ValueError)


def test_config_round_trip() -> None:
    config = LowRankConfig(
        rank=0.25,
        solver="svd",
        factorize_embeddings=True,
        min_param_saving=0.1,
        skip=["pooler.*", "classifier"],
        rank_overrides={"*.ffn_*": 16, "embed": 1.0},
        damping=1e-3,
    )
    assert config.skip == ("pooler.*", "classifier")
    restored = LowRankConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.rank_overrides["embed"], float)


def test_config_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(LowRankConfigError, match="unknown LowRankConfig keys \\['rnak'\\]"):
        LowRankConfig.from_dict({"rank": 4, "rnak": 4})
    with pytest.raises(LowRankConfigError, match="needs a 'rank'"):
        LowRankConfig.from_dict({"solver": "svd"})


def test_rank_resolution() -> None:
    config = LowRankConfig(rank=0.1, rank_overrides={"ffn_*": 5, "ffn*": 2.0 / 3.0, "x": 1})
    assert config.rank_for("query", 32) == 4  # ceil(3.2)
    assert config.rank_for("ffn_in", 32) == 5  # first matching override wins
    assert config.rank_for("ffnx", 32) == 22  # ceil(21.33)
    assert LowRankConfig(rank=1e-6).rank_for("query", 32) == 1
    assert LowRankConfig(rank=1.0).rank_for("query", 32) == 32
    assert LowRankConfig(rank=1).rank_for("query", 32) == 1
    assert LowRankConfig(rank=100).rank_for("query", 32) == 32


# --- solvers --------------------------------------------------------------------------------


def test_svd_factors_shapes_dtype_and_exactness() -> None:
    torch.manual_seed(0)
    weight = torch.randn(12, 20)
    decoder, encoder = svd_factors(weight, 12)
    assert decoder.shape == (12, 12) and encoder.shape == (12, 20)
    assert decoder.dtype == torch.float32
    torch.testing.assert_close(decoder @ encoder, weight, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rank must be"):
        svd_factors(weight, 13)


def test_whitened_svd_beats_plain_svd_on_anisotropic_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=generator)
    x = _anisotropic_inputs(500, 16, generator)
    cov = (x.T.double() @ x.double()) / x.shape[0]
    for rank in (1, 2, 3, 4, 6):
        plain = svd_factors(weight, rank)
        whitened = whitened_svd_factors(weight, cov, rank)
        plain_error = ((weight - plain[0] @ plain[1]) @ x.T).norm()
        whitened_error = ((weight - whitened[0] @ whitened[1]) @ x.T).norm()
        assert whitened_error < plain_error
        if rank >= 4:
            # Four directions carry almost all of the input energy.
            assert whitened_error < 0.05 * plain_error


def test_whitened_svd_full_rank_is_exact() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 10, generator=generator)
    x = _anisotropic_inputs(200, 10, generator)
    decoder, encoder = whitened_svd_factors(weight, x.T @ x / 200, rank=8)
    torch.testing.assert_close(decoder @ encoder, weight, atol=1e-4, rtol=1e-4)


def test_whitened_svd_rank_deficient_and_zero_covariance() -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 16, generator=generator)
    # Inputs in a 3-dim subspace of 16 dims: the covariance has rank 3.
    x = torch.randn(100, 3, generator=generator) @ torch.randn(3, 16, generator=generator)
    cov = x.T.double() @ x.double() / 100
    for rank in (2, 3, 8, 12):
        decoder, encoder = whitened_svd_factors(weight, cov, rank)
        assert torch.isfinite(decoder).all() and torch.isfinite(encoder).all()
        if rank >= 3:
            # Three directions carry all the data, so the output error vanishes.
            error = ((weight - decoder @ encoder) @ x.T).norm() / (weight @ x.T).norm()
            assert error < 1e-3
    decoder, encoder = whitened_svd_factors(weight, torch.zeros(16, 16), 4)
    plain = svd_factors(weight, 4)
    torch.testing.assert_close(decoder @ encoder, plain[0] @ plain[1])


def test_whitened_svd_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="input_cov must be"):
        whitened_svd_factors(torch.randn(4, 6), torch.eye(4), 2)
    with pytest.raises(ValueError, match="damping"):
        whitened_svd_factors(torch.randn(4, 6), torch.eye(6), 2, damping=0.0)


def test_embedding_factors_plain_and_weighted() -> None:
    generator = torch.Generator().manual_seed(3)
    table = torch.randn(30, 10, generator=generator)
    codes, basis = embedding_factors(table, 10)
    torch.testing.assert_close(codes @ basis, table, atol=1e-5, rtol=1e-5)
    # Without weights the result matches the balanced SVD split.
    codes, basis = embedding_factors(table, 4)
    decoder, encoder = svd_factors(table, 4)
    torch.testing.assert_close(codes @ basis, decoder @ encoder, atol=1e-5, rtol=1e-5)
    # Weighting rows fits the heavy ones better than plain SVD does.
    weights = torch.ones(30)
    weights[:5] = 1000.0
    codes, basis = embedding_factors(table, 4, row_weights=weights)
    weighted_error = (codes @ basis - table)[:5].norm()
    plain_error = (decoder @ encoder - table)[:5].norm()
    assert weighted_error < plain_error
    with pytest.raises(ValueError, match="row_weights"):
        embedding_factors(table, 4, row_weights=-torch.ones(30))


# --- calibration ----------------------------------------------------------------------------


def test_collector_matches_direct_covariance_and_ignores_masked_tokens() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with InputCovarianceCollector({"layer": layer}) as collector:
        layer(x)  # unmasked: all 10 tokens
        collector.set_token_mask(mask)
        layer(x * 1000.0 * (1 - mask[..., None]) + x * mask[..., None])
    flat = x.reshape(-1, 6).double()
    kept = x[mask.bool()].double()
    expected = flat.T @ flat + kept.T @ kept
    assert collector.counts["layer"] == 10 + 8
    torch.testing.assert_close(collector.sums["layer"], expected)
    torch.testing.assert_close(collector.covariances()["layer"], expected / 18)
    # The hooks are gone after the context.
    layer(x)
    assert collector.counts["layer"] == 18


def test_collect_input_covariances_runs_model_and_restores_mode() -> None:
    model = _encoder().train()
    batches = _encoder_batches(seed=5, count=2)
    covariances = collect_input_covariances(model, ["ffn_in", "ffn_out"], batches)
    assert model.training
    assert covariances["ffn_in"].shape == (DIM, DIM)
    assert covariances["ffn_out"].shape == (HIDDEN, HIDDEN)
    assert covariances["ffn_in"].dtype == torch.float64

    # Direct computation over the non-padding tokens only.
    captured = []
    handle = model.ffn_in.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    kept = torch.cat(
        [h[b["attention_mask"].bool()] for h, b in zip(captured, batches, strict=True)]
    )
    kept = kept.double()
    torch.testing.assert_close(covariances["ffn_in"], kept.T @ kept / kept.shape[0])
    with pytest.raises(KeyError, match="no module named"):
        collect_input_covariances(model, ["nope"], batches)


# --- factorize_ -----------------------------------------------------------------------------


def test_factorize_fixed_rank() -> None:
    model = _mlp()
    result = factorize_(model, LowRankConfig(rank=8, solver="svd"))
    assert isinstance(model.fc1, LowRankLinear) and model.fc1.rank == 8
    assert isinstance(model.fc2, LowRankLinear) and isinstance(model.head, LowRankLinear)
    assert [layer.action for layer in result.layers] == ["factorized"] * 3
    fc1 = _decisions(result)["fc1"]
    assert (fc1.kind, fc1.shape, fc1.rank, fc1.full_rank) == ("linear", (HIDDEN, DIM), 8, DIM)
    assert fc1.params_dense == HIDDEN * DIM + HIDDEN
    assert fc1.params_after == 8 * (HIDDEN + DIM) + HIDDEN
    assert result.params_after == sum(p.numel() for p in model.parameters())
    assert result.params_before == sum(p.numel() for p in _mlp().parameters())
    assert model(torch.randn(3, DIM)).shape == (3, DIM)


def test_factorize_fraction_rank() -> None:
    model = _mlp()
    result = factorize_(model, LowRankConfig(rank=0.1, solver="svd"))
    ranks = {layer.name: layer.rank for layer in result.layers}
    assert ranks == {"fc1": 4, "fc2": 4, "head": 4}  # ceil(0.1 * 32)


def test_factorize_skip_overrides_and_unprofitable_layers() -> None:
    model = _encoder()
    config = LowRankConfig(
        rank=16,
        solver="svd",
        skip=("pooler",),
        rank_overrides={"ffn_*": 4, "value": 8},
    )
    result = factorize_(model, config)
    decisions = _decisions(result)

    assert type(model.pooler) is nn.Linear
    assert decisions["pooler"].action == "kept_dense"
    assert decisions["pooler"].reason == "skipped by pattern 'pooler'"
    assert decisions["pooler"].rank is None

    # 32x32 at rank 16 costs exactly as much as dense: kept, with the numbers in the reason.
    for name in ("query", "key", "attn_out"):
        assert type(getattr(model, name)) is nn.Linear
        assert decisions[name].action == "kept_dense"
        assert decisions[name].reason == "rank 16 saves no parameters (1,056 -> 1,056)"
        assert decisions[name].params_after == decisions[name].params_dense

    assert model.value.rank == 8 and model.ffn_in.rank == 4 and model.ffn_out.rank == 4
    assert {d.name for d in result.factorized} == {"value", "ffn_in", "ffn_out"}
    assert len(result.kept_dense) == 4
    # Embeddings are not candidates unless asked for.
    assert type(model.embed) is nn.Embedding and "embed" not in decisions

    data = json.loads(json.dumps(result.to_dict()))
    assert data["params_after"] == result.params_after
    assert data["layers"][0]["shape"] == [DIM, DIM]
    assert result.summary().startswith("factorized 3/7 layers, 4 kept dense; parameters ")


def test_factorize_min_param_saving() -> None:
    model = _mlp()
    # rank 8: 32x32 head keeps 544/1056 params (saves 48.5%); 64x32 layers save 60%.
    result = factorize_(model, LowRankConfig(rank=8, solver="svd", min_param_saving=0.5))
    decisions = _decisions(result)
    assert decisions["head"].action == "kept_dense"
    assert "saves only 48.5% of parameters" in decisions["head"].reason
    assert decisions["fc1"].action == decisions["fc2"].action == "factorized"


def test_factorize_filter_fn() -> None:
    model = _encoder()
    seen = []

    def only_ffn(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return name.startswith("ffn")

    result = factorize_(model, LowRankConfig(rank=4, solver="svd"), filter_fn=only_ffn)
    assert [layer.name for layer in result.layers] == ["ffn_in", "ffn_out"]
    assert "query" in seen and type(model.query) is nn.Linear


def test_factorize_embeddings_keep_padding_zero() -> None:
    model = _encoder()
    config = LowRankConfig(rank=4, solver="svd", factorize_embeddings=True)
    result = factorize_(model, config, filter_fn=lambda module, name: name == "embed")
    assert isinstance(model.embed, LowRankEmbedding)
    decision = _decisions(result)["embed"]
    assert (decision.kind, decision.shape, decision.rank) == ("embedding", (VOCAB, DIM), 4)
    assert torch.equal(model.embed(torch.tensor([0])), torch.zeros(1, DIM))
    # The tiny table has rank 4 by construction, so rank 4 reproduces it.
    reference = _encoder()
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(model.embed(ids), reference.embed(ids), atol=1e-4, rtol=1e-4)


def test_factorize_skips_existing_lowrank_units_and_tied_weights() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.led = nn.Sequential(nn.Linear(DIM, 4, bias=False), nn.Linear(4, DIM))
    model.lowrank = LowRankLinear(DIM, DIM, 4)
    model.dense = nn.Linear(DIM, HIDDEN)
    model.tied = nn.Linear(DIM, HIDDEN)
    model.tied.weight = model.dense.weight
    result = factorize_(model, LowRankConfig(rank=4, solver="svd"))
    assert result.already_lowrank == ["led", "lowrank"]
    assert type(model.led[0]) is nn.Linear
    assert [layer.name for layer in result.layers] == ["dense", "tied"]
    assert all(layer.action == "kept_dense" for layer in result.layers)
    assert _decisions(result)["dense"].reason.startswith("weight is tied to tied")
    assert "2 already low-rank" in result.summary()


def test_register_handler_for_custom_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers_module, "_HANDLERS", dict(handlers_module._HANDLERS))

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(HIDDEN, DIM))

    calls = []

    @register_handler(Scaled, kind="scaled")
    def handle(module: Scaled, rank: int, context) -> nn.Module | None:
        calls.append((context.name, rank))
        return None if context.name == "declined" else nn.Identity()

    model = nn.Module()
    model.block = nn.Sequential(Scaled())
    model.declined = Scaled()
    result = factorize_(model, LowRankConfig(rank=2, solver="svd"))
    assert calls == [("block.0", 2), ("declined", 2)]
    assert isinstance(model.block[0], nn.Identity)
    decisions = _decisions(result)
    assert decisions["block.0"].kind == "scaled" and decisions["block.0"].params_after == 0
    assert decisions["declined"].action == "kept_dense"
    assert decisions["declined"].reason == "the Scaled handler declined it"


def test_asvd_without_calibration_raises() -> None:
    with pytest.raises(LowRankConfigError, match="needs calibration batches"):
        factorize_(_mlp(), LowRankConfig(rank=4))


@pytest.mark.parametrize(
    ("make_model", "make_batches", "config", "floor"),
    [
        (_mlp, _mlp_batches, LowRankConfig(rank=4), 0.9),
        (_mlp, _mlp_batches, LowRankConfig(rank=0.25, rank_overrides={"head": 8}), 0.95),
        (_encoder, _encoder_batches, LowRankConfig(rank=8), 0.95),
        (
            _encoder,
            _encoder_batches,
            LowRankConfig(rank=6, factorize_embeddings=True, skip=("pooler",)),
            0.98,
        ),
    ],
    ids=["mlp-rank4", "mlp-fraction", "encoder-rank8", "encoder-embeddings"],
)
def test_asvd_beats_svd_on_output_cosine(make_model, make_batches, config, floor) -> None:
    reference = make_model().eval()
    held_out = make_batches(seed=99)

    asvd_model = copy.deepcopy(reference)
    result = factorize_(asvd_model, config, calibration=make_batches(seed=1))
    assert result.factorized
    assert all("asvd" in d.reason for d in result.factorized if d.kind == "linear")

    svd_model = copy.deepcopy(reference)
    svd_config = LowRankConfig.from_dict({**config.to_dict(), "solver": "svd"})
    factorize_(svd_model, svd_config)

    asvd_cosine = _output_cosine(reference, asvd_model, held_out)
    svd_cosine = _output_cosine(reference, svd_model, held_out)
    assert asvd_cosine >= floor
    assert asvd_cosine > svd_cosine


def test_factorize_hf_bert_in_place() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=HIDDEN,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config).eval()
    reference = copy.deepcopy(model)
    batches = _encoder_batches(seed=1, count=2)
    result = factorize_(
        model,
        LowRankConfig(rank=0.5, factorize_embeddings=True, skip=("pooler.*",)),
        calibration=batches,
    )
    factorized = {d.name for d in result.factorized}
    assert {"embeddings.word_embeddings", "encoder.layer.0.intermediate.dense"} <= factorized
    assert isinstance(model.embeddings.word_embeddings, LowRankEmbedding)
    assert isinstance(model.encoder.layer[0].output.dense, LowRankLinear)
    with torch.no_grad():
        ref = reference(**batches[0]).last_hidden_state.numpy()
        out = model(**batches[0]).last_hidden_state.numpy()
    assert np.isfinite(out).all()
    assert cosine_per_row(ref, out).mean() > 0.8
