"""Tests for the transformer fusions (export.passes.fusion: onnxscript's rewriter plus our
attention-mask pass) and the int8 quantisation of the fused graphs, on a tiny BERT, dense and
factorized, and on hand-built attention graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper  # noqa: E402

from lrt_deploy.errors import ExportValidationError  # noqa: E402
from lrt_deploy.export.onnx_export import export_onnx  # noqa: E402
from lrt_deploy.export.passes.attention_mask import attention_mask_to_index  # noqa: E402
from lrt_deploy.export.passes.fusion import fuse_transformer, max_output_difference  # noqa: E402
from lrt_deploy.graph.ops import op_counts  # noqa: E402
from lrt_deploy.load import load_model  # noqa: E402
from lrt_deploy.quant.passes.dynamic import quantize_int8  # noqa: E402

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


@pytest.fixture(scope="module")
def dense_fused(dense_onnx: Path, work: Path) -> Path:
    target = work / "dense.fused.onnx"
    fuse_transformer(dense_onnx, target, num_heads=HEADS, hidden_size=HIDDEN)
    return target


def test_dense_bert_fuses_packed_attention_gelu_skip_layernorm(
    dense_onnx: Path, work: Path
) -> None:
    target = work / "dense.checked.onnx"
    result = fuse_transformer(
        dense_onnx, target, num_heads=HEADS, hidden_size=HIDDEN, check_inputs=_feeds()
    )
    fused = result.details["fused"]
    assert result.details["attention_layers"] == LAYERS and result.details["gelus"] == LAYERS
    assert fused["Attention"] == LAYERS  # packed QKV: dynamic int8 makes QAttention of it
    assert fused["SkipLayerNormalization"] == 2 * LAYERS
    assert fused["BiasGelu"] == LAYERS
    assert result.details["rewrites"]["attention_mask_to_index"] == LAYERS
    after = op_counts(target)
    assert after["Softmax"] == 0 and after["Erf"] == 0 and after["IsNaN"] == 0
    assert after["Where"] == 0 and after["GatherND"] == 0  # the mask-to-bias subgraph is gone
    assert after["MatMul"] == 3 * LAYERS  # output and two FFN projections; Q, K, V are packed
    assert result.details["nodes_after"] < result.details["nodes_before"] / 3
    assert result.details["max_abs_diff"] is not None and result.details["max_abs_diff"] < 1e-4
    assert max_output_difference(dense_onnx, target, _feeds(1)) < 1e-4
    assert result.to_dict()["fused"] == result.details["fused"]


def test_lowrank_bert_fuses_multihead_attention_and_keeps_matmul_pairs(
    lowrank_onnx: Path, work: Path
) -> None:
    before = op_counts(lowrank_onnx)
    target = work / "lrt.fused.onnx"
    result = fuse_transformer(
        lowrank_onnx, target, num_heads=HEADS, hidden_size=HIDDEN, check_inputs=_feeds()
    )
    # Q/K/V are factor pairs: no packed weight, so MultiHeadAttention after the pairs.
    fused = result.details["fused"]
    assert fused["MultiHeadAttention"] == LAYERS and "Attention" not in fused
    assert fused["SkipLayerNormalization"] == 2 * LAYERS
    assert fused["BiasGelu"] == LAYERS
    assert result.details["rewrites"]["attention_mask_to_index"] == LAYERS
    after = op_counts(target)
    # The two attention-score MatMuls per layer are gone; every low-rank pair is still there.
    assert after["MatMul"] == before["MatMul"] - 2 * LAYERS
    assert after["MatMul"] == 12 * LAYERS  # six projections, each a pair
    assert after["Where"] == 0
    assert max_output_difference(lowrank_onnx, target, _feeds(2)) < 1e-4


def test_wrong_head_count_is_an_error(dense_onnx: Path, work: Path) -> None:
    with pytest.raises(ExportValidationError, match="heads"):
        fuse_transformer(dense_onnx, work / "heads.onnx", num_heads=4, hidden_size=HIDDEN)
    with pytest.raises(ValueError, match="multiple"):
        fuse_transformer(dense_onnx, work / "heads.onnx", num_heads=3, hidden_size=HIDDEN)


def test_fidelity_failure_is_an_error(dense_onnx: Path, work: Path) -> None:
    with pytest.raises(ExportValidationError, match="atol"):
        fuse_transformer(
            dense_onnx, work / "strict.onnx", num_heads=HEADS, hidden_size=HIDDEN,
            check_inputs=_feeds(), atol=-1.0,
        )


def test_rewriter_failure_leaves_the_graph_unfused(
    dense_onnx: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxscript.rewriter.ort_fusions as ort_fusions

    def broken(model: object) -> None:
        raise RuntimeError("no pattern for you")

    monkeypatch.setattr(ort_fusions, "optimize_for_ort", broken)
    result = fuse_transformer(dense_onnx, work / "unfused.onnx", num_heads=HEADS,
                              hidden_size=HIDDEN, check_inputs=_feeds())
    assert result.details["rewrites"]["failed"] == 1 and result.details["attention_layers"] == 0
    assert result.details["max_abs_diff"] is not None and result.details["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_turns_packed_attention_into_qattention(
    dense_onnx: Path, dense_fused: Path, work: Path, per_channel: bool
) -> None:
    target = work / f"dense.int8.{per_channel}.onnx"
    result = quantize_int8(dense_fused, target, per_channel=per_channel)
    assert result.quantized_ops["QAttention"] == LAYERS
    assert result.quantized_ops["MatMulInteger"] == 3 * LAYERS  # Q, K, V are inside QAttention
    assert result.settings["op_types"] == ["MatMul", "Gather", "Attention"]
    after = op_counts(target)
    assert after["Attention"] == 0 and after["MatMul"] == 0
    # int8 noise on a random tiny model: well under the output scale (LayerNorm-ed, ~1).
    assert max_output_difference(dense_onnx, target, _feeds(3)) < 0.1


def test_int8_without_attention_keeps_it_float(dense_fused: Path, work: Path) -> None:
    result = quantize_int8(dense_fused, work / "noattn.int8.onnx", op_types=("MatMul",))
    assert "QAttention" not in result.quantized_ops
    assert op_counts(work / "noattn.int8.onnx")["Attention"] == LAYERS


def test_int8_lowrank_quantizes_every_factor(lowrank_onnx: Path, work: Path) -> None:
    fused = work / "lrt.fused.q.onnx"
    fuse_transformer(lowrank_onnx, fused, num_heads=HEADS, hidden_size=HIDDEN)
    target = work / "lrt.int8.onnx"
    result = quantize_int8(fused, target)
    assert "QAttention" not in result.quantized_ops
    assert result.quantized_ops["MatMulInteger"] == 12 * LAYERS
    assert op_counts(target)["MultiHeadAttention"] == LAYERS
    assert max_output_difference(lowrank_onnx, target, _feeds(4)) < 0.1


def _attention_graph(causal: bool) -> onnx.ModelProto:
    """Embedding -> MultiHeadAttention whose additive bias is built from ``attention_mask``
    (padding only, or padding plus a causal triangle)."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "emb"),
        onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        onnx.numpy_helper.from_array(np.array(-1e9, np.float32), "big"),
        onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "one_i"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "m"], ["pad"]),
        helper.make_node("Mul", ["pad", "big"], ["pad_bias"]),
        helper.make_node("Unsqueeze", ["pad_bias", "axes12"], ["bias4"]),
    ]
    # ORT wants the bias as (batch or 1, heads or 1, sequence, sequence): add a square.
    nodes += [
        helper.make_node("Shape", ["attention_mask"], ["seq"], start=1),
        helper.make_node("Concat", ["seq", "seq"], ["square"], axis=0),
        helper.make_node("ConstantOfShape", ["square"], ["ones"],
                         value=onnx.numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Trilu", ["ones", "one_i"], ["future"], upper=1),
        helper.make_node("Mul", ["future", "big" if causal else "zero"], ["future_bias"]),
        helper.make_node("Add", ["bias4", "future_bias"], ["bias"]),
    ]
    nodes.append(helper.make_node(
        "MultiHeadAttention", ["x", "x", "x", "", "", "bias"], ["y"], domain="com.microsoft",
        num_heads=2,
    ))
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        inits,
    )
    return helper.make_model(
        graph, ir_version=10,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )


def test_padding_bias_becomes_the_mask_itself(tmp_path: Path) -> None:
    model = _attention_graph(causal=False)
    source = tmp_path / "pad.onnx"
    onnx.save(model, str(source))
    assert attention_mask_to_index(model) == 1
    target = tmp_path / "pad.fused.onnx"
    onnx.save(model, str(target))
    assert dict(op_counts(target)) == {"Cast": 1, "Gather": 1, "MultiHeadAttention": 1}
    assert not any(init.name == "big" for init in model.graph.initializer)
    feeds = _feeds(5)
    del feeds["token_type_ids"]
    feeds["input_ids"] = feeds["input_ids"] % 20
    # Rows of padded queries differ (a -1e9 bias vs the kernel's own fill); compare kept ones.
    y_source, y_target = (
        _run(path, feeds)[feeds["attention_mask"].astype(bool)] for path in (source, target)
    )
    assert np.abs(y_source - y_target).max() < 1e-5


def test_causal_bias_is_left_alone() -> None:
    model = _attention_graph(causal=True)
    before = [list(node.input) for node in model.graph.node]
    assert attention_mask_to_index(model) == 0
    assert [list(node.input) for node in model.graph.node] == before


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]
