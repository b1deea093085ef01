from __future__ import annotations

import pytest
import torch
from torch import nn

from lrt_deploy.nn import LowRankEmbedding, LowRankLinear, is_lowrank_pair, lowrank_rank


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(24, 16)


@pytest.fixture
def embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(30, 12, padding_idx=0)


def test_linear_full_rank_reproduces_dense(linear: nn.Linear) -> None:
    lowrank = LowRankLinear.from_dense(linear, rank=16)
    x = torch.randn(5, 24)
    torch.testing.assert_close(lowrank(x), linear(x), atol=1e-5, rtol=1e-5)
    dense = lowrank.to_dense()
    torch.testing.assert_close(dense.weight, linear.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.bias, linear.bias)


def test_linear_structure_and_param_count(linear: nn.Linear) -> None:
    lowrank = LowRankLinear.from_dense(linear, rank=4)
    assert (lowrank.in_features, lowrank.out_features, lowrank.rank) == (24, 16, 4)
    assert lowrank.encoder.bias is None
    assert lowrank.encoder.weight.shape == (4, 24)
    assert lowrank.decoder.weight.shape == (16, 4)
    assert _num_params(lowrank) == 4 * (24 + 16) + 16
    assert "rank=4" in repr(lowrank)
    no_bias = LowRankLinear(8, 6, 2, bias=False)
    assert _num_params(no_bias) == 2 * (8 + 6)
    assert no_bias(torch.randn(3, 7, 8)).shape == (3, 7, 6)


def test_linear_error_decreases_with_rank(linear: nn.Linear) -> None:
    errors = [
        (LowRankLinear.from_dense(linear, r).to_dense().weight - linear.weight).norm().item()
        for r in (1, 4, 8, 12, 16)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-5


def test_linear_factors_are_balanced(linear: nn.Linear) -> None:
    lowrank = LowRankLinear.from_dense(linear, rank=6)
    encoder_norms = lowrank.encoder.weight.norm(dim=1)
    decoder_norms = lowrank.decoder.weight.norm(dim=0)
    torch.testing.assert_close(encoder_norms, decoder_norms, atol=1e-5, rtol=1e-5)


def test_linear_from_factors_and_errors() -> None:
    decoder, encoder, bias = torch.randn(5, 2), torch.randn(2, 7), torch.randn(5)
    layer = LowRankLinear.from_factors(decoder, encoder, bias)
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), x @ (decoder @ encoder).T + bias)
    with pytest.raises(ValueError, match="do not chain"):
        LowRankLinear.from_factors(torch.randn(5, 2), torch.randn(3, 7))
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear.from_dense(nn.Linear(4, 3), rank=4)
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear(4, 3, rank=0)


def test_embedding_full_rank_and_padding(embedding: nn.Embedding) -> None:
    lowrank = LowRankEmbedding.from_dense(embedding, rank=12)
    ids = torch.tensor([[0, 3, 29], [7, 0, 1]])
    torch.testing.assert_close(lowrank(ids), embedding(ids), atol=1e-5, rtol=1e-5)
    assert lowrank.padding_idx == 0
    dense = lowrank.to_dense()
    assert dense.padding_idx == 0
    torch.testing.assert_close(dense.weight, embedding.weight, atol=1e-5, rtol=1e-5)


def test_embedding_truncated_keeps_padding_zero_and_improves_with_rank(
    embedding: nn.Embedding,
) -> None:
    # Perturb the padding row so the factorization cannot represent it exactly by accident.
    with torch.no_grad():
        embedding.weight[0] = 0.0
    errors = []
    for rank in (1, 3, 6, 12):
        lowrank = LowRankEmbedding.from_dense(embedding, rank)
        assert torch.equal(lowrank(torch.tensor([0])), torch.zeros(1, 12))
        assert torch.equal(lowrank.table.weight[0], torch.zeros(rank))
        errors.append((lowrank.to_dense().weight - embedding.weight).norm().item())
        assert _num_params(lowrank) == rank * (30 + 12)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_embedding_negative_padding_idx_and_from_factors() -> None:
    codes, basis = torch.randn(10, 3), torch.randn(3, 8)
    module = LowRankEmbedding.from_factors(codes, basis, padding_idx=-1)
    assert module.padding_idx == 9
    assert torch.equal(module(torch.tensor([9])), torch.zeros(1, 8))
    torch.testing.assert_close(module(torch.tensor([2])), (codes[2] @ basis)[None])
    assert "rank=3" in repr(module)


def test_embedding_with_max_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        LowRankEmbedding.from_dense(nn.Embedding(10, 4, max_norm=1.0), rank=2)


def test_lowrank_pair_recognition() -> None:
    led = nn.Sequential(nn.Linear(32, 4, bias=False), nn.Linear(4, 16))
    assert is_lowrank_pair(led)
    assert lowrank_rank(led) == 4
    assert is_lowrank_pair(LowRankLinear(8, 8, 3)) and lowrank_rank(LowRankLinear(8, 8, 3)) == 3
    assert lowrank_rank(LowRankEmbedding(10, 6, 2)) == 2

    not_pairs = [
        nn.Linear(8, 8),
        nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 16)),  # first layer has a bias
        nn.Sequential(nn.Linear(32, 16, bias=False), nn.Linear(16, 16)),  # not a bottleneck
        nn.Sequential(nn.Linear(32, 4, bias=False), nn.ReLU(), nn.Linear(4, 16)),
        nn.Sequential(nn.Linear(32, 4, bias=False), nn.ReLU()),
    ]
    for module in not_pairs:
        assert not is_lowrank_pair(module)
        assert lowrank_rank(module) is None


def test_lowrank_linear_exports_as_two_matmuls(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    layer = LowRankLinear.from_dense(nn.Linear(16, 12), rank=3).eval()
    path = tmp_path / "lowrank.onnx"
    torch.onnx.export(layer, (torch.randn(2, 5, 16),), str(path))
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 2
