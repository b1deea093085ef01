"""Tests for the transformer fusions (lrt_deploy.export.fusion and its passes) on a tiny BERT,
dense and factorized, and on hand-built GELU graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
from onnx import TensorProto, helper  # noqa: E402

from lrt_deploy.errors import ExportValidationError  # noqa: E402
from lrt_deploy.export.fuse_attention import fuse_attention  # noqa: E402
from lrt_deploy.export.fuse_gelu import fuse_gelu  # noqa: E402
from lrt_deploy.export.fusion import fuse_transformer, max_output_difference  # noqa: E402
from lrt_deploy.export.graph import op_counts  # noqa: E402
from lrt_deploy.export.onnx_export import export_onnx  # noqa: E402
from lrt_deploy.load import load_model  # noqa: E402

# tests/tiny_models.py: hidden 32, 2 heads, 2 layers, intermediate 64.
HEADS, HIDDEN, LAYERS = 2, 32, 2


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 30, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0  # padding: the mask path must keep its meaning after fusion
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fusion")


@pytest.fixture(scope="module")
def dense_onnx(tiny_bert_dir: Path, work: Path) -> Path:
    return export_onnx(load_model(tiny_bert_dir), work / "dense.onnx")


@pytest.fixture(scope="module")
def lowrank_onnx(tiny_bert_dir: Path, work: Path) -> Path:
    from lrt_deploy.compress import LowRankConfig, factorize_

    loaded = load_model(tiny_bert_dir)
    torch.manual_seed(0)
    factorize_(loaded.module, LowRankConfig(rank=0.25, solver="svd"))
    return export_onnx(loaded, work / "lrt.onnx")


def test_dense_bert_fuses_attention_gelu_skip_layernorm(dense_onnx: Path, work: Path) -> None:
    target = work / "dense.fused.onnx"
    result = fuse_transformer(
        dense_onnx, target, num_heads=HEADS, hidden_size=HIDDEN, check_inputs=_feeds()
    )
    assert result.attention_layers == LAYERS and result.gelus == LAYERS
    assert result.fused["MultiHeadAttention"] == LAYERS
    assert result.fused["SkipLayerNormalization"] == 2 * LAYERS
    assert result.fused["BiasGelu"] == LAYERS
    after = op_counts(target)
    assert after["Softmax"] == 0 and after["Erf"] == 0 and after["IsNaN"] == 0
    assert after["MatMul"] == 6 * LAYERS  # Q, K, V, output and two FFN projections
    assert result.nodes_after < result.nodes_before / 2
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert max_output_difference(dense_onnx, target, _feeds(1)) < 1e-4
    assert result.to_dict()["fused"] == result.fused


def test_lowrank_bert_fuses_the_same_and_keeps_matmul_pairs(
    lowrank_onnx: Path, work: Path
) -> None:
    before = op_counts(lowrank_onnx)
    target = work / "lrt.fused.onnx"
    result = fuse_transformer(
        lowrank_onnx, target, num_heads=HEADS, hidden_size=HIDDEN, check_inputs=_feeds()
    )
    assert result.attention_layers == LAYERS
    assert result.fused["MultiHeadAttention"] == LAYERS
    assert result.fused["SkipLayerNormalization"] == 2 * LAYERS
    assert result.fused["BiasGelu"] == LAYERS
    after = op_counts(target)
    # The two attention-score MatMuls per layer are gone; every low-rank pair is still there.
    assert after["MatMul"] == before["MatMul"] - 2 * LAYERS
    assert after["MatMul"] > 6 * LAYERS
    assert max_output_difference(lowrank_onnx, target, _feeds(2)) < 1e-4


def test_wrong_head_count_fuses_no_attention(dense_onnx: Path, work: Path) -> None:
    model = onnx.load(str(dense_onnx))
    assert fuse_attention(model, num_heads=4, hidden_size=HIDDEN) == 0
    with pytest.raises(ValueError, match="multiple"):
        fuse_attention(model, num_heads=3, hidden_size=HIDDEN)


def test_passes_can_be_turned_off(dense_onnx: Path, work: Path) -> None:
    result = fuse_transformer(
        dense_onnx, work / "noattn.onnx", num_heads=HEADS, hidden_size=HIDDEN,
        attention=False, gelu=False,
    )
    assert result.attention_layers == 0 and result.gelus == 0
    assert "MultiHeadAttention" not in result.fused and "BiasGelu" not in result.fused


def test_fidelity_failure_is_an_error(dense_onnx: Path, work: Path) -> None:
    with pytest.raises(ExportValidationError, match="atol"):
        fuse_transformer(
            dense_onnx, work / "strict.onnx", num_heads=HEADS, hidden_size=HIDDEN,
            check_inputs=_feeds(), atol=-1.0,
        )


def _gelu_graph(variant: str) -> onnx.ModelProto:
    """y = gelu(x + b) written three ways exporters do."""
    const = {
        "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32), "b": np.linspace(-1, 1, 4).astype(np.float32),
    }
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in const.items()]
    nodes = [
        helper.make_node("Add", ["x", "b"], ["xb"]),
        helper.make_node("Div", ["xb", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
    ]
    if variant == "half-first":  # dynamo
        nodes += [helper.make_node("Mul", ["half", "p"], ["h"]),
                  helper.make_node("Mul", ["xb", "h"], ["y"])]
    elif variant == "x-first":
        nodes += [helper.make_node("Mul", ["xb", "p"], ["h"]),
                  helper.make_node("Mul", ["h", "half"], ["y"])]
    else:  # (0.5 * x) * (1 + erf)
        nodes += [helper.make_node("Mul", ["xb", "half"], ["h"]),
                  helper.make_node("Mul", ["h", "p"], ["y"])]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("variant", ["half-first", "x-first", "half-x-first"])
def test_gelu_variants_fuse_to_one_node(variant: str, tmp_path: Path) -> None:
    model = _gelu_graph(variant)
    source = tmp_path / "gelu.onnx"
    onnx.save(model, str(source))
    assert fuse_gelu(model) == 1
    fused = tmp_path / "gelu.fused.onnx"
    onnx.save(model, str(fused))
    assert dict(op_counts(fused)) == {"Add": 1, "Gelu": 1}
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert max_output_difference(source, fused, {"x": x}) < 1e-5


def test_gelu_with_wrong_constant_is_left_alone() -> None:
    model = _gelu_graph("half-first")
    for init in model.graph.initializer:
        if init.name == "sqrt2":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "sqrt2"))
    assert fuse_gelu(model) == 0
