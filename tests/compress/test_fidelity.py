from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrt_deploy.metrics import (
    cosine_per_row,
    embedding_fidelity,
    max_abs_diff,
    sqnr_db,
    top1_agreement,
)


def test_cosine_known_vectors() -> None:
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [-2.0, 0.0], [2.0, 4.0], [3.0, 4.0]])
    np.testing.assert_allclose(cosine_per_row(a, b), [0.0, -1.0, 1.0, 1.0], atol=1e-12)


def test_cosine_zero_vectors_give_no_nan() -> None:
    a = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    cosine = cosine_per_row(a, b)
    assert not np.isnan(cosine).any()
    np.testing.assert_array_equal(cosine, [1.0, 0.0, 0.0])


def test_cosine_flattens_leading_axes_and_checks_shapes() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    assert cosine_per_row(a, a).shape == (6,)
    np.testing.assert_allclose(cosine_per_row(a, a), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_per_row(a, a[:, :2])


def test_embedding_fidelity() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 1.0]])
    result = embedding_fidelity(reference, candidate)
    assert result["mean_cosine"] == pytest.approx((1.0 + math.sqrt(0.5)) / 2)
    assert result["worst_cosine"] == pytest.approx(math.sqrt(0.5))
    assert isinstance(result["mean_cosine"], float)


def test_sqnr() -> None:
    reference = np.array([3.0, 4.0])
    assert sqnr_db(reference, reference) == math.inf
    assert sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    # signal 25, noise 0.25 -> 20 dB
    assert sqnr_db(reference, np.array([3.5, 4.0])) == pytest.approx(20.0)


def test_top1_agreement() -> None:
    reference = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    candidate = np.array([[0.0, 2.0, 1.0], [0.1, 0.8, 0.1], [0.0, 0.0, 9.0], [5.0, 1.0, 1.0]])
    assert top1_agreement(reference, reference) == 1.0
    assert top1_agreement(reference, candidate) == 0.75
    assert top1_agreement(reference[None], candidate[None]) == 0.75
    with pytest.raises(ValueError, match="non-empty"):
        top1_agreement(np.zeros((0, 3)), np.zeros((0, 3)))


def test_max_abs_diff() -> None:
    assert max_abs_diff(np.array([1.0, -2.0]), np.array([1.5, 1.0])) == 3.0
    assert max_abs_diff(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0


def test_fidelity_does_not_import_torch() -> None:
    # The runtime install has numpy and onnxruntime only; scoring must not need torch.
    code = "import sys, lrt_deploy.metrics; sys.exit('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=False)
    assert result.returncode == 0


def test_kl_divergence_known_values():
    from lrt_deploy.metrics import kl_divergence

    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    # Adding a constant per row does not change a softmax.
    assert kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)
    p = np.array([0.5, 0.5])
    q = np.array([0.9, 0.1])
    expected = float(np.sum(p * np.log(p / q)))
    assert kl_divergence(np.log(p)[None], np.log(q)[None]) == pytest.approx(expected)
