"""Baselines for models low-rank by design: pairs multiplied out (on modules and on ONNX graphs)
and Linformer attention replaced by standard attention over the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from tiny_models import TinyLowRankMLP, TinyLRTByDesign, make_tiny_mlp  # noqa: E402
from torch import nn  # noqa: E402

from lrt_deploy.export.onnx_export import export_onnx  # noqa: E402
from lrt_deploy.export.passes.dense_equivalent import (  # noqa: E402
    dense_equivalent_onnx,
    fold_lowrank_pairs,
)
from lrt_deploy.graph.ops import op_counts  # noqa: E402
from lrt_deploy.load import load_model, parse_input_spec  # noqa: E402
from lrt_deploy.nn import (  # noqa: E402
    LinformerSelfAttention,
    LowRankEmbedding,
    LowRankLinear,
    StandardSelfAttention,
    is_lowrank_pair,
)
from lrt_deploy.nn.equivalents import (  # noqa: E402
    dense_equivalent,
    standard_attention_equivalent,
)


class LEDEncoder(nn.Module):
    """The issue's foreign model: blocks whose projections and FFN are greenformer LED pairs."""

    def __init__(self, hidden: int = 32, rank: int = 8, blocks: int = 2) -> None:
        super().__init__()

        def led(inp: int, out: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(inp, rank, bias=False), nn.Linear(rank, out))

        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": led(hidden, hidden), "up": led(hidden, 4 * hidden),
                           "down": led(4 * hidden, hidden), "norm": nn.LayerNorm(hidden)})
            for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["proj"](x)
            x = block["norm"](x + block["down"](torch.relu(block["up"](x))))
        return x


class LowRankClassifier(nn.Module):
    """Low-rank embedding + LowRankLinear FFN (the shape of samples/lrt_by_design.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = LowRankEmbedding(40, 24, rank=4, padding_idx=0)
        self.ffn = nn.Sequential(LowRankLinear(24, 48, 6), nn.GELU(), LowRankLinear(48, 24, 6))
        self.head = nn.Linear(24, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return self.head((x + self.ffn(x)).mean(dim=1))


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# --- on modules --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cls", "units", "example"),
    [
        (TinyLRTByDesign, 1, lambda g: torch.randn(3, 32, generator=g)),
        (TinyLowRankMLP, 2, lambda g: torch.randn(2, 5, 32, generator=g)),
        (LEDEncoder, 6, lambda g: torch.randn(2, 7, 32, generator=g)),
        (LowRankClassifier, 3, lambda g: torch.randint(0, 40, (2, 9), generator=g)),
    ],
)
def test_module_dense_equivalent_is_the_same_function(cls, units, example) -> None:
    model = _seeded(cls)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense, count = dense_equivalent(model)
    assert count == units
    assert not any(is_lowrank_pair(m) for m in dense.modules())
    assert not dense.training
    x = example(torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
    # The low-rank model is untouched and the dense copy holds full-rank weights.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in dense.parameters()) > sum(p.numel() for p in model.parameters())


def test_module_dense_equivalent_keeps_bias_and_padding_row() -> None:
    model = _seeded(LowRankClassifier)
    dense, _ = dense_equivalent(model)
    assert isinstance(dense.embed, nn.Embedding) and dense.embed.padding_idx == 0
    assert torch.count_nonzero(dense.embed.weight[0]) == 0
    assert torch.equal(dense.ffn[0].bias, model.ffn[0].decoder.bias)


def test_module_dense_equivalent_of_a_lowrank_root_and_of_a_dense_model() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(16, 12, rank=3)
    dense, count = dense_equivalent(layer)
    assert count == 1 and isinstance(dense, nn.Linear)
    mlp = make_tiny_mlp()
    copy, count = dense_equivalent(mlp)
    assert count == 0 and copy is not mlp


def test_module_dense_equivalent_refuses_torchscript() -> None:
    scripted = torch.jit.trace(_seeded(TinyLRTByDesign), torch.randn(2, 32))
    with pytest.raises(TypeError, match="fold the exported ONNX"):
        dense_equivalent(scripted)


# --- on ONNX graphs ----------------------------------------------------------------------------

def _torchscript(model: nn.Module, example: torch.Tensor, path: Path, spec: str):
    torch.jit.trace(model, example).save(str(path))
    return load_model(path, input_specs=[parse_input_spec(spec)])


def _pt2(model: nn.Module, example: torch.Tensor, path: Path):
    dims = {"x": {0: torch.export.Dim("batch")}} if example.dtype.is_floating_point else None
    if dims is None:
        dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dims), str(path))
    return load_model(path)


@pytest.mark.parametrize(
    ("case", "pairs", "ops_left"),
    [
        ("torchscript-led-3d", 6, {"MatMul": 6}),
        ("torchscript-led-2d", 1, {"Gemm": 2}),
        ("pt2-lowranklinear", 2, {"MatMul": 2}),
        ("pt2-lowrank-embedding", 3, {"Gather": 1, "MatMul": 2}),
    ],
)
def test_onnx_fold_is_the_same_function(tmp_path: Path, case, pairs, ops_left) -> None:
    g = torch.Generator().manual_seed(11)
    if case == "torchscript-led-3d":
        loaded = _torchscript(_seeded(LEDEncoder), torch.randn(2, 7, 32), tmp_path / "m.ts.pt",
                              "x=2,7,32")
    elif case == "torchscript-led-2d":
        loaded = _torchscript(_seeded(TinyLRTByDesign), torch.randn(2, 32), tmp_path / "m.ts.pt",
                              "x=2,32")
    elif case == "pt2-lowranklinear":
        loaded = _pt2(_seeded(TinyLowRankMLP), torch.randn(2, 5, 32), tmp_path / "m.pt2")
    else:
        loaded = _pt2(_seeded(LowRankClassifier), torch.randint(0, 40, (2, 9)), tmp_path / "m.pt2")
    raw = export_onnx(loaded, tmp_path / "lrt.onnx")
    result = dense_equivalent_onnx(raw, tmp_path / "dense.onnx")
    assert result.pairs == pairs == len(result.folded)
    assert result.params_after > result.params_before
    counts = op_counts(tmp_path / "dense.onnx")
    for op, count in ops_left.items():
        assert counts[op] == count, (op, counts)
    example = next(iter(loaded.example_inputs.values()))
    if example.dtype.is_floating_point:
        batch = torch.randn(3, *example.shape[1:], generator=g)
    else:
        batch = torch.randint(0, 40, (3, 9), generator=g)
    feeds = {loaded.input_names[0]: batch.numpy()}
    np.testing.assert_allclose(_run(tmp_path / "dense.onnx", feeds), _run(raw, feeds),
                               atol=1e-5, rtol=1e-4)


def test_onnx_fold_leaves_a_graph_without_pairs_unchanged(tmp_path: Path) -> None:
    loaded = _torchscript(make_tiny_mlp(), torch.randn(2, 16), tmp_path / "mlp.ts.pt", "x=2,16")
    raw = export_onnx(loaded, tmp_path / "mlp.onnx")
    model = onnx.load(str(raw))
    before = model.SerializeToString()
    assert fold_lowrank_pairs(model).pairs == 0
    assert model.SerializeToString() == before


def _graph(nodes, initializers, output_dims):
    from onnx import TensorProto, helper, numpy_helper

    return helper.make_model(
        helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in output_dims],
            [numpy_helper.from_array(v, k) for k, v in initializers.items()],
        ),
        opset_imports=[helper.make_opsetid("", 18)], ir_version=9,
    )


def test_onnx_fold_skips_what_is_not_a_lowrank_unit() -> None:
    from onnx import helper

    rng = np.random.default_rng(0)
    weights = {
        "E": rng.standard_normal((16, 4)).astype(np.float32),
        "D": rng.standard_normal((4, 16)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "W1": rng.standard_normal((16, 16)).astype(np.float32),
        "W2": rng.standard_normal((16, 16)).astype(np.float32),
    }
    # A bias between the factors, an intermediate read twice, and a full-rank "pair".
    biased = _graph([
        helper.make_node("MatMul", ["x", "E"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("MatMul", ["hb", "D"], ["y"]),
    ], weights, [("y", [2, 16])])
    shared = _graph([
        helper.make_node("MatMul", ["x", "E"], ["h"]),
        helper.make_node("MatMul", ["h", "D"], ["y"]),
    ], weights, [("y", [2, 16]), ("h", [2, 4])])
    full = _graph([
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"]),
    ], weights, [("y", [2, 16])])
    for model in (biased, shared, full):
        assert fold_lowrank_pairs(model).pairs == 0


def test_onnx_fold_of_a_chain_folds_one_pair_and_keeps_the_function() -> None:
    from onnx import helper

    rng = np.random.default_rng(1)
    weights = {
        "A": rng.standard_normal((16, 4)).astype(np.float32),
        "B": rng.standard_normal((4, 16)).astype(np.float32),
        "C": rng.standard_normal((16, 3)).astype(np.float32),
    }
    model = _graph([
        helper.make_node("MatMul", ["x", "A"], ["h1"], name="a"),
        helper.make_node("MatMul", ["h1", "B"], ["h2"], name="b"),
        helper.make_node("MatMul", ["h2", "C"], ["y"], name="c"),
    ], weights, [("y", [2, 3])])
    x = rng.standard_normal((2, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    result = fold_lowrank_pairs(model)
    assert result.pairs == 1 and result.folded[0]["rank"] == 4
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# --- Linformer by design -----------------------------------------------------------------------

class LinformerEncoder(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4, length: int = 16, k: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LinformerSelfAttention(hidden, heads, length, k) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, attention_mask)
        return x


def _reference_attention(module: LinformerSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out by hand over the module's own Q/K/V/O weights."""
    batch, length, hidden = x.shape
    heads, size = module.num_heads, module.head_dim

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, size).transpose(1, 2)

    q, k, v = split(module.query(x)), split(module.key(x)), split(module.value(x))
    probs = torch.softmax(q @ k.transpose(-1, -2) / size**0.5, dim=-1)
    return module.output((probs @ v).transpose(1, 2).reshape(batch, length, hidden))


def test_standard_attention_uses_the_same_weights() -> None:
    torch.manual_seed(0)
    linformer = LinformerSelfAttention(32, 4, max_length=16, k=6).eval()
    standard = linformer.to_standard_attention()
    assert isinstance(standard, StandardSelfAttention) and not standard.training
    for name in ("query", "key", "value", "output"):
        assert torch.equal(getattr(standard, name).weight, getattr(linformer, name).weight)
        assert torch.equal(getattr(standard, name).bias, getattr(linformer, name).bias)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(standard(x), _reference_attention(linformer, x))
        # A different function: Linformer attends to 6 mixtures, not to the 16 positions.
        assert not torch.allclose(standard(x), linformer(x), atol=1e-3)


def test_standard_attention_equals_linformer_with_identity_projection() -> None:
    torch.manual_seed(0)
    linformer = LinformerSelfAttention(32, 4, max_length=8, k=8, share="headwise").eval()
    with torch.no_grad():
        linformer.key_projection.copy_(torch.eye(8)[None])
        linformer.value_projection.copy_(torch.eye(8)[None])
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(linformer.to_standard_attention()(x, mask), linformer(x, mask),
                                   atol=1e-5, rtol=1e-5)


def test_standard_attention_masks_padding() -> None:
    torch.manual_seed(0)
    standard = LinformerSelfAttention(32, 4, max_length=16, k=6).eval().to_standard_attention()
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(standard(x, mask)[0, :6], standard(x[:, :6])[0],
                                   atol=1e-5, rtol=1e-5)


def test_standard_attention_equivalent_walks_the_model() -> None:
    torch.manual_seed(0)
    model = LinformerEncoder().eval()
    standard, count = standard_attention_equivalent(model)
    assert count == 2
    assert all(isinstance(layer, StandardSelfAttention) for layer in standard.layers)
    assert all(isinstance(layer, LinformerSelfAttention) for layer in model.layers)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = x
        for layer in model.layers:
            expected = expected + _reference_attention(layer, expected)
        torch.testing.assert_close(standard(x), expected, atol=1e-5, rtol=1e-5)


def test_standard_attention_exports_as_fusable_attention(tmp_path: Path) -> None:
    """The dense baseline must get ORT's fused attention kernel, or the comparison is unfair."""
    from lrt_deploy.export.passes.fusion import fuse_transformer
    from lrt_deploy.load import LoadedModel

    torch.manual_seed(0)
    standard, _ = standard_attention_equivalent(LinformerEncoder().eval())
    example = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(5))
    loaded = LoadedModel(
        module=standard, format="pickle", name="standard", example_inputs={"x": example},
        output_names=["output"], dynamic_axes={"x": {0: "batch"}},
    )
    raw = export_onnx(loaded, tmp_path / "standard.onnx")
    fused = tmp_path / "fused.onnx"
    result = fuse_transformer(raw, fused, num_heads=4, hidden_size=32,
                              check_inputs={"x": example.numpy()})
    assert result.details["attention_layers"] == 2
    counts = op_counts(fused)
    # Packed Q/K/V (Attention) when the projections allow it, else MultiHeadAttention.
    assert counts["Attention"] + counts["MultiHeadAttention"] == 2


# --- planning the baseline and the report rows it gives ----------------------------------------

def test_by_design_baseline_plans(tmp_path: Path) -> None:
    from lrt_deploy.export.by_design import by_design_baseline
    from lrt_deploy.load import LoadedModel

    torch.save(_seeded(TinyLowRankMLP), tmp_path / "lowrank.pt")
    lowrank = load_model(tmp_path / "lowrank.pt", trust_pickle=True)
    plan = by_design_baseline(lowrank)
    assert plan.kind == "dense-equivalent" and plan.fidelity_comparable and plan.units == 2
    assert "low-rank pairs multiplied out" in plan.note
    batch = {"x": torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(6))}
    torch.testing.assert_close(plan.loaded.forward(batch)["output"],
                               lowrank.forward(batch)["output"], atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, LowRankLinear) for m in lowrank.module.modules())

    scripted = _torchscript(_seeded(LEDEncoder), torch.randn(2, 7, 32), tmp_path / "m.ts.pt",
                            "x=2,7,32")
    plan = by_design_baseline(scripted)
    assert plan.kind == "dense-equivalent" and plan.loaded is None
    assert plan.to_dict()["made_from"] == "onnx graph"
    program = _pt2(_seeded(LowRankClassifier), torch.randint(0, 40, (2, 9)), tmp_path / "c.pt2")
    assert by_design_baseline(program).loaded is None

    torch.manual_seed(0)
    linformer = LoadedModel(
        module=LinformerEncoder().eval(), format="pickle", name="linformer",
        example_inputs={"x": torch.randn(1, 16, 32)}, output_names=["output"], dynamic_axes={},
    )
    plan = by_design_baseline(linformer)
    assert plan.kind == "standard-attention" and not plan.fidelity_comparable
    assert "fidelity not comparable" in plan.note
    assert by_design_baseline(load_model(tmp_path / "lowrank.pt", trust_pickle=True)) is not None
    mlp = _torchscript(make_tiny_mlp(), torch.randn(2, 16), tmp_path / "mlp.ts.pt", "x=2,16")
    assert by_design_baseline(mlp) is None
    dense = LoadedModel(module=make_tiny_mlp(), format="pickle", name="mlp",
                        example_inputs={"x": torch.randn(2, 16)}, output_names=["output"],
                        dynamic_axes={})
    assert by_design_baseline(dense) is None


def test_report_rows_for_a_pt2_lrt_model(tmp_path: Path) -> None:
    """The wiring the pipeline does: the LRT export folded into its dense equivalent, both
    optimised and int8-quantised the same way, four rows, fidelity ~1.0 between the twins."""
    from lrt_deploy.export.passes.optimize import optimize_graph
    from lrt_deploy.graph.ops import model_bytes
    from lrt_deploy.nn.equivalents import DENSE_EQUIVALENT_NOTE
    from lrt_deploy.quant.passes.dynamic import quantize_int8
    from lrt_deploy.report import ComparisonReport, VariantResult, to_markdown, write_report
    from lrt_deploy.runtime import Schedule, Session, runner, time_runs

    loaded = _pt2(_seeded(LEDEncoder), torch.randn(2, 7, 32), tmp_path / "m.pt2")
    raw = export_onnx(loaded, tmp_path / "lrt.raw.onnx")
    fold = dense_equivalent_onnx(raw, tmp_path / "dense.raw.onnx")
    paths = {}
    for key in ("dense", "lrt"):
        optimize_graph(tmp_path / f"{key}.raw.onnx", tmp_path / f"{key}.fp32.onnx")
        quantize_int8(tmp_path / f"{key}.fp32.onnx", tmp_path / f"{key}.int8.onnx")
        paths[f"{key} fp32"] = tmp_path / f"{key}.fp32.onnx"
        paths[f"{key} int8"] = tmp_path / f"{key}.int8.onnx"
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(12))
    reference = loaded.forward({"x": x})["output"].numpy().reshape(-1, 32)
    variants = []
    for name, path in paths.items():
        session = Session(path, threads=1)
        out = session.run({"x": x.numpy()})["output"].reshape(-1, 32)
        cosine = (out * reference).sum(1) / (
            np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        variants.append(VariantResult(
            name=name.replace("dense", "dense-equivalent").replace("lrt", "LRT"),
            file_bytes=model_bytes(path), is_baseline=name == "dense fp32",
            latency=time_runs([runner(session, {"x": x.numpy()})],
                              Schedule(runs=3, warmup=1)).stats(),
            fidelity={"mean_cosine": float(cosine.mean())},
            notes=[f"{DENSE_EQUIVALENT_NOTE}: {fold.pairs} MatMul pairs folded on the ONNX "
                   "graph"] if name == "dense fp32" else [],
        ))
    assert fold.pairs == 6
    fp32 = {v.name: v for v in variants}
    assert fp32["dense-equivalent fp32"].fidelity["mean_cosine"] > 0.99999
    assert fp32["LRT fp32"].fidelity["mean_cosine"] > 0.99999
    assert fp32["dense-equivalent int8"].fidelity["mean_cosine"] > 0.99
    report = ComparisonReport(model="foreign LRT (.pt2)", variants=variants,
                              settings={"baseline": DENSE_EQUIVALENT_NOTE})
    assert report.size_ratio(fp32["LRT fp32"]) < 1.0
    markdown = to_markdown(report)
    assert "dense-equivalent fp32 (baseline)" in markdown
    assert "Baseline: dense-equivalent (low-rank pairs multiplied out)" in markdown
    page = write_report(report, tmp_path / "report")["html"].read_text()
    assert "Baseline: dense-equivalent" in page
    assert sum(line.startswith("| dense-equivalent") or line.startswith("| LRT")
               for line in markdown.splitlines()) == 4
