"""Linear centred kernel alignment (CKA) between layers (paper Section 5.1, Appendix A.6).

For column-centred T × N activations X, Y of two layers (the paper's, *biased* estimator)::

    cka(X, Y) = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)

XᵀY, XᵀX and YᵀY are blocks of the centred cross-product of all neurons, i.e. of the co-moment
matrix that :func:`lexp.redundancy.covariance.streaming_moments` builds for the correlation
clustering. :func:`cka_matrix` therefore needs no second pass over the activations. CKA is a
ratio of degree-2 terms, so it is the same whether computed from the co-moment or the covariance.

**Debiased CKA** (Nguyen, Raghu & Kornblith 2021; Kornblith et al.'s
``feature_space_linear_cka(..., debiased=True)``): the biased HSIC has a positive bias of order
N/T, so two unrelated wide layers get a CKA well above 0 on few rows. The unbiased HSIC estimator
of Song et al. (2012), on the linear Gram matrices K = XXᵀ, L = YYᵀ of the T rows with their
diagonals set to zero (K̃, L̃), is::

    HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((T−1)(T−2)) − 2/(T−2) · 1ᵀK̃L̃1] / (T(T−3))

It is unchanged by a shift of the features, so take X, Y column-centred: the rows of K then sum
to 0, a row of K̃ sums to −K_tt, and with q_t^X = K_tt = ‖x_t‖² (the squared norm of row t)::

    tr(K̃L̃)  = tr(KL) − Σ_t K_tt L_tt = ‖XᵀY‖²_F − Σ_t q_t^X q_t^Y
    1ᵀK̃1    = −Σ_t q_t^X = −tr(XᵀX)
    1ᵀK̃L̃1   = Σ_t (−K_tt)(−L_tt) = Σ_t q_t^X q_t^Y

    T(T−3)·HSIC₁ = ‖XᵀY‖²_F + tr(XᵀX) tr(YᵀY) / ((T−1)(T−2)) − T/(T−2) · Σ_t q_t^X q_t^Y

(Kornblith et al.'s ``_debiased_dot_product_similarity_helper``). Debiased CKA =
HSIC₁(K, L) / √(HSIC₁(K, K) HSIC₁(L, L)); the factor T(T−3) cancels. ‖XᵀY‖², the traces and
‖XᵀX‖ are co-moment blocks as above; the only new term is ``Q_XY = Σ_t q_t^X q_t^Y`` per pair of
layers, which the same streaming pass accumulates when given ``layer_sizes``
(``Moments.row_norm_products``; the algebra of doing it in one pass is in
:class:`lexp.redundancy.covariance._RowNorms`). The debiased value can be slightly negative for
unrelated layers (it estimates a population value of 0) and is not clipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from lexp.errors import LexpInputError
from lexp.redundancy.covariance import Moments, constant_columns

__all__ = ["cka_blocks", "cka_from_terms", "cka_matrix", "debiased_hsic_terms", "linear_cka"]


def _centred(a: np.ndarray, name: str) -> np.ndarray:
    """Column-centred copy in float64 (float32 inputs are promoted: this is for layer blocks and
    notebook-sized arrays; whole stores go through :func:`cka_matrix`)."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise LexpInputError(f"linear_cka: {name} must be 2-D (rows × neurons), got shape {a.shape}")
    a = a.astype(np.float64)
    a -= a.mean(axis=0)
    return a


def debiased_hsic_terms(
    xy_sq: np.ndarray, trace_x: np.ndarray, trace_y: np.ndarray, q: np.ndarray, n: int
) -> np.ndarray:
    """T(T−3)·HSIC₁ from ‖XᵀY‖²_F, tr(XᵀX), tr(YᵀY) and Σ_t q_t^X q_t^Y (broadcasts; see module)."""
    return xy_sq + np.multiply.outer(trace_x, trace_y) / ((n - 1) * (n - 2)) - n / (n - 2) * q


def linear_cka(X: np.ndarray, Y: np.ndarray, *, debiased: bool = False) -> float:
    """Linear CKA of two representations of the same T rows (any widths); ``debiased``: the
    unbiased-HSIC estimator (module docstring), like Kornblith et al.'s feature-space version."""
    if np.shape(X)[0] != np.shape(Y)[0]:
        raise LexpInputError(
            f"linear_cka: X and Y must have the same rows (one per word), got {np.shape(X)[0]} and "
            f"{np.shape(Y)[0]}"
        )
    Xc, Yc = _centred(X, "X"), _centred(Y, "Y")
    xy = np.linalg.norm(Xc.T @ Yc) ** 2
    xx = np.linalg.norm(Xc.T @ Xc) ** 2
    yy = np.linalg.norm(Yc.T @ Yc) ** 2
    if xx == 0.0 or yy == 0.0:
        raise LexpInputError("linear_cka: X or Y is constant over all rows; CKA is undefined")
    if not debiased:
        return float(xy / np.sqrt(xx * yy))
    n = Xc.shape[0]
    if n < 4:
        raise LexpInputError(f"linear_cka: the debiased CKA needs at least 4 rows, got {n}")
    qx, qy = np.einsum("ij,ij->i", Xc, Xc), np.einsum("ij,ij->i", Yc, Yc)
    tx, ty = qx.sum(), qy.sum()
    num = debiased_hsic_terms(xy, tx, ty, qx @ qy, n)
    den = debiased_hsic_terms(xx, tx, tx, qx @ qx, n) * debiased_hsic_terms(yy, ty, ty, qy @ qy, n)
    if den <= 0.0:
        raise LexpInputError("linear_cka: the debiased self-similarity is not positive (too few rows?)")
    return float(num / np.sqrt(den))


def cka_blocks(
    cov_or_moments: Moments | np.ndarray,
    layer_sizes: Sequence[int] | None = None,
    *,
    debiased: bool = False,
) -> np.ndarray:
    """(G, G) linear CKA between consecutive column groups (layers) of any widths.

    ``layer_sizes`` default to ``moments.layer_sizes``. This is what :func:`cka_matrix` computes for
    one model (G = L layers of ``hidden``) and what ``analysis=compare`` uses for two models side
    by side (the layers of A, then those of B; the cross block is model A × model B).
    ``debiased`` needs :class:`Moments` from a pass given the same ``layer_sizes``.
    A group whose neurons are all constant has undefined CKA: it gets 0 with every other group,
    1 with itself, and a warning. The biased values are clipped to [0, 1] (rounding), the
    debiased ones only have their diagonal set to 1.
    """
    is_moments = isinstance(cov_or_moments, Moments)
    c = cov_or_moments.comoment if is_moments else np.asarray(cov_or_moments)
    if layer_sizes is None:
        layer_sizes = cov_or_moments.layer_sizes if is_moments else None
        if layer_sizes is None:
            raise LexpInputError("cka_blocks: give layer_sizes (one width per layer)")
    sizes = [int(s) for s in layer_sizes]
    n = sum(sizes)
    if not sizes or min(sizes) < 1 or c.shape != (n, n):
        raise LexpInputError(
            f"cka_matrix: expected a ({n}, {n}) matrix for layers of widths {sizes}, got {c.shape}; pass "
            "the moments of all neurons of the store (columns=None)"
        )
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    g = len(sizes)
    # sq[a, b] = ‖C_ab‖²_F, one block row (width_a × N) at a time — no N × N temporary.
    sq = np.empty((g, g), dtype=np.float64)
    for a in range(g):
        row = np.asarray(c[bounds[a] : bounds[a + 1]], dtype=np.float64)
        col_sq = np.einsum("ij,ij->j", row, row)  # Σ_i C_ij² per column j
        sq[a] = np.add.reduceat(col_sq, bounds[:-1])
    sq = (sq + sq.T) / 2  # exact symmetry despite summation order
    dead = np.diagonal(sq) == 0.0
    if is_moments:  # rounding may leave ~1e-30 where the data is constant
        const = constant_columns(cov_or_moments)
        dead |= np.logical_and.reduceat(const, bounds[:-1])
    if debiased:
        num = _debiased(cov_or_moments, sizes, sq, bounds, c)
    else:
        num = sq
    return _normalised(num, dead, debiased=debiased, n=getattr(cov_or_moments, "n", 0), stacklevel=4)


def _debiased(
    m: Moments | np.ndarray, sizes: list[int], sq: np.ndarray, bounds: np.ndarray, c: np.ndarray
) -> np.ndarray:
    """T(T−3)·HSIC₁ for every pair of groups (module docstring) from the co-moment and Q."""
    if not isinstance(m, Moments) or m.row_norm_products is None:
        raise LexpInputError(
            "cka_matrix(debiased=True) needs the per-row layer norms of the pass: compute the moments "
            "with streaming_moments(..., layer_sizes=[hidden] * n_layers)"
        )
    if list(m.layer_sizes or ()) != sizes:
        raise LexpInputError(
            f"cka_matrix(debiased=True): the moments' layer_sizes {list(m.layer_sizes or ())} differ from "
            f"the layers asked for {sizes}; recompute them with layer_sizes={sizes}"
        )
    if m.n < 4:
        raise LexpInputError(f"cka_matrix: the debiased CKA needs at least 4 rows, got {m.n}")
    trace = np.add.reduceat(np.asarray(np.diagonal(c), dtype=np.float64), bounds[:-1])
    return debiased_hsic_terms(sq, trace, trace, np.asarray(m.row_norm_products), m.n)


def cka_matrix(
    cov_or_moments: Moments | np.ndarray, n_layers: int, hidden: int, *, debiased: bool = False
) -> np.ndarray:
    """(L, L) linear CKA between every pair of layers from one N × N co-moment/covariance matrix.

    Neurons are layer-major (column = layer·hidden + unit, layer 0 = embeddings), N = L·hidden.
    ``debiased``: the unbiased-HSIC estimator (module docstring); it needs :class:`Moments` from
    ``streaming_moments(..., layer_sizes=[hidden] * n_layers)``.
    A layer whose neurons are all constant has undefined CKA: it gets 0 with every other layer,
    1 with itself, and a warning.
    """
    if n_layers < 1 or hidden < 1:
        raise LexpInputError(f"cka_matrix: n_layers and hidden must be ≥ 1, got {n_layers} and {hidden}")
    return cka_blocks(cov_or_moments, [hidden] * n_layers, debiased=debiased)


def cka_from_terms(
    sq: np.ndarray,
    trace: np.ndarray,
    n: int,
    *,
    dead: np.ndarray | None = None,
    q: np.ndarray | None = None,
) -> np.ndarray:
    """(G, G) CKA from its terms, as :func:`cka_blocks` computes it from a dense co-moment.

    ``sq[a, b] = ‖C_ab‖²_F``, ``trace[a] = tr(C_aa)``, ``n`` rows; ``q`` given: the debiased CKA with
    ``Q = Moments.row_norm_products`` (module docstring). The blocked path at LLM width
    (:mod:`lexp.redundancy.wide`) accumulates these terms panel by panel without an N × N matrix.
    ``dead``: layers whose neurons are all constant (0 with the others, 1 with themselves).
    """
    sq = (np.asarray(sq, dtype=np.float64) + np.asarray(sq, dtype=np.float64).T) / 2
    g = sq.shape[0]
    dead = np.zeros(g, dtype=bool) if dead is None else np.asarray(dead, dtype=bool).copy()
    if q is not None:
        if n < 4:
            raise LexpInputError(f"cka_from_terms: the debiased CKA needs at least 4 rows, got {n}")
        num = debiased_hsic_terms(sq, trace, trace, np.asarray(q, dtype=np.float64), n)
    else:
        num = sq
    return _normalised(num, dead, debiased=q is not None, n=n, stacklevel=3)


def _normalised(num: np.ndarray, dead: np.ndarray, *, debiased: bool, n: int, stacklevel: int) -> np.ndarray:
    """CKA from the (L, L) HSIC terms ``num``: divide by the self-similarities; a constant
    (``dead``) layer gets 0 with the others and 1 with itself (warned); biased CKA is clipped to
    [0, 1]. Shared by :func:`cka_matrix` and :func:`cka_from_terms` so both paths agree exactly."""
    diag = np.diagonal(num).copy()
    if debiased:
        bad = ~dead & (diag <= 0.0)
        if bad.any():
            raise LexpInputError(
                f"cka_matrix: the debiased self-similarity of layers {np.flatnonzero(bad).tolist()} is not "
                f"positive over {n} rows (too few rows for their width?); use the biased CKA"
            )
    if dead.any():
        warnings.warn(
            f"cka_matrix: layers {np.flatnonzero(dead).tolist()} are constant; their CKA is set to 0",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        diag[dead] = 1.0
    norms = np.sqrt(diag)
    out = num / np.outer(norms, norms)
    out[dead, :] = 0.0
    out[:, dead] = 0.0
    np.fill_diagonal(out, 1.0)
    return out if debiased else np.clip(out, 0.0, 1.0, out=out)
