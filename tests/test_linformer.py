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
