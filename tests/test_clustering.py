"""Correlation clustering: known groups, equality with scipy, representatives, Figure 3 make-up."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from lexp.errors import LexpInputError
from lexp.redundancy.clustering import (
    cluster_makeup,
    condensed_distance,
    cut_many,
    flat_clusters,
    load_linkage,
    neuron_distance,
    neuron_layers,
    neuron_linkage,
    representatives,
    save_linkage,
)
from lexp.redundancy.covariance import correlation, streaming_moments


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _grouped(seed: int = 0, rows: int = 2000, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """8 independent signals; each neuron a scaled, shifted, possibly sign-flipped noisy copy."""
    rng = np.random.default_rng(seed)
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7])
    perm = rng.permutation(groups.size)  # group members are not adjacent columns
    groups = groups[perm]
    signals = rng.standard_normal((rows, 8))
    sign = rng.choice([-1.0, 1.0], groups.size)
    x = (
        sign
        * rng.uniform(0.5, 3, groups.size)
        * (signals[:, groups] + noise * rng.standard_normal((rows, groups.size)))
    )
    return (x + rng.normal(0, 5, groups.size)).astype(np.float32), groups


def _corr(x: np.ndarray) -> np.ndarray:
    return correlation(streaming_moments(x, chunk_rows=512))


def test_known_groups_are_recovered() -> None:
    x, groups = _grouped()
    Z = neuron_linkage(_corr(x))
    assert Z.shape == (15, 4)
    for ct in (0.05, 0.3, 0.6):  # noisy copies: |corr| ≈ 0.995; independent signals: |corr| ≈ 0
        assert _same_partition(flat_clusters(Z, ct), groups), ct
    assert len(np.unique(flat_clusters(Z, 0.001))) > 8  # below the noise the groups split up
    # With signed distances the sign-flipped copies (distance ≈ 2) are no longer merged.
    signed = flat_clusters(neuron_linkage(_corr(x), signed=True), 0.3)
    assert len(np.unique(signed)) > 8


def test_equal_to_scipy_on_the_same_distance_matrix() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 40)) + 0.3 * rng.standard_normal((300, 40))
    x = x.astype(np.float32)  # rank-5 signal + noise: merges at every height
    corr = _corr(x)
    for signed in (False, True):
        dist = neuron_distance(corr, signed=signed)
        np.testing.assert_array_equal(condensed_distance(corr, signed=signed), squareform(dist, checks=False))
        ref = 1 - corr if signed else 1 - np.abs(corr)
        np.fill_diagonal(ref, 0)
        np.testing.assert_allclose(dist, ref, atol=1e-15)
        Z_ref = linkage(squareform(ref, checks=False), method="average")
        Z = neuron_linkage(corr, signed=signed)
        np.testing.assert_allclose(Z, Z_ref, atol=1e-12)
        cuts = cut_many(Z, [0.0, 0.2, 0.5, 0.8, 0.95])
        for ct, labels in cuts.items():
            assert _same_partition(labels, fcluster(Z_ref, t=ct, criterion="distance")), (signed, ct)
            np.testing.assert_array_equal(labels, flat_clusters(Z, ct))
            assert labels.min() == 0 and labels.dtype == np.int64
        assert len(np.unique(cuts[0.8])) < len(np.unique(cuts[0.5])) < len(np.unique(cuts[0.2])) < 40


def test_ct_zero_keeps_only_exact_duplicates_together() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    x[:, 3] = x[:, 0]
    x[:, 5] = -x[:, 0]
    x[:, 4] = x[:, 1] + 1e-3 * x[:, 2]  # almost, but not exactly, a duplicate
    labels = flat_clusters(neuron_linkage(_corr(x)), 0.0)
    assert len(np.unique(labels)) == 4
    assert labels[0] == labels[3] == labels[5]
    assert labels[1] != labels[4]


def test_bad_inputs() -> None:
    corr = np.eye(3)
    corr[0, 2] = corr[2, 0] = np.nan
    with pytest.raises(LexpInputError, match=r"non-finite entry at \(0, 2\)"):
        neuron_linkage(corr)
    with pytest.raises(LexpInputError, match="square"):
        neuron_linkage(np.zeros((2, 3)))
    with pytest.raises(LexpInputError, match="ct must be"):
        flat_clusters(neuron_linkage(np.eye(3)), -0.1)
    with pytest.raises(LexpInputError, match="linkage matrix"):
        flat_clusters(np.zeros((2, 3)), 0.3)


def test_random_representatives() -> None:
    labels = np.repeat(np.arange(50), 4)  # 50 clusters of 4
    reps = representatives(labels, seed=7)
    assert reps.dtype == np.int64 and np.all(np.diff(reps) > 0)
    np.testing.assert_array_equal(np.sort(labels[reps]), np.arange(50))  # one per cluster
    np.testing.assert_array_equal(reps, representatives(labels, seed=7))
    assert not np.array_equal(reps, representatives(labels, seed=8))
    # Every member gets picked: the choice is spread over the cluster, not always the first one.
    picks = np.concatenate([representatives(labels, seed=s) % 4 for s in range(20)])
    assert set(picks.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(representatives(np.array([2, 0, 1])), [0, 1, 2])


def test_medoid_representatives_hand_example() -> None:
    # Cluster A = {0, 2, 3}: neuron 2 has mean |corr| (0.9 + 0.8) / 2 = 0.85, the highest.
    # Cluster B = {1, 4}: a tie, so the lower index (1). Cluster C = {5}: itself.
    corr = np.eye(6)
    for i, j, v in [(0, 2, 0.9), (0, 3, 0.5), (2, 3, -0.8), (1, 4, 0.7)]:
        corr[i, j] = corr[j, i] = v
    labels = np.array([0, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(representatives(labels, mode="medoid", corr=corr), [1, 2, 5])
    with pytest.raises(LexpInputError, match="needs corr"):
        representatives(labels, mode="medoid")
    with pytest.raises(LexpInputError, match="mode"):
        representatives(labels, mode="first")  # type: ignore[arg-type]


def test_cluster_makeup_hand_example() -> None:
    layer = neuron_layers(n_layers=6, hidden=2)  # neuron j is in layer j // 2
    np.testing.assert_array_equal(layer, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    clusters = {
        0: [0],  # singleton
        1: [2, 3],  # layer 1 only → same layer
        2: [4, 6],  # layers 2, 3 → adjacent
        3: [5, 8],  # layers 2, 4 → within three layers
        4: [1, 11],  # layers 0, 5 → further apart
        5: [7, 10],  # layers 3, 5 → within three layers
        6: [9],  # singleton
    }
    labels = np.empty(12, dtype=np.int64)
    for cid, members in clusters.items():
        labels[members] = cid
    out = cluster_makeup(labels, layer)
    assert out["n_neurons"] == 12 and out["n_clusters"] == 7
    assert out["n_singletons"] == 2 and out["n_multi"] == 5
    assert out["counts"] == {"same_layer": 1, "adjacent": 1, "within_three": 2, "further": 1}
    assert out["pct"] == {"same_layer": 20.0, "adjacent": 20.0, "within_three": 40.0, "further": 20.0}
    assert out["pct_with_singletons"]["same_layer"] == pytest.approx(100 * 3 / 7)
    assert out["pct_with_singletons"]["further"] == pytest.approx(100 * 1 / 7)
    assert out["pct_removed"] == pytest.approx(100 * 5 / 12)
    with pytest.raises(LexpInputError, match="layer per neuron"):
        cluster_makeup(labels, layer[:-1])


def test_linkage_save_load(tmp_path) -> None:
    x, _ = _grouped()
    Z = neuron_linkage(_corr(x))
    path = save_linkage(Z, tmp_path / "cache" / "linkage.npy")
    np.testing.assert_array_equal(load_linkage(path, n_neurons=16), Z)
    with pytest.raises(LexpInputError, match="linkage is for 16 neurons, expected 17"):
        load_linkage(path, n_neurons=17)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(LexpInputError, match="not a linkage matrix"):
        load_linkage(tmp_path / "bad.npy")
    with pytest.raises(LexpInputError, match="cannot read"):
        load_linkage(tmp_path / "missing.npy")


def test_adjusted_rand_known_values() -> None:
    """Hand-computed: a = {01}{23}, b = {01}{2}{3}: index 1, expected 1/3, max 3/2 -> (2/3)/(7/6) = 4/7."""
    from lexp.redundancy.clustering import adjusted_rand

    assert adjusted_rand([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand([0, 0, 1, 1], [5, 5, 9, 9]) == 1.0  # relabelled: the same partition
    assert adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    with pytest.raises(LexpInputError, match="same"):
        adjusted_rand([0, 1, 2], [0, 1])
