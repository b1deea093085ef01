"""The torch simulation rounds with the numpy rules' numbers, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lrt_deploy.quant import rules  # noqa: E402
from lrt_deploy.quant.simulate import (  # noqa: E402
    fake_int4_blocks,
    fake_int8_per_channel,
    fake_int8_per_tensor,
    fake_uint8_dynamic,
    int4_block_scale,
    int8_row_scale,
)

# (out, in): odd and tiny inner axes, and the shapes of a MiniLM block's projections.
SHAPES = [(24, 97), (5, 3), (384, 384), (1536, 384), (384, 1536)]


def _weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    weight[0] = 0.0  # an all-zero row takes scale 1 in both
    weight[-1, :2] = torch.tensor([0.4, -0.3])  # a pair that sets the pair-safe scale
    return weight


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grid", rules.INT8_WEIGHT_GRIDS)
def test_int8_row_scale_equals_the_rule(shape: tuple[int, int], grid: str) -> None:
    weight = _weight(shape, seed=sum(shape))
    ours = int8_row_scale(weight, grid).numpy().ravel()
    theirs = rules.int8_weight_scale(weight.numpy().T, grid, k_axis=0).ravel()  # (K, N) layout
    np.testing.assert_array_equal(ours, theirs)
    codes, _ = (rules.pair_safe_int8 if grid == "pair-safe" else rules.symmetric_int8)(
        weight.numpy().T, k_axis=0)
    fake = fake_int8_per_channel(weight, grid).numpy()
    np.testing.assert_allclose(fake, (codes.T * theirs[:, None]), rtol=0, atol=1e-7)


def test_per_tensor_scale_equals_the_rule() -> None:
    weight = _weight((300, 48), seed=3)
    scale = rules.full_range_scale(weight.numpy(), per_channel=False).astype(np.float32)
    codes, _ = rules.symmetric_int8(weight.numpy(), per_channel=False)
    np.testing.assert_array_equal(fake_int8_per_tensor(weight).numpy(), codes * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [16, 32])
def test_int4_blocks_equal_the_rule(shape: tuple[int, int], block: int) -> None:
    weight = _weight(shape, seed=7)
    scale = rules.int4_block_scale(weight.numpy(), block)
    np.testing.assert_array_equal(int4_block_scale(weight, block).numpy(), scale)
    codes, block_scale = rules.int4_blocks(weight.numpy(), block)
    assert codes.min() >= -8 and codes.max() <= 7
    expanded = np.repeat(block_scale, block, axis=1)[:, : shape[1]]
    np.testing.assert_array_equal(fake_int4_blocks(weight, block).numpy(), codes * expanded)


def test_dynamic_uint8_grid_equals_the_rule() -> None:
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(5)) * 3 + 1
    scale, zero = rules.uint8_grid(float(x.min()), float(x.max()))
    codes = np.clip(np.rint(x.numpy() / scale) + zero, 0, 255)
    np.testing.assert_allclose(fake_uint8_dynamic(x).numpy(), (codes - float(zero)) * scale,
                               rtol=0, atol=float(scale) * 1e-3)
    assert rules.uint8_grid(0.0, 0.0) == (1.0, 0)
