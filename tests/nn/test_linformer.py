from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lrt_deploy.nn import LinformerSelfAttention

HIDDEN, HEADS, MAX_LENGTH, K = 32, 4, 16, 6


def _attention(share: str = "none", projection: nn.Linear | None = None) -> LinformerSelfAttention:
    torch.manual_seed(0)
    return LinformerSelfAttention(
        HIDDEN, HEADS, MAX_LENGTH, None if projection is not None else K, share, projection
    ).eval()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("share", ["none", "headwise", "kv"])
@pytest.mark.parametrize("length", [MAX_LENGTH, 9])
def test_shapes(share: str, length: int) -> None:
    attention = _attention(share)
    x = torch.randn(2, length, HIDDEN)
    assert attention(x).shape == (2, length, HIDDEN)
    assert attention(x, torch.ones(2, length)).shape == (2, length, HIDDEN)


def test_padding_does_not_leak() -> None:
    attention = _attention()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, HIDDEN, generator=generator)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    noisy = x.clone()
    noisy[0, 6:] = 1000.0 * torch.randn(4, HIDDEN, generator=generator)
    with torch.no_grad():
        clean_out = attention(x, mask)
        noisy_out = attention(noisy, mask)
        # Real tokens see the same thing as the unpadded sequence alone.
        alone = attention(x[:1, :6])
    torch.testing.assert_close(noisy_out[0, :6], clean_out[0, :6])
    torch.testing.assert_close(clean_out[0, :6], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noisy_out[1], clean_out[1])


def test_too_long_input_names_max_length() -> None:
    with pytest.raises(ValueError, match="exceeds max_length=16"):
        _attention()(torch.randn(1, MAX_LENGTH + 1, HIDDEN))


def test_sharing_reduces_parameters() -> None:
    base = 4 * (HIDDEN * HIDDEN + HIDDEN)
    assert _count(_attention("none")) == base + 2 * HEADS * K * MAX_LENGTH
    assert _count(_attention("headwise")) == base + 2 * K * MAX_LENGTH
    assert _count(_attention("kv")) == base + K * MAX_LENGTH
    shared = nn.Linear(MAX_LENGTH, K, bias=False)
    layers = nn.ModuleList([_attention("layerwise", shared) for _ in range(3)])
    assert _count(layers) == 3 * base + K * MAX_LENGTH
    assert layers[0].k == K


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="share must be one of"):
        LinformerSelfAttention(HIDDEN, HEADS, MAX_LENGTH, K, share="all")
    with pytest.raises(ValueError, match="needs projection=nn.Linear"):
        LinformerSelfAttention(HIDDEN, HEADS, MAX_LENGTH, share="layerwise")
    with pytest.raises(ValueError, match="max_length is 16"):
        LinformerSelfAttention(
            HIDDEN, HEADS, MAX_LENGTH, share="layerwise", projection=nn.Linear(8, K, bias=False)
        )
    with pytest.raises(ValueError, match="only used with share='layerwise'"):
        LinformerSelfAttention(
            HIDDEN, HEADS, MAX_LENGTH, K, projection=nn.Linear(MAX_LENGTH, K, bias=False)
        )
    with pytest.raises(ValueError, match="k must be an int"):
        LinformerSelfAttention(HIDDEN, HEADS, MAX_LENGTH, MAX_LENGTH + 1)
    with pytest.raises(ValueError, match="must divide"):
        LinformerSelfAttention(30, 4, MAX_LENGTH, K)


def test_onnx_export_fixed_length(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    attention = _attention("headwise")
    x = torch.randn(2, 12, HIDDEN)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    path = tmp_path / "linformer.onnx"
    torch.onnx.export(attention, (x, mask), str(path), dynamo=True, input_names=["x", "mask"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected = attention(x, mask).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share", ["none", "headwise", "kv"])
def test_matches_the_zero_padded_formulation(share: str) -> None:
    """Slicing the projections (and projecting before the head split) is exactly the paper's
    form: keys and values zero-padded to max_length, projected per head."""
    attention = _attention(share)
    x = torch.randn(2, 11, HIDDEN, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 11)
    mask[1, 8:] = 0

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, -1, HEADS, HIDDEN // HEADS).transpose(1, 2)

    with torch.no_grad():
        pad = (0, 0, 0, MAX_LENGTH - 11)
        key = nn.functional.pad(attention.key(x) * mask[..., None], pad)
        value = nn.functional.pad(attention.value(x) * mask[..., None], pad)
        key_projection, value_projection = attention._projections()
        key, value = key_projection @ heads(key), value_projection @ heads(value)
        query = heads(attention.query(x))
        probs = (query @ key.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5).softmax(-1)
        expected = attention.output((probs @ value).transpose(1, 2).reshape(2, 11, HIDDEN))
        torch.testing.assert_close(attention(x, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("share", "fused"), [("headwise", 1), ("kv", 1), ("none", 1)])
def test_shared_projection_exports_as_fused_attention(tmp_path, share: str, fused: int) -> None:
    """Linformer attention is ORT's MultiHeadAttention over k key rows (one fused kernel): with a
    shared projection keys and values are projected before the head split; onnxscript's SDPA
    rule also fuses per-head projections (share="none")."""
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.passes.fusion import fuse_transformer
    from lrt_deploy.graph.ops import op_counts
    from lrt_deploy.load import LoadedModel

    attention = _attention(share)
    x = torch.randn(1, MAX_LENGTH, HIDDEN, generator=torch.Generator().manual_seed(8))
    loaded = LoadedModel(module=attention, format="pickle", name="linformer",
                         example_inputs={"hidden_states": x}, output_names=["output"],
                         dynamic_axes={})
    raw = export_onnx(loaded, tmp_path / "linformer.onnx")
    result = fuse_transformer(raw, tmp_path / "fused.onnx", num_heads=HEADS, hidden_size=HIDDEN,
                              check_inputs={"hidden_states": x.numpy()})
    assert result.details["attention_layers"] == fused
    assert op_counts(tmp_path / "fused.onnx")["MultiHeadAttention"] == fused
    assert result.details["max_abs_diff"] is not None and result.details["max_abs_diff"] < 1e-4
