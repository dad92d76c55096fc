"""Targets, LayerSelector, minimal neuron set and CCFS on constructed data with real probes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from lexp.errors import LexpInputError
from lexp.redundancy.ranking import rank_neurons
from lexp.redundancy.selection import (
    ProbeOutcome,
    ccfs,
    layer_selector,
    minimal_set,
    neuron_grid,
    oracle_minimal_set,
    redundant_layers,
    relative_target,
)

# --- a real (tiny) probe: multinomial logistic regression, full-batch gradient descent ----------


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 300, lr: float = 1.0):
    W = np.zeros((n_classes, X.shape[1]))
    b = np.zeros(n_classes)
    Y = np.eye(n_classes)[y]
    for _ in range(steps):
        Z = X @ W.T + b
        Z -= Z.max(axis=1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(axis=1, keepdims=True)
        G = (P - Y) / len(y)
        W -= lr * (G.T @ X + 1e-4 * W)
        b -= lr * G.sum(axis=0)
    return W, b


def accuracy(W, b, X, y) -> float:
    return float(np.mean((X @ W.T + b).argmax(axis=1) == y))


class Task:
    """Train/dev/test splits of constructed activations, and the injected probe trainer."""

    def __init__(
        self, X: np.ndarray, y: np.ndarray, n_classes: int = 2, test_labels: np.ndarray | None = None
    ):
        n = len(y)
        self.X, self.n_classes = X, n_classes
        self.tr, self.dev, self.te = slice(0, n // 2), slice(n // 2, 3 * n // 4), slice(3 * n // 4, n)
        self.y = y
        self.y_test = y[self.te] if test_labels is None else test_labels
        self.calls: list[dict[str, list[int]]] = []

    def train(self, subsets: dict[str, np.ndarray]) -> dict[str, ProbeOutcome]:
        self.calls.append({k: v.tolist() for k, v in subsets.items()})
        out = {}
        for name, cols in subsets.items():
            X = self.X[:, cols]
            W, b = fit_logreg(X[self.tr], self.y[self.tr], self.n_classes)
            out[name] = ProbeOutcome(
                dev=accuracy(W, b, X[self.dev], self.y[self.dev]),
                test=accuracy(W, b, X[self.te], self.y_test),
                weights=W,
            )
        return out

    def dev_scores(self, subsets: dict[str, np.ndarray]) -> dict[str, float]:
        return {k: v.dev for k, v in self.train(subsets).items()}


def planted_task(seed: int = 0, n: int = 1600, n_features: int = 40) -> tuple[Task, list[int]]:
    """Only columns 3, 17 and 29 carry the label (with decreasing weight); the rest is noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_features))
    y = (3.0 * X[:, 3] - 2.0 * X[:, 17] + 1.5 * X[:, 29] > 0).astype(np.int64)
    return Task(X, y), [3, 17, 29]


# --- targets and layer decisions -------------------------------------------------------------


def test_relative_target() -> None:
    assert relative_target(0.9, fraction=0.97) == pytest.approx(0.873)
    assert relative_target(0.9, delta=0.01) == pytest.approx(0.891)
    assert relative_target(0.5, delta=0.0) == 0.5
    for kwargs in ({}, {"fraction": 0.9, "delta": 0.1}):
        with pytest.raises(LexpInputError, match="exactly one"):
            relative_target(0.9, **kwargs)
    with pytest.raises(LexpInputError, match="not positive"):
        relative_target(-0.1, delta=0.01)
    with pytest.raises(LexpInputError, match="fraction"):
        relative_target(0.9, fraction=1.2)
    with pytest.raises(LexpInputError, match="finite"):
        relative_target(float("nan"), delta=0.01)


def test_layer_selector_on_scores() -> None:
    target = relative_target(1.0, delta=0.25)  # exactly 0.75
    assert layer_selector([0.5, 0.74, 0.75, 0.9], target) == 2  # reaching the target counts (>=)
    assert layer_selector([0.5, 0.9, 0.6], target) == 1  # the lowest k, not the best
    assert layer_selector([0.5, 0.6], target) is None
    with pytest.raises(LexpInputError, match="empty"):
        layer_selector([], target)


def test_redundant_layers_reproduce_table_7_xlnet() -> None:
    # Table 7(b), XLNet, POS and RTE columns: embedding + 12 layers, oracle on all layers.
    pos = [89.5, 96.3, 96.7, 96.8, 96.7, 96.6, 96.3, 96.1, 95.8, 95.3, 94.9, 94.6, 92.0]
    rte = [52.7, 47.3, 45.8, 47.3, 53.1, 62.1, 63.5, 67.1, 65.0, 69.3, 71.8, 71.8, 71.1]
    assert redundant_layers(pos, 95.9) == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 94.9 < 0.99 * 95.9 = 94.94
    assert redundant_layers(rte, 71.1) == [10, 11, 12]


def test_layer_selector_on_constructed_layers() -> None:
    # 4 "layers" of 5 neurons; the label appears first in layer 2 (and persists in layer 3).
    rng = np.random.default_rng(1)
    n, hidden = 1200, 5
    signal = rng.standard_normal(n)
    X = rng.standard_normal((n, 4 * hidden))
    X[:, 2 * hidden + 1] = signal
    X[:, 3 * hidden + 4] = signal + 0.1 * rng.standard_normal(n)
    task = Task(X, (signal > 0).astype(np.int64))
    subsets = {f"0..{k}": np.arange((k + 1) * hidden) for k in range(4)}
    scores = task.dev_scores({**subsets, "oracle": np.arange(4 * hidden)})
    assert scores["0..1"] < 0.65 < 0.95 < scores["0..2"]
    k = layer_selector([scores[f"0..{k}"] for k in range(4)], relative_target(scores["oracle"], delta=0.01))
    assert k == 2


# --- neuron grid -----------------------------------------------------------------------------


def test_neuron_grid_default_is_every_ten_neurons() -> None:
    grid = neuron_grid(9984)
    assert grid[:3].tolist() == [10, 20, 30] and grid[-2:].tolist() == [9980, 9984]
    assert {290, 330, 750}.issubset(grid.tolist()) and grid.size == 999
    assert neuron_grid(25).tolist() == [10, 20, 25]
    assert neuron_grid(7).tolist() == [7]


def test_neuron_grid_modes() -> None:
    assert neuron_grid(9984, fractions=[0.001, 0.002, 0.03]).tolist() == [10, 20, 300, 9984]
    assert neuron_grid(120, counts=[10, 50, 100, 200, 300]).tolist() == [10, 50, 100, 120]
    assert neuron_grid(120, counts=[10, 50], include_all=False).tolist() == [10, 50]
    assert neuron_grid(100, start=5, step=25, stop=60).tolist() == [5, 30, 55, 100]
    with pytest.raises(LexpInputError, match="not both"):
        neuron_grid(10, counts=[1], fractions=[0.5])
    with pytest.raises(LexpInputError, match="positive integers"):
        neuron_grid(10, counts=[0, 2])
    with pytest.raises(LexpInputError, match="fractions"):
        neuron_grid(10, fractions=[1.5])
    with pytest.raises(LexpInputError, match="no candidate"):
        neuron_grid(10, counts=[20], include_all=False)


# --- minimal neuron set ----------------------------------------------------------------------


def test_ranking_of_a_real_probe_puts_the_planted_neurons_first() -> None:
    task, planted = planted_task()
    oracle = task.train({"all": np.arange(40)})["all"]
    assert rank_neurons(oracle.weights)[:3].tolist() == planted  # 3 > 17 > 29 by |weight|


def test_minimal_set_finds_the_planted_neurons() -> None:
    task, planted = planted_task()
    oracle = task.train({"all": np.arange(40)})["all"]
    ordering = rank_neurons(oracle.weights)
    target = relative_target(oracle.dev, fraction=0.97)
    task.calls.clear()
    result = minimal_set(ordering, neuron_grid(40, step=1), task.dev_scores, target, batch=2)
    assert result.reached and result.n == 3
    assert sorted(result.columns.tolist()) == planted
    assert result.score >= target
    # two multi-head calls of two candidates each, in ascending order, then it stopped
    assert [sorted(call) for call in task.calls] == [["top1", "top2"], ["top3", "top4"]]
    assert task.calls[1]["top3"] == ordering[:3].tolist()
    assert [n for n, _ in result.evaluated] == [1, 2, 3, 4]
    assert result.evaluated[0][1] < target and result.evaluated[1][1] < target  # 1, 2 neurons fall short


def test_minimal_set_reports_best_when_target_unreachable() -> None:
    task, _ = planted_task()
    result = minimal_set(np.arange(40), [1, 2, 3, 40], task.dev_scores, target=1.01, batch=3)
    assert not result.reached
    assert [n for n, _ in result.evaluated] == [1, 2, 3, 40]
    best = max(result.evaluated, key=lambda ns: ns[1])
    assert (result.n, result.score) == best and result.columns.size == result.n


def test_minimal_set_accepts_probe_outcomes_and_keeps_the_chosen_one() -> None:
    task, planted = planted_task()
    oracle = task.train({"all": np.arange(40)})["all"]
    result = oracle_minimal_set(oracle, np.arange(40), task.train, grid=lambda n: neuron_grid(n, step=1))
    assert result.reached and sorted(result.columns.tolist()) == planted
    assert isinstance(result.outcome, ProbeOutcome) and result.outcome.dev == result.score
    assert result.outcome.weights.shape == (2, 3)


def test_minimal_set_rejects_bad_input() -> None:
    scores = lambda subsets: dict.fromkeys(subsets, 0.5)  # noqa: E731
    with pytest.raises(LexpInputError, match="grid sizes"):
        minimal_set(np.arange(5), [3, 6], scores, 0.4)
    with pytest.raises(LexpInputError, match="repeat"):
        minimal_set(np.array([1, 1, 2]), [1], scores, 0.4)
    with pytest.raises(LexpInputError, match="no score"):
        minimal_set(np.arange(5), [1, 2], lambda subsets: {"top1": 0.5}, 0.4)
    with pytest.raises(LexpInputError, match="finite"):
        minimal_set(np.arange(5), [1], lambda subsets: {"top1": float("nan")}, 0.4)


# --- LayerSelector + CCFS end to end ---------------------------------------------------------


def correlation_cluster(X: np.ndarray):
    """Injected CC: average linkage on 1 - |corr|, flat clusters at ct, lowest column per cluster."""

    def cluster(columns: np.ndarray, ct: float) -> np.ndarray:
        corr = np.corrcoef(X[:, columns], rowvar=False)
        dist = np.clip(1.0 - np.abs(corr), 0.0, None)
        np.fill_diagonal(dist, 0.0)
        labels = fcluster(linkage(squareform(dist, checks=False), "average"), ct, criterion="distance")
        return np.array([columns[labels == lab].min() for lab in np.unique(labels)])

    return cluster


def ccfs_task(test_labels_shuffled: bool = False) -> Task:
    """4 layers × 6 neurons. Layer 0 is noise; layer 1 carries the label in columns 6 and 8 and a
    near-copy of column 6 in column 7; layers 2 and 3 carry the same signal again."""
    rng = np.random.default_rng(5)
    n, hidden = 1600, 6
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    X = rng.standard_normal((n, 4 * hidden))
    X[:, 6], X[:, 7], X[:, 8] = a, a + 0.05 * rng.standard_normal(n), b
    X[:, 2 * hidden + 3], X[:, 3 * hidden + 5] = a + b, a - b
    y = (2.0 * a + b > 0).astype(np.int64)
    test = rng.permutation(y[3 * n // 4 :]) if test_labels_shuffled else None
    return Task(X, y, test_labels=test)


def run_ccfs(task: Task, hidden: int = 6):
    layers = task.train({f"0..{k}": np.arange((k + 1) * hidden) for k in range(4)})
    oracle = task.train({"oracle": np.arange(4 * hidden)})["oracle"]
    return ccfs(
        oracle=oracle,
        incremental=[layers[f"0..{k}"] for k in range(4)],
        hidden=hidden,
        cluster=correlation_cluster(task.X[task.tr]),
        train=task.train,
        grid=lambda n: neuron_grid(n, step=1),
        batch=4,
    )


def test_ccfs_end_to_end() -> None:
    task = ccfs_task()
    r = run_ccfs(task)
    assert (r.ls_reached, r.ls_layer, r.ls_n_layers, r.ls_n_neurons) == (True, 1, 2, 12)
    assert r.ls_dev >= r.ls_target == pytest.approx(r.oracle_dev * 0.99)
    # CC merged the near-duplicate column 7 into column 6, nothing else (ct = 0.3)
    assert r.cc_columns.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11] and r.cc_n_neurons == 11
    assert r.fs_target == pytest.approx(r.cc_dev * 0.99)
    assert r.fs_reached and r.ccfs_n_neurons == 2 and sorted(r.ccfs_columns.tolist()) == [6, 8]
    assert r.ccfs_dev >= r.fs_target and r.ccfs_test > 0.9
    assert r.reduction == pytest.approx(1 - 2 / 24)
    assert r.fs_evaluated[0][0] == 1 and r.fs_evaluated[0][1] < r.fs_target
    json.dumps(r.to_dict())  # results.json-ready


def test_ccfs_decides_on_dev_only() -> None:
    good, bad = run_ccfs(ccfs_task()), run_ccfs(ccfs_task(test_labels_shuffled=True))
    for field in ("ls_layer", "cc_n_neurons", "ccfs_n_neurons", "ccfs_dev", "cc_dev", "ls_dev"):
        assert getattr(good, field) == getattr(bad, field)
    assert good.ccfs_columns.tolist() == bad.ccfs_columns.tolist()
    assert good.ccfs_test > 0.9 and bad.ccfs_test < 0.75  # only the reported test numbers change


def test_ccfs_keeps_all_layers_when_no_prefix_reaches_the_target() -> None:
    o = ProbeOutcome(dev=0.9, test=0.9)
    layers = [ProbeOutcome(0.5, 0.5), ProbeOutcome(0.6, 0.6)]
    seen = {}

    def cluster(columns, ct):
        seen["columns"] = columns.tolist()
        return columns[::2]

    def train(subsets):
        return {k: ProbeOutcome(0.6, 0.6, np.ones((1, len(v)))) for k, v in subsets.items()}

    r = ccfs(oracle=o, incremental=layers, hidden=3, cluster=cluster, train=train)
    assert not r.ls_reached and r.ls_layer == 1 and seen["columns"] == [0, 1, 2, 3, 4, 5]
    assert r.cc_columns.tolist() == [0, 2, 4] and r.ccfs_n_neurons == 3  # grid [3]; 0.6 >= 0.594


def test_ccfs_rejects_a_cluster_function_that_leaves_the_selected_layers() -> None:
    o = ProbeOutcome(dev=0.9, test=0.9)
    layers = [ProbeOutcome(0.95, 0.9), ProbeOutcome(0.95, 0.9)]
    with pytest.raises(LexpInputError, match="outside layers 0..0"):
        ccfs(oracle=o, incremental=layers, hidden=3, cluster=lambda c, ct: np.array([0, 5]), train=dict)
    with pytest.raises(LexpInputError, match="weights"):
        ccfs(
            oracle=o,
            incremental=layers,
            hidden=3,
            cluster=lambda c, ct: c,
            train=lambda s: {k: ProbeOutcome(0.9, 0.9, None) for k in s},
        )
