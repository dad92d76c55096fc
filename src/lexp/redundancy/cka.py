"""Linear centred kernel alignment (CKA) between layers (paper Section 5.1, Appendix A.6).

For column-centred T × N activations X, Y of two layers::

    cka(X, Y) = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)

XᵀY, XᵀX and YᵀY are blocks of the centred cross-product of all neurons, i.e. of the co-moment
matrix that :func:`lexp.redundancy.covariance.streaming_moments` builds for the correlation
clustering. :func:`cka_matrix` therefore needs no second pass over the activations. CKA is a
ratio of degree-2 terms, so it is the same whether computed from the co-moment or the covariance.
"""

from __future__ import annotations

import warnings

import numpy as np

from lexp.errors import LexpInputError
from lexp.redundancy.covariance import Moments, constant_columns

__all__ = ["cka_matrix", "linear_cka"]


def _centred(a: np.ndarray, name: str) -> np.ndarray:
    """Column-centred copy in float64 (float32 inputs are promoted: this is for layer blocks and
    notebook-sized arrays; whole stores go through :func:`cka_matrix`)."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise LexpInputError(f"linear_cka: {name} must be 2-D (rows × neurons), got shape {a.shape}")
    a = a.astype(np.float64)
    a -= a.mean(axis=0)
    return a


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of two representations of the same T rows (any widths)."""
    if np.shape(X)[0] != np.shape(Y)[0]:
        raise LexpInputError(
            f"linear_cka: X and Y must have the same rows (one per word), got {np.shape(X)[0]} and "
            f"{np.shape(Y)[0]}"
        )
    Xc, Yc = _centred(X, "X"), _centred(Y, "Y")
    xy = np.linalg.norm(Xc.T @ Yc) ** 2
    den = np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc)
    if den == 0.0:
        raise LexpInputError("linear_cka: X or Y is constant over all rows; CKA is undefined")
    return float(xy / den)


def cka_matrix(cov_or_moments: Moments | np.ndarray, n_layers: int, hidden: int) -> np.ndarray:
    """(L, L) linear CKA between every pair of layers from one N × N co-moment/covariance matrix.

    Neurons are layer-major (column = layer·hidden + unit, layer 0 = embeddings), N = L·hidden.
    A layer whose neurons are all constant has undefined CKA: it gets 0 with every other layer,
    1 with itself, and a warning.
    """
    c = cov_or_moments.comoment if isinstance(cov_or_moments, Moments) else np.asarray(cov_or_moments)
    n = n_layers * hidden
    if n_layers < 1 or hidden < 1 or c.shape != (n, n):
        raise LexpInputError(
            f"cka_matrix: expected a ({n}, {n}) matrix for {n_layers} layers × {hidden} neurons, got "
            f"{c.shape}; pass the moments of all neurons of the store (columns=None)"
        )
    # sq[a, b] = ‖C_ab‖²_F, one block row (hidden × N) at a time — no N × N temporary.
    sq = np.empty((n_layers, n_layers), dtype=np.float64)
    for a in range(n_layers):
        row = np.asarray(c[a * hidden : (a + 1) * hidden], dtype=np.float64)
        sq[a] = np.einsum(
            "ilj,ilj->l", row.reshape(hidden, n_layers, hidden), row.reshape(hidden, n_layers, hidden)
        )
    sq = (sq + sq.T) / 2  # exact symmetry despite summation order
    norms = np.sqrt(np.diagonal(sq)).copy()
    dead = norms == 0.0
    if isinstance(cov_or_moments, Moments):  # rounding may leave ~1e-30 where the data is constant
        dead |= constant_columns(cov_or_moments).reshape(n_layers, hidden).all(axis=1)
    if dead.any():
        warnings.warn(
            f"cka_matrix: layers {np.flatnonzero(dead).tolist()} are constant; their CKA is set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
        norms[dead] = 1.0
    out = sq / np.outer(norms, norms)
    out[dead, :] = 0.0
    out[:, dead] = 0.0
    np.fill_diagonal(out, 1.0)
    return np.clip(out, 0.0, 1.0, out=out)
