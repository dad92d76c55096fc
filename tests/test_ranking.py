"""LCA neuron ranking: hand-computed example, naive step-sweep reference, NeuroX semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lexp.errors import LexpInputError
from lexp.redundancy.ranking import entry_steps, rank_neurons, top_neurons

# Hand example (exact binary fractions, so no threshold sits on a rounding boundary).
#   class 0: |w| = [.5, 4, 0, 1.5, 1.5, .5, 0], total 8; order 1, 3, 4 (tie -> index), 0, 5, 2, 6;
#            cumulative mass 4, 5.5, 7, 7.5, 8, 8, 8
#   class 1: |w| = [0, 0, 3, 0, 0, 1, 0], total 4; order 2, 5, ...; cumulative 3, 4, 4, ...
#   class 2: all zero -> selects nothing.   Neuron 6 is zero everywhere -> never enters.
W_HAND = np.array(
    [
        [0.5, -4.0, 0.0, 1.5, -1.5, 0.5, 0.0],
        [0.0, 0.0, -3.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.0, [1, 2]),  # every non-zero class contributes its heaviest neuron at p = 0
        (0.25, [1, 2]),
        (0.5, [1, 2]),  # class 0: neuron 1 alone reaches exactly 4 = 0.5 * 8
        (0.6, [1, 2, 3]),  # class 0 needs 4.8: neuron 3 crosses it and is included; 3 beats its tie 4
        (0.75, [1, 2, 3, 4]),  # class 0 needs 6: 5.5 < 6 <= 7, so neuron 4 (the crossing one) is in
        (0.76, [1, 2, 3, 4, 5]),  # class 1 needs 3.04 > 3: neuron 5 enters
        (1.0, [0, 1, 2, 3, 4, 5]),  # exactly the neurons that carry mass; neuron 6 never
    ],
)
def test_top_neurons_hand_example(p: float, expected: list[int]) -> None:
    assert top_neurons(W_HAND, p).tolist() == expected


def test_rank_neurons_hand_example() -> None:
    # steps = 4: p = 0, .25, .5, .75, 1.
    #   step 0: {1, 2} (entry mass 0 for both; max|w| 4 > 3)      -> 1, 2
    #   step 3: {3, 4}, entry masses 4/8 and 5.5/8                -> 3, 4
    #   step 4: {0, 5}, entry masses 7/8 and min(7.5/8, 3/4) = .75 -> 5, 0
    #   never:  {6}
    assert entry_steps(W_HAND, steps=4).tolist() == [4, 0, 0, 3, 3, 4, 5]
    assert rank_neurons(W_HAND, steps=4).tolist() == [1, 2, 3, 4, 5, 0, 6]


def test_zero_neurons_go_last_by_index() -> None:
    W = np.zeros((2, 6))
    W[0, 4] = 1.0
    W[1, 2] = -2.0
    assert rank_neurons(W).tolist() == [2, 4, 0, 1, 3, 5]
    assert rank_neurons(np.zeros((3, 4))).tolist() == [0, 1, 2, 3]
    assert top_neurons(np.zeros((3, 4)), 1.0).tolist() == []


# --- naive reference: a literal, loop-only transcription of the step sweep -------------------


def naive_prefixes(W: np.ndarray) -> list[tuple[list[int], list[float], float]]:
    """Per class: neuron order by (-|w|, index), running masses (sequential sums) and total."""
    rows = []
    for row in np.abs(W):
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
        running, cum = 0.0, []
        for i in order:
            running += float(row[i])
            cum.append(running)
        rows.append((order, cum, running))
    return rows


def naive_top(prefixes, p: float) -> set[int]:
    chosen: set[int] = set()
    for order, cum, total in prefixes:
        if total <= 0:
            continue
        k = next(i for i, s in enumerate(cum) if s >= p * total) + 1
        chosen.update(order[:k])
    return chosen


def naive_rank(W: np.ndarray, steps: int) -> list[int]:
    prefixes = naive_prefixes(W)
    peak = np.abs(W).max(axis=0)
    # exact entry mass: smallest share of a class's mass preceding the neuron, over the classes
    # whose p = 1 prefix contains it
    full = {c: naive_top([prefixes[c]], 1.0) for c in range(len(prefixes))}
    entry = {}
    for c, (order, cum, total) in enumerate(prefixes):
        for pos, neuron in enumerate(order):
            if neuron in full[c]:
                before = 0.0 if pos == 0 else cum[pos - 1]
                entry[neuron] = min(entry.get(neuron, np.inf), before / total)
    ordering: list[int] = []
    seen: set[int] = set()
    for j in range(steps + 1):
        new = naive_top(prefixes, j / steps) - seen
        ordering += sorted(new, key=lambda n: (entry[n], -peak[n], n))
        seen |= new
    ordering += sorted(set(range(W.shape[1])) - seen, key=lambda n: (-peak[n], n))
    return ordering


def random_weights(seed: int, shape: tuple[int, int], ties: bool, zeros: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape) * rng.lognormal(0, 1, size=shape[1])  # unequal neuron scales
    if ties:
        W = np.round(W, 1)  # many equal |w| within and across classes
    if zeros:
        W[:, rng.choice(shape[1], size=shape[1] // 5, replace=False)] = 0.0
        if shape[0] > 1:
            W[rng.integers(shape[0])] = 0.0
    return W


@pytest.mark.parametrize(
    ("seed", "shape", "ties", "zeros", "steps"),
    [
        (0, (1, 60), False, False, 1000),  # regression: one row
        (1, (1, 45), True, True, 1000),
        (2, (4, 50), False, False, 1000),
        (3, (6, 40), True, True, 1000),
        (4, (9, 70), True, False, 100),
        (5, (3, 25), False, True, 7),
    ],
)
def test_vectorised_rank_equals_naive_sweep(seed, shape, ties, zeros, steps) -> None:
    W = random_weights(seed, shape, ties, zeros)
    ordering = rank_neurons(W, steps=steps)
    assert ordering.tolist() == naive_rank(W, steps)
    # and each step's prefix of the ordering is exactly top_neurons at that p
    cut = np.searchsorted(np.sort(entry_steps(W, steps)), np.arange(steps + 1), side="right")
    prefixes = naive_prefixes(W)
    for j in range(0, steps + 1, max(1, steps // 50)):
        assert set(ordering[: cut[j]].tolist()) == set(top_neurons(W, j / steps).tolist())
        assert set(top_neurons(W, j / steps).tolist()) == naive_top(prefixes, j / steps)


def neurox_get_top_neurons(weights: np.ndarray, percentage: float) -> set[int]:
    """Transcription of neurox.interpretation.linear_probe.get_top_neurons 1.0.9 (union only)."""
    weights = np.abs(weights)
    union: set[int] = set()
    for c in range(weights.shape[0]):
        total_mass = np.sum(weights[c, :])
        sort_idx = np.argsort(weights[c, :])[::-1]
        cum_sums = np.cumsum(weights[c, sort_idx])
        unselected = np.where(cum_sums >= total_mass * percentage)[0]
        selected = np.arange(cum_sums.shape[0]) if unselected.shape[0] == 0 else np.arange(unselected[0] + 1)
        union.update(sort_idx[selected].tolist())
    return union


def test_agrees_with_neurox_where_neurox_is_well_defined() -> None:
    # No ties, no zero rows, p < 1 (NeuroX's p = 1 depends on cumsum-vs-sum rounding).
    W = np.random.default_rng(7).standard_normal((5, 80))
    for p in np.linspace(0, 0.99, 34):
        assert set(top_neurons(W, p).tolist()) == neurox_get_top_neurons(W, p)


def test_accepts_torch_and_1d_regression_weights() -> None:
    w = torch.tensor([[0.1, -3.0, 2.0, 0.0]], requires_grad=True)
    assert rank_neurons(w).tolist() == [1, 2, 0, 3]
    assert rank_neurons(np.array([0.1, -3.0, 2.0, 0.0])).tolist() == [1, 2, 0, 3]
    assert top_neurons(w, 0.5).tolist() == [1]


def test_result_is_a_permutation_at_scale() -> None:
    W = np.random.default_rng(3).standard_normal((40, 2688)).astype(np.float32)
    ordering = rank_neurons(W)
    assert np.array_equal(np.sort(ordering), np.arange(2688))
    # the heaviest |w| of all classes is the top neuron of its class, so it enters at p = 0
    assert ordering[0] == np.abs(W).max(axis=0).argmax()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: top_neurons(W_HAND, 1.5), "outside"),
        (lambda: top_neurons(W_HAND, -0.1), "outside"),
        (lambda: rank_neurons(np.array([[np.nan, 1.0]])), "non-finite"),
        (lambda: rank_neurons(np.zeros((2, 3, 4))), "matrix"),
        (lambda: rank_neurons(np.zeros((0, 4))), "matrix"),
        (lambda: rank_neurons(W_HAND, steps=0), "positive integer"),
    ],
)
def test_bad_input_raises(call, match) -> None:
    with pytest.raises(LexpInputError, match=match):
        call()
