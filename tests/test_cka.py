"""Linear CKA (Appendix A.6): known values, invariances, and the one-pass matrix from moments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from lexp.errors import LexpInputError
from lexp.redundancy.cka import cka_matrix, linear_cka
from lexp.redundancy.covariance import covariance, streaming_moments


def _direct(X: np.ndarray, Y: np.ndarray) -> float:
    """The formula written out: centre, then ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)."""
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.sum((X.T @ Y) ** 2) / (np.sqrt(np.sum((X.T @ X) ** 2)) * np.sqrt(np.sum((Y.T @ Y) ** 2)))


@pytest.fixture
def xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 12))
    Y = X @ rng.standard_normal((12, 9)) + 0.8 * rng.standard_normal((400, 9))
    return X, Y


def test_identity_symmetry_and_direct_formula(xy) -> None:
    X, Y = xy
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X), abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(_direct(X, Y), rel=1e-12)
    assert 0.2 < linear_cka(X, Y) < 0.95  # related but not identical: a non-trivial value


def test_invariances(xy) -> None:
    X, Y = xy
    q = ortho_group.rvs(9, random_state=1)
    base = linear_cka(X, Y)
    assert linear_cka(X, Y @ q) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X + 100.0, Y - 5.0) == pytest.approx(base, rel=1e-9)  # centring
    # Not invariant to an anisotropic scaling: the invariance checks above can fail.
    assert abs(linear_cka(X * np.arange(1, 13), Y) - base) > 1e-3


def test_hand_example() -> None:
    # a ⟂ b, centred, equal norms: XᵀY = [|a|², 0], XᵀX = |a|², YᵀY = |a|²·I → CKA = 1/√2.
    a = np.array([1.0, -1.0, 1.0, -1.0])
    b = np.array([1.0, 1.0, -1.0, -1.0])
    assert linear_cka(a[:, None], np.stack([a, b], 1)) == pytest.approx(1 / np.sqrt(2), abs=1e-15)


def test_bad_input() -> None:
    with pytest.raises(LexpInputError, match="same rows"):
        linear_cka(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(LexpInputError, match="constant"):
        linear_cka(np.ones((3, 2)), np.random.default_rng(0).standard_normal((3, 2)))
    with pytest.raises(LexpInputError, match="expected a \\(12, 12\\) matrix"):
        cka_matrix(np.eye(10), n_layers=3, hidden=4)


def test_cka_matrix_from_moments_equals_blockwise_linear_cka() -> None:
    rng = np.random.default_rng(2)
    n_layers, hidden = 5, 7
    base = rng.standard_normal((600, hidden))
    layers = [base]
    for _ in range(n_layers - 1):  # each layer a noisy mix of the previous one, like a transformer
        layers.append(
            layers[-1] @ rng.standard_normal((hidden, hidden)) * 0.5 + rng.standard_normal((600, hidden))
        )
    x = np.concatenate(layers, axis=1).astype(np.float32)
    m = streaming_moments(x, chunk_rows=128)
    mat = cka_matrix(m, n_layers, hidden)
    expected = np.array(
        [
            [
                linear_cka(x[:, a * hidden : (a + 1) * hidden], x[:, b * hidden : (b + 1) * hidden])
                for b in range(n_layers)
            ]
            for a in range(n_layers)
        ]
    )
    np.testing.assert_allclose(mat, expected, atol=1e-6)
    np.testing.assert_array_equal(mat, mat.T)
    np.testing.assert_array_equal(np.diagonal(mat), 1.0)
    assert mat[0, 1] > mat[0, 4]  # similarity decays with layer distance in this construction
    np.testing.assert_allclose(cka_matrix(covariance(m), n_layers, hidden), mat, atol=1e-12)


def test_constant_layer_warns() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((50, 3)), np.ones((50, 3))], axis=1).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"layers \[1\] are constant"):
        mat = cka_matrix(streaming_moments(x), n_layers=2, hidden=3)
    np.testing.assert_array_equal(mat, np.eye(2))
