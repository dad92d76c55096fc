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


# ------------------------------------------------------------------------------ debiased CKA
def _hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written out on the T × T Gram matrices (diagonals zeroed)."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(K @ L)
            + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ K @ L @ one)
        )
        / (n * (n - 3))
    )


def _direct_debiased(X: np.ndarray, Y: np.ndarray, centre: bool = True) -> float:
    """O(T²) reference: HSIC₁ of the linear Gram matrices, normalised (Nguyen et al. 2021)."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if centre:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    K, L = X @ X.T, Y @ Y.T
    return _hsic1(K, L) / np.sqrt(_hsic1(K, K) * _hsic1(L, L))


def _layered(rows: int, widths: list[int], offset: float, seed: int = 3) -> np.ndarray:
    """Layers of the given widths, each a noisy mix of the previous one, shifted by ``offset``·N(0,1)."""
    rng = np.random.default_rng(seed)
    layers = [rng.standard_normal((rows, widths[0]))]
    for w in widths[1:]:
        prev = layers[-1]
        layers.append(prev @ rng.standard_normal((prev.shape[1], w)) * 0.5 + rng.standard_normal((rows, w)))
    x = np.concatenate(layers, axis=1)
    return (x + offset * rng.standard_normal(x.shape[1])).astype(np.float32)


def _reference(x: np.ndarray, widths: list[int]) -> np.ndarray:
    b = np.concatenate([[0], np.cumsum(widths)])
    blocks = [x[:, b[i] : b[i + 1]] for i in range(len(widths))]
    return np.array([[_direct_debiased(p, q) for q in blocks] for p in blocks])


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_debiased_cka_from_one_pass_equals_the_gram_formula(chunk_rows: int) -> None:
    """Both passes (ssyrk on the CPU; the torch/device algorithm run on the CPU) give Song et al.'s
    HSIC₁ on the Gram matrices, with an offset 1e3 × the spread (the sums are taken about a shift)."""
    import torch

    from lexp.redundancy.covariance import _array_chunks, _moments_on_device

    n_layers, hidden = 4, 6
    x = _layered(150, [hidden] * n_layers, offset=1e3)
    expected = _reference(x, [hidden] * n_layers)
    cpu = streaming_moments(x, chunk_rows=chunk_rows, layer_sizes=[hidden] * n_layers)
    dev = _moments_on_device(
        _array_chunks(x.copy(), chunk_rows, None),
        torch.device("cpu"),
        "float32",
        "x",
        layer_sizes=(hidden,) * n_layers,
    )
    for m in (cpu, dev):
        got = cka_matrix(m, n_layers, hidden, debiased=True)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        np.testing.assert_array_equal(got, got.T)
    np.testing.assert_allclose(cpu.row_norm_products, dev.row_norm_products, rtol=1e-6)
    # Debiasing moves the values (this data: by ~0.03): the assertion above can fail.
    assert np.abs(cka_matrix(cpu, n_layers, hidden) - expected).max() > 1e-2


def test_debiased_cka_on_the_device(device) -> None:
    """The public pass on ``device`` (CPU: ssyrk; CUDA: the torch path) gives the same debiased CKA."""
    n_layers, hidden = 3, 5
    x = _layered(120, [hidden] * n_layers, offset=1e3, seed=5)
    m = streaming_moments(x, chunk_rows=32, device=device, layer_sizes=[hidden] * n_layers)
    np.testing.assert_allclose(
        cka_matrix(m, n_layers, hidden, debiased=True), _reference(x, [hidden] * n_layers), atol=1e-6
    )


def test_debiased_linear_cka_and_translation_invariance() -> None:
    """linear_cka(debiased=True) = the Gram formula; HSIC₁ of *uncentred* features is the same."""
    x = _layered(80, [5, 3], offset=0.0).astype(np.float64)
    X, Y = x[:, :5], x[:, 5:]
    ref = _direct_debiased(X, Y)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(ref, abs=1e-12)
    assert _direct_debiased(X + 2.0, Y - 3.0, centre=False) == pytest.approx(ref, abs=1e-9)
    assert linear_cka(X, Y, debiased=True) != pytest.approx(linear_cka(X, Y), abs=1e-3)


def test_debiased_removes_the_bias_of_unrelated_wide_layers() -> None:
    """Independent layers: the population CKA is 0. Biased ≈ N/T (0.2 here), debiased ≈ 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 150)).astype(np.float32)
    m = streaming_moments(x, chunk_rows=64, layer_sizes=[50, 50, 50])
    biased = cka_matrix(m, 3, 50)
    debiased = cka_matrix(m, 3, 50, debiased=True)
    off = ~np.eye(3, dtype=bool)
    assert biased[off].min() > 0.15
    assert np.abs(debiased[off]).max() < 0.03
    assert np.diagonal(debiased).tolist() == [1.0, 1.0, 1.0]


def test_cka_blocks_of_unequal_widths() -> None:
    """Two models side by side (layers of different widths): every block pair = linear_cka."""
    from lexp.redundancy.cka import cka_blocks

    widths = [4, 4, 7, 7, 7]
    x = _layered(100, widths, offset=50.0, seed=9)
    m = streaming_moments(x, chunk_rows=33, layer_sizes=widths)
    b = np.concatenate([[0], np.cumsum(widths)])
    blocks = [x[:, b[i] : b[i + 1]] for i in range(len(widths))]
    biased = np.array([[linear_cka(p, q) for q in blocks] for p in blocks])
    np.testing.assert_allclose(cka_blocks(m), biased, atol=1e-6)
    np.testing.assert_allclose(cka_blocks(m, debiased=True), _reference(x, widths), atol=1e-6)


def test_debiased_needs_the_sums_of_the_same_layers() -> None:
    x = _layered(60, [4, 4, 4], offset=0.0)
    with pytest.raises(LexpInputError, match="layer_sizes=\\[hidden\\] \\* n_layers"):
        cka_matrix(streaming_moments(x), 3, 4, debiased=True)
    with pytest.raises(LexpInputError, match="differ from the layers asked for \\[6, 6\\]"):
        cka_matrix(streaming_moments(x, layer_sizes=[4, 8]), 2, 6, debiased=True)
    with pytest.raises(LexpInputError, match="needs the per-row layer norms"):
        cka_matrix(covariance(streaming_moments(x, layer_sizes=[4] * 3)), 3, 4, debiased=True)
    with pytest.raises(LexpInputError, match="sum to 10, but the rows have 12"):
        streaming_moments(x, layer_sizes=[5, 5])
    with pytest.raises(LexpInputError, match="column counts ≥ 1"):
        streaming_moments(x, layer_sizes=[])
