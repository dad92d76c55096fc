"""analysis=neurons at LLM width: the LCA ranking and the minimal-set search stay O(N · classes) in
memory (numpy allocations counted by tracemalloc, on 20,000 neurons; about a second)."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass

import numpy as np

from lexp.redundancy.ranking import rank_neurons, top_neurons
from lexp.redundancy.selection import minimal_sets, neuron_grid

N = 20_000


def _peak(fn):  # (result, peak bytes allocated while fn ran)
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ranking_memory_is_per_class_row_not_a_float64_copy() -> None:
    """Extra memory of the ranking is O(N) (one class row at a time), not the 32 · classes · N
    bytes of a float64 copy, its sort order and cumulative masses for all classes at once."""
    classes = 64
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((classes, N)) * rng.uniform(0.01, 1, N)).astype(np.float32)
    W[:, :5] *= 100  # five neurons dominate every class: they lead the ranking
    order, peak = _peak(lambda: rank_neurons(W, steps=1000))
    assert sorted(order.tolist()) == list(range(N))
    assert set(order[:5].tolist()) == set(range(5))
    assert peak < 200 * N  # ≈ 4 MB; one float64 copy of W alone is 8 · 64 · N = 10 MB
    chosen, peak_top = _peak(lambda: top_neurons(W, 0.5))
    assert peak_top < 200 * N and set(range(5)) <= set(chosen.tolist())


@dataclass
class _Probe:
    dev: float
    test: float
    weights: np.ndarray


def test_minimal_set_search_keeps_one_outcome_not_every_candidate() -> None:
    """The search keeps only the chosen candidate's probe (classes × n weights); every candidate's
    would be Σ n · classes over the grid, O(N² · classes / step). The worst case: the target is
    never reached, so the search runs to the end and returns the best (smallest n on ties)."""
    classes, batch = 8, 16
    grid = neuron_grid(N, step=100)  # 200 candidates: all of them kept would be 64 MB
    ordering = np.arange(N)[::-1].copy()

    def evaluate(candidates):
        out = {}
        for key, subsets in candidates.items():
            out[key] = {}
            for name, cols in subsets.items():
                n = cols.size
                w = np.full((classes, n), 1.0, dtype=np.float32)
                out[key][name] = _Probe(min(n, 15_000) / N, 0.0, w)
        return out

    found, peak = _peak(lambda: minimal_sets({0: ordering}, grid, evaluate, {0: 0.9}, batch=batch))
    got = found[0]
    assert not got.reached and got.n == 15_000 and got.score == 0.75
    assert got.outcome.weights.shape == (classes, 15_000)
    assert np.array_equal(got.columns, ordering[:15_000])
    assert len(got.evaluated) == grid.size
    # one round (batch candidates: ≤ N int64 columns and classes × N float32 weights each) plus
    # the best so far: O(batch · N · classes)
    assert peak < (batch + 2) * N * (classes * 4 + 8)
    assert peak < sum(int(n) for n in grid) * classes * 4 / 4  # far below keeping every candidate


class _Cfg(dict):
    __getattr__ = dict.__getitem__

    def get(self, key, default=None):  # noqa: D102 - mapping access as OmegaConf gives it
        return dict.get(self, key, default)


def test_plan_counts_one_round_of_the_search() -> None:
    """The memory plan states the search's widest round (batch probes on all N neurons: weights,
    gradients, two Adam moments) and names analysis.batch when it does not fit."""
    import pytest

    from lexp.errors import LexpInputError
    from lexp.plan import make_plan

    machine = {"total": 24 * 10**9, "available": 20 * 10**9}

    def cfg(batch: int, gb: float) -> _Cfg:
        analysis = _Cfg(name="neurons", batch=batch, max_memory_gb=gb)
        return _Cfg(analysis=analysis, store=_Cfg(dtype="float16"))

    n, classes = 33 * 4096, 50
    plan = make_plan(
        cfg(16, 8), rows={"train": 3000}, n_layers=33, hidden=4096, n_classes=classes, machine=machine
    )
    assert plan.stages["probes (minimal-set search, one round)"] >= 16 * 16 * n * classes
    with pytest.raises(LexpInputError, match=r"minimal-set search.*analysis.batch"):
        make_plan(
            cfg(64, 8), rows={"train": 3000}, n_layers=33, hidden=4096, n_classes=classes, machine=machine
        )
