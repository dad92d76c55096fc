"""Correlation clustering of neurons (paper Section 5.2, Figures 2–3, Table 6).

Neurons whose activations are highly correlated over all words carry the same information. The
paper's procedure, reproduced here:

1. distance ``1 − |corr|`` between every pair of neurons (:func:`neuron_distance`);
2. agglomerative clustering with average linkage (:func:`neuron_linkage`, scipy);
3. flat clusters whose cophenetic distance is ≤ ct (:func:`flat_clusters`, :func:`cut_many`);
4. one neuron per cluster, picked at random as in the paper, or the cluster medoid
   (:func:`representatives`);
5. the layer make-up of the clusters, Figure 3 (:func:`cluster_makeup`).

The linkage is built once and cut at every ct (0.0 … 0.9) — cutting costs O(N). At BERT-base
size (N = 9,984) scipy's average linkage takes ≈ 2–3 s and the condensed distance vector 0.4 GB,
so no faster clustering library is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from lexp.errors import LexpInputError

__all__ = [
    "MAKEUP_CATEGORIES",
    "adjusted_rand",
    "cluster_makeup",
    "condensed_distance",
    "cut_many",
    "flat_clusters",
    "load_linkage",
    "neuron_distance",
    "neuron_layers",
    "neuron_linkage",
    "representatives",
    "save_linkage",
]

#: Figure 3's categories by layer span (max layer − min layer) of a cluster: 0, 1, 2, ≥ 3.
MAKEUP_CATEGORIES = ("same_layer", "adjacent", "within_three", "further")


def _check_corr(corr: np.ndarray) -> np.ndarray:
    corr = np.asarray(corr)
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] < 1:
        raise LexpInputError(
            f"correlation matrix must be square N × N, got shape {corr.shape}; "
            "compute it with lexp.redundancy.covariance.correlation()"
        )
    return corr


def _to_distance(values: np.ndarray, signed: bool) -> np.ndarray:
    """In place: correlations → distances (1 − |corr| or 1 − corr), clipped to the valid range."""
    if signed:
        np.subtract(1.0, values, out=values)
        np.clip(values, 0.0, 2.0, out=values)
    else:
        np.abs(values, out=values)
        np.subtract(1.0, values, out=values)
        np.clip(values, 0.0, 1.0, out=values)
    return values


def neuron_distance(corr: np.ndarray, signed: bool = False) -> np.ndarray:
    """Square N × N distance matrix between neurons (zero diagonal).

    ``signed=False`` (the paper): ``1 − |corr|`` ∈ [0, 1] — a neuron and its sign-flipped copy
    encode the same thing. ``signed=True``: ``1 − corr`` ∈ [0, 2] (NeuroX's
    ``use_abs_correlation=False``): for positively correlated neurons ct means the same as in the
    unsigned distance, while anti-correlated neurons are further apart than unrelated ones (> 1)
    and are never merged at ct < 1.
    """
    corr = _check_corr(corr)
    dist = _to_distance(np.array(corr, dtype=np.float64), signed)
    np.fill_diagonal(dist, 0.0)
    return dist


def condensed_distance(corr: np.ndarray, signed: bool = False) -> np.ndarray:
    """The condensed (upper-triangle, row-major) form of :func:`neuron_distance`, as scipy wants.

    Built row by row from ``corr``'s upper triangle: N(N−1)/2 float64 values and no N × N
    temporary (``squareform(1 − abs(corr))`` would hold two more N × N matrices).
    """
    corr = _check_corr(corr)
    n = corr.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    pos = 0
    for i in range(n - 1):
        out[pos : pos + n - 1 - i] = corr[i, i + 1 :]
        pos += n - 1 - i
    if not np.isfinite(out).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(corr))[0])
        raise LexpInputError(
            f"correlation matrix has a non-finite entry at ({i}, {j}); compute it with "
            "lexp.redundancy.covariance.correlation(), which maps constant neurons to 0 instead of NaN"
        )
    return _to_distance(out, signed)


def neuron_linkage(corr: np.ndarray, signed: bool = False) -> np.ndarray:
    """Average-linkage hierarchy (scipy linkage matrix Z, (N−1) × 4 float64) of the neurons."""
    dist = condensed_distance(corr, signed)
    if dist.size == 0:
        return np.empty((0, 4), dtype=np.float64)
    return linkage(dist, method="average")


def _check_linkage(Z: np.ndarray, where: str) -> np.ndarray:
    Z = np.asarray(Z)
    if Z.ndim != 2 or Z.shape[1] != 4 or Z.dtype != np.float64 or not np.isfinite(Z).all():
        raise LexpInputError(
            f"{where}: not a linkage matrix (need finite float64 (N−1) × 4, got {Z.dtype} {Z.shape}); "
            "build it with neuron_linkage()"
        )
    return Z


def flat_clusters(Z: np.ndarray, ct: float) -> np.ndarray:
    """Cluster id (0-based, int64) of every neuron: clusters whose cophenetic distance is ≤ ct.

    ``ct = 0`` keeps every neuron alone except exact duplicates (|corr| = 1). Ids are scipy's
    ``fcluster(Z, ct, criterion="distance")`` minus one.
    """
    Z = _check_linkage(Z, "flat_clusters")
    if not np.isfinite(ct) or ct < 0:
        raise LexpInputError(f"flat_clusters: ct must be a finite distance ≥ 0 (paper: 0.0–0.9), got {ct}")
    if Z.shape[0] == 0:
        return np.zeros(1, dtype=np.int64)
    return fcluster(Z, t=float(ct), criterion="distance").astype(np.int64) - 1


def cut_many(Z: np.ndarray, cts: Iterable[float]) -> dict[float, np.ndarray]:
    """``{ct: flat_clusters(Z, ct)}`` for every threshold, from one linkage."""
    return {float(ct): flat_clusters(Z, ct) for ct in cts}


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise LexpInputError(
            f"{what}: labels must be a non-empty 1-D integer array (one cluster id per neuron), "
            f"got {labels.dtype} {labels.shape}; use flat_clusters()"
        )
    return labels


def representatives(
    labels: np.ndarray,
    mode: Literal["random", "medoid"] = "random",
    seed: int = 0,
    corr: np.ndarray | None = None,
) -> np.ndarray:
    """One neuron per cluster, as sorted int64 neuron indices.

    ``random`` (the paper): a uniformly random member of every cluster, reproducible with ``seed``.
    ``medoid``: the member with the highest mean |corr| to the rest of its cluster (ties → the
    lowest index); needs ``corr``, deterministic.
    """
    labels = _check_labels(labels, "representatives")
    if mode == "random":
        # The first member of each cluster in a random permutation is uniform within the cluster.
        perm = np.random.default_rng(seed).permutation(labels.size)
        _, first = np.unique(labels[perm], return_index=True)
        return np.sort(perm[first]).astype(np.int64)
    if mode != "medoid":
        raise LexpInputError(f"representatives: mode must be 'random' or 'medoid', got {mode!r}")
    if corr is None:
        raise LexpInputError("representatives: mode='medoid' needs corr (the N × N correlation matrix)")
    corr = _check_corr(corr)
    if corr.shape[0] != labels.size:
        raise LexpInputError(
            f"representatives: corr is {corr.shape} but there are {labels.size} labels; "
            "pass the correlation matrix of the clustered neurons"
        )
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    reps = []
    for members in np.split(order, bounds):
        if members.size <= 2:  # a singleton, or a pair whose members tie → lowest index
            reps.append(members.min())
            continue
        members = np.sort(members)
        sub = np.abs(corr[np.ix_(members, members)])
        score = (sub.sum(axis=1) - np.diagonal(sub)) / (members.size - 1)
        reps.append(members[int(np.argmax(score))])
    return np.sort(np.asarray(reps, dtype=np.int64))


def neuron_layers(n_layers: int, hidden: int) -> np.ndarray:
    """Layer of every neuron for layer-major columns (column = layer·hidden + unit)."""
    return np.repeat(np.arange(n_layers, dtype=np.int64), hidden)


def cluster_makeup(labels: np.ndarray, neuron_layer: np.ndarray) -> dict:
    """Figure 3: how far apart in the network the neurons of each cluster lie.

    A cluster's span is max − min of its neurons' layers: 0 → ``same_layer``, 1 → ``adjacent``,
    2 → ``within_three`` (three neighbouring layers), ≥ 3 → ``further``. ``counts``/``pct`` are
    over clusters of ≥ 2 neurons — a singleton says nothing about where redundancy lies and, at
    low ct, would swamp the figure; ``pct_with_singletons`` counts singletons as ``same_layer``.
    ``pct_removed`` is the share of neurons dropped when one neuron per cluster is kept.
    """
    labels = _check_labels(labels, "cluster_makeup")
    layer = np.asarray(neuron_layer)
    if layer.shape != labels.shape:
        raise LexpInputError(
            f"cluster_makeup: neuron_layer has shape {layer.shape}, labels {labels.shape}; give one "
            "layer per neuron (neuron_layers(n_layers, hidden))"
        )
    _, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    k = sizes.size
    lo = np.full(k, np.iinfo(np.int64).max)
    hi = np.full(k, np.iinfo(np.int64).min)
    np.minimum.at(lo, inv, layer)
    np.maximum.at(hi, inv, layer)
    span = np.minimum(hi - lo, 3)
    multi = sizes >= 2
    counts = {cat: int(np.sum(multi & (span == s))) for s, cat in enumerate(MAKEUP_CATEGORIES)}
    n_multi = int(multi.sum())
    n_single = int(k - n_multi)

    def pct(c: int, total: int) -> float:
        return 100.0 * c / total if total else 0.0

    return {
        "n_neurons": int(labels.size),
        "n_clusters": int(k),
        "n_multi": n_multi,
        "n_singletons": n_single,
        "pct_removed": pct(labels.size - k, labels.size),
        "counts": counts,
        "pct": {cat: pct(c, n_multi) for cat, c in counts.items()},
        "pct_with_singletons": {
            cat: pct(c + (n_single if cat == "same_layer" else 0), k) for cat, c in counts.items()
        },
    }


def save_linkage(Z: np.ndarray, path: Path | str) -> Path:
    """Write the linkage matrix as ``.npy`` (atomically; no pickle)."""
    Z = _check_linkage(Z, "save_linkage")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, Z, allow_pickle=False)
    os.replace(tmp, path)
    return path


def load_linkage(path: Path | str, n_neurons: int | None = None) -> np.ndarray:
    """Read a linkage written by :func:`save_linkage`, checking it fits ``n_neurons`` neurons."""
    path = Path(path)
    try:
        Z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LexpInputError(f"{path}: cannot read the linkage ({exc}); delete it to recompute") from exc
    Z = _check_linkage(Z, str(path))
    if n_neurons is not None and Z.shape[0] != n_neurons - 1:
        raise LexpInputError(
            f"{path}: linkage is for {Z.shape[0] + 1} neurons, expected {n_neurons}; it belongs to "
            "another store or column selection — delete it to recompute"
        )
    return Z


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two flat clusterings of the same neurons (1.0: the same partition).

    Label values do not matter, only which neurons share a cluster; used to compare clusterings
    from different data, precisions (float32 vs bfloat16 products) or tools (NeuroX).
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.size != b.size or a.size < 2:
        raise LexpInputError(
            f"adjusted_rand: need two labelings of the same >= 2 neurons, got {a.size} and {b.size}"
        )
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    both, sa, sb = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (a.size * (a.size - 1) / 2)
    top = (sa + sb) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)
