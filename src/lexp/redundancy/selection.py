"""Task-specific redundancy and efficient transfer: targets, LayerSelector, minimal neuron set, CCFS.

Sections 6.1, 6.2 and 7 of the paper. Everything here is pure: probe training and clustering are
injected as callables, so the decisions can be tested on constructed data and reused from a
notebook. Scores are "higher is better" (accuracy, F1, Pearson). **Dev makes every decision;
test scores are only carried along for reporting.**

Comparison convention: a candidate *reaches* a target when ``score >= target`` — the paper's
"maintains 99% / 97% of the oracle" and "within a 1% threshold" are inclusive. (DESIGN.md's
"beats" for LayerSelector is read the same way, so that LS, the layer redundancy of Section 6.1
and the minimal-set search all use one rule.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lexp.errors import LexpInputError
from lexp.redundancy.ranking import rank_neurons

__all__ = [
    "CCFSResult",
    "MinimalSetResult",
    "ProbeOutcome",
    "ProbeScores",
    "ccfs",
    "ccfs_many",
    "layer_selector",
    "minimal_set",
    "minimal_sets",
    "neuron_grid",
    "oracle_minimal_set",
    "redundant_layers",
    "relative_target",
]


@runtime_checkable
class ProbeScores(Protocol):
    """What an injected probe trainer returns per neuron subset (any object with these fields)."""

    dev: float
    test: float
    weights: np.ndarray | None  # (classes × subset size); one row for regression


@dataclass(frozen=True)
class ProbeOutcome:
    """A plain :class:`ProbeScores` for shells and tests."""

    dev: float
    test: float
    weights: np.ndarray | None = None


#: Trains one probe per named column subset (in one multi-head pass) and scores it on dev/test.
TrainProbes = Callable[[dict[str, np.ndarray]], Mapping[str, ProbeScores]]
#: Given activation column indices and ct, returns the representative column of every cluster.
ClusterColumns = Callable[[np.ndarray, float], np.ndarray]


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise LexpInputError(f"{name} = {value!r} is not a finite number; check the probe that produced it")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Targets and layer-level decisions (Sections 6.1 and 7)
# ---------------------------------------------------------------------------------------------


def relative_target(oracle_score: float, fraction: float | None = None, delta: float | None = None) -> float:
    """Score a reduced model must reach: ``oracle × fraction`` or ``oracle × (1 − delta)``.

    Section 6.2 keeps 97% of the oracle (``fraction=0.97``); Section 7 allows a relative loss of
    ``delta = 0.01`` for LS and again for CCFS. Give exactly one of the two.
    """
    oracle = _finite("oracle score", oracle_score)
    if (fraction is None) == (delta is None):
        raise LexpInputError("relative_target: give exactly one of fraction (e.g. 0.97) or delta (e.g. 0.01)")
    if oracle <= 0:
        raise LexpInputError(
            f"relative_target: oracle score {oracle} is not positive, so a relative target is meaningless; "
            "the oracle probe failed — check its training (labels, learning rate) before selecting"
        )
    if fraction is not None:
        if not 0 < _finite("fraction", fraction) <= 1:
            raise LexpInputError(f"relative_target: fraction = {fraction} must be in (0, 1], e.g. 0.97")
        return oracle * float(fraction)
    if not 0 <= _finite("delta", delta) < 1:
        raise LexpInputError(f"relative_target: delta = {delta} must be in [0, 1), e.g. 0.01 for 1%")
    return oracle * (1.0 - float(delta))


def _scores(name: str, scores: Sequence[float]) -> list[float]:
    values = [_finite(f"{name}[{i}]", s) for i, s in enumerate(scores)]
    if not values:
        raise LexpInputError(f"{name} is empty; train at least one layer probe first")
    return values


def layer_selector(incremental_scores: Sequence[float], target: float) -> int | None:
    """LayerSelector: the lowest ``k`` whose probe on layers ``0..k`` reaches ``target`` (dev).

    ``incremental_scores[k]`` is the dev score of the probe on the concatenation of layers
    ``0..k`` (layer 0 = embeddings). Returns ``None`` when no prefix reaches the target.
    """
    target = _finite("target", target)
    for k, score in enumerate(_scores("incremental_scores", incremental_scores)):
        if score >= target:
            return k
    return None


def redundant_layers(layer_scores: Sequence[float], oracle: float, threshold: float = 0.99) -> list[int]:
    """Section 6.1: layers whose own probe keeps at least ``threshold`` × the oracle's score."""
    target = relative_target(oracle, fraction=threshold)
    return [i for i, s in enumerate(_scores("layer_scores", layer_scores)) if s >= target]


# ---------------------------------------------------------------------------------------------
# Minimal neuron set (Section 6.2)
# ---------------------------------------------------------------------------------------------


def neuron_grid(
    n_total: int,
    *,
    counts: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    start: int | None = None,
    step: int = 10,
    stop: int | None = None,
    include_all: bool = True,
) -> np.ndarray:
    """Candidate sizes ``n`` for the minimal-set search, ascending and unique.

    Three ways to describe the grid (use one):

    * ``counts``: explicit sizes, e.g. ``(10, 20, 30, 40, 50, 100, 200, 300, ...)``;
    * ``fractions``: fractions of ``n_total``, e.g. ``(0.001, 0.002, ...)``, rounded to the
      nearest neuron (at least 1);
    * the default arithmetic grid ``start, start + step, ... <= stop`` with ``start = step`` and
      ``stop = n_total``.

    The default is every 10 neurons: all minimal sets the paper reports (Tables 1, 2 and 8) are
    multiples of 10 starting at 10, and 10 neurons ≈ 0.1% of BERT-base's 9,984. Sizes above
    ``n_total`` are not candidates (there are not that many neurons); with ``include_all`` the
    full set ``n_total`` is always the last candidate, so the search can always fall back to it.
    """
    if isinstance(n_total, bool) or not isinstance(n_total, int | np.integer) or n_total < 1:
        raise LexpInputError(f"neuron_grid: n_total = {n_total!r} must be a positive number of neurons")
    if counts is not None and fractions is not None:
        raise LexpInputError("neuron_grid: give counts or fractions, not both")
    if counts is not None:
        sizes = np.asarray(list(counts), dtype=np.float64)
        if sizes.size and (np.any(sizes < 1) or np.any(sizes != np.round(sizes))):
            raise LexpInputError(f"neuron_grid: counts must be positive integers, got {list(counts)}")
    elif fractions is not None:
        f = np.asarray(list(fractions), dtype=np.float64)
        if f.size and (not np.all(np.isfinite(f)) or np.any(f <= 0) or np.any(f > 1)):
            raise LexpInputError(f"neuron_grid: fractions must be in (0, 1], got {list(fractions)}")
        sizes = np.maximum(1, np.round(f * n_total))
    else:
        start = step if start is None else start
        if step < 1 or start < 1 or (stop is not None and stop < start):
            raise LexpInputError(
                f"neuron_grid: need 1 <= start <= stop and step >= 1, got start={start}, step={step}, stop={stop}"
            )
        stop = n_total if stop is None else min(stop, n_total)
        sizes = np.arange(start, stop + 1, step, dtype=np.float64)
    sizes = sizes[sizes <= n_total]
    if include_all:
        sizes = np.append(sizes, n_total)
    grid = np.unique(sizes.astype(np.int64))
    if grid.size == 0:
        raise LexpInputError(
            f"neuron_grid: no candidate size <= {n_total} neurons; lower the grid or set include_all=True"
        )
    return grid


@dataclass
class MinimalSetResult:
    """Outcome of :func:`minimal_set`.

    ``n``/``columns``/``score`` describe the smallest candidate that reached ``target``; when
    none did (``reached`` is False) they describe the best-scoring candidate instead.
    ``evaluated`` lists every ``(n, dev score)`` that was trained, ascending in ``n``.
    ``outcome`` is whatever ``evaluate`` returned for the chosen candidate (e.g. the probe's
    dev/test scores and weights).
    """

    n: int
    columns: np.ndarray
    score: float
    reached: bool
    target: float
    evaluated: list[tuple[int, float]] = field(default_factory=list)
    outcome: Any = None


def _dev_score(name: str, value: Any) -> float:
    """A candidate's dev score: ``evaluate`` may return a number or a :class:`ProbeScores`."""
    return _finite(f"dev score of {name}", value.dev if hasattr(value, "dev") else value)


def _as_columns(name: str, columns: Any) -> np.ndarray:
    cols = np.asarray(columns)
    if cols.ndim != 1 or cols.size == 0 or not np.issubdtype(cols.dtype, np.integer):
        raise LexpInputError(
            f"{name}: expected a non-empty 1-D array of integer column indices, got {cols!r}"
        )
    if np.any(cols < 0):
        raise LexpInputError(f"{name}: negative column index {int(cols.min())}")
    if np.unique(cols).size != cols.size:
        raise LexpInputError(f"{name}: column indices repeat; a neuron can be selected only once")
    return cols.astype(np.int64, copy=False)


def minimal_set(
    ordering: Sequence[int] | np.ndarray,
    grid: Sequence[int] | np.ndarray,
    evaluate: Callable[[dict[str, np.ndarray]], Mapping[str, Any]],
    target: float,
    *,
    batch: int = 8,
) -> MinimalSetResult:
    """Smallest top-``n`` prefix of ``ordering`` whose retrained probe reaches ``target`` on dev.

    Candidates ``top{n}`` (the first ``n`` entries of ``ordering``, ``n`` from ``grid``, ascending)
    are handed to ``evaluate`` ``batch`` at a time, so the shell trains them in one multi-head
    pass; ``evaluate`` returns, per name, the dev score or a :class:`ProbeScores`. The search
    stops after the first batch in which a candidate reaches the target and returns the smallest
    such ``n`` — the larger candidates of that batch cost nothing extra and are kept in
    ``evaluated``.
    """
    found = minimal_sets(
        {0: ordering}, grid, lambda candidates: {0: evaluate(candidates[0])}, {0: target}, batch=batch
    )
    return found[0]


def minimal_sets(
    orderings: Mapping[Any, Sequence[int] | np.ndarray],
    grid: Callable[[int], Sequence[int]] | Sequence[int] | np.ndarray,
    evaluate: Callable[[dict[Any, dict[str, np.ndarray]]], Mapping[Any, Mapping[str, Any]]],
    targets: Mapping[Any, float],
    *,
    batch: int = 8,
) -> dict[Any, MinimalSetResult]:
    """:func:`minimal_set` for several searches at once (e.g. one per probe seed, each with its own
    ranking and target), in lock-step: every round hands ``evaluate`` the next ``batch`` candidates
    of every search still running, as ``{key: {"top<n>": columns}}``, so the shell trains them all
    in one pass; it returns ``{key: {name: score or ProbeScores}}``. Each search stops as
    :func:`minimal_set` does, and its result is what it would be alone. ``grid``: sizes, or a
    callable of the ordering's length."""
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
        raise LexpInputError(f"minimal_set: batch = {batch!r} must be a positive integer")
    if set(orderings) != set(targets):
        raise LexpInputError(f"minimal_sets: orderings {sorted(map(str, orderings))} and targets differ")
    state: dict[Any, dict[str, Any]] = {}
    for key, ordering in orderings.items():
        order = _as_columns("minimal_set ordering", ordering)
        raw = grid(order.size) if callable(grid) else grid
        sizes = np.unique(np.asarray(raw, dtype=np.int64))
        if sizes.size == 0 or sizes[0] < 1 or sizes[-1] > order.size:
            raise LexpInputError(
                f"minimal_set: grid sizes must lie in [1, {order.size}] (the ordering's length), "
                f"got {np.asarray(raw).tolist()}; build it with neuron_grid({order.size})"
            )
        state[key] = {
            "order": order,
            "target": _finite("target", targets[key]),
            "sizes": sizes,
            "next": 0,
            "evaluated": [],
            "best": None,  # (n, score, outcome) of the best candidate so far
        }
    results: dict[Any, MinimalSetResult] = {}
    while len(results) < len(state):
        round_names: dict[Any, dict[str, int]] = {}
        for key, st in state.items():
            if key in results:
                continue
            chunk = [int(n) for n in st["sizes"][st["next"] : st["next"] + int(batch)]]
            st["next"] += len(chunk)
            round_names[key] = {f"top{n}": n for n in chunk}
        returned = evaluate(
            {
                key: {name: state[key]["order"][:n].copy() for name, n in names.items()}
                for key, names in round_names.items()
            }
        )
        for key, names in round_names.items():
            st, got = state[key], returned.get(key, {})
            missing = sorted(set(names) - set(got))
            if missing:
                raise LexpInputError(f"minimal_set: evaluate returned no score for {missing}")
            # Only the chosen candidate's outcome (its probe weights: classes × n) is kept: the
            # first that reaches the target or the best so far. Keeping every candidate's would
            # hold Σ n · classes weights over the grid — O(N² · classes / step) at LLM width.
            reached = None
            for name, n in names.items():  # ascending n
                score = _dev_score(name, got[name])
                st["evaluated"].append((n, score))
                if reached is None and score >= st["target"]:
                    reached = (n, score, got[name])
                best = st["best"]
                if best is None or score > best[1]:  # best score; smallest n on ties
                    st["best"] = (n, score, got[name])
            del got
            order, target, evaluated = st["order"], st["target"], st["evaluated"]
            if reached is not None:
                n, score, outcome = reached
                results[key] = MinimalSetResult(n, order[:n].copy(), score, True, target, evaluated, outcome)
            elif st["next"] >= st["sizes"].size:
                n, score, outcome = st["best"]
                results[key] = MinimalSetResult(n, order[:n].copy(), score, False, target, evaluated, outcome)
            if key in results:
                st["best"] = None
        del returned  # before the next round is trained: one round's probes alive at a time
    return {key: results[key] for key in orderings}


def _probe(name: str, outcome: Any, n_columns: int | None = None) -> ProbeScores:
    if not all(hasattr(outcome, a) for a in ("dev", "test")):
        raise LexpInputError(f"{name}: the probe trainer must return objects with .dev, .test and .weights")
    _finite(f"{name} dev score", outcome.dev)
    if n_columns is not None:
        w = getattr(outcome, "weights", None)
        if w is None or np.ndim(w) not in (1, 2) or np.shape(w)[-1] != n_columns:
            raise LexpInputError(
                f"{name}: expected probe weights with {n_columns} columns (one per selected neuron), "
                f"got shape {None if w is None else np.shape(w)}; return the linear layer's weight matrix"
            )
    return outcome


def oracle_minimal_set(
    oracle: ProbeScores,
    columns: Sequence[int] | np.ndarray,
    train: TrainProbes,
    *,
    fraction: float = 0.97,
    grid: Callable[[int], Sequence[int]] | Sequence[int] = neuron_grid,
    steps: int = 1000,
    batch: int = 8,
) -> MinimalSetResult:
    """Section 6.2: rank ``columns`` by the oracle probe's weights (LCA) and find the minimal set.

    ``oracle.weights`` must have one column per entry of ``columns`` (usually all neurons); the
    target is ``fraction`` × the oracle's dev score (97% in the paper).
    """
    cols = _as_columns("oracle_minimal_set columns", columns)
    oracle = _probe("oracle probe", oracle, cols.size)
    ordering = cols[rank_neurons(oracle.weights, steps=steps)]
    sizes = grid(cols.size) if callable(grid) else grid
    target = relative_target(oracle.dev, fraction=fraction)
    return minimal_set(ordering, sizes, train, target, batch=batch)


# ---------------------------------------------------------------------------------------------
# LayerSelector + CCFS (Section 7)
# ---------------------------------------------------------------------------------------------


@dataclass
class CCFSResult:
    """Every number of one Table 3 / 9 / 10 column. ``ls_layer`` = k (layers 0..k are kept)."""

    n_neurons_total: int
    oracle_dev: float
    oracle_test: float
    ls_delta: float
    ls_target: float
    ls_reached: bool  # False: no prefix reached the target, all layers kept
    ls_layer: int
    ls_n_layers: int  # k + 1, the embeddings included ("Layers" in Tables 9, 10)
    ls_n_neurons: int
    ls_dev: float
    ls_test: float
    ct: float
    cc_n_neurons: int
    cc_dev: float
    cc_test: float
    fs_delta: float
    fs_target: float
    fs_reached: bool  # False: no candidate reached the target, the best one is reported
    ccfs_n_neurons: int
    ccfs_dev: float
    ccfs_test: float
    reduction: float  # 1 − ccfs_n_neurons / n_neurons_total ("% Reduct.")
    cc_columns: np.ndarray
    ccfs_columns: np.ndarray
    fs_evaluated: list[tuple[int, float]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (arrays become lists of ints)."""
        out = asdict(self)
        out["cc_columns"] = self.cc_columns.tolist()
        out["ccfs_columns"] = self.ccfs_columns.tolist()
        out["fs_evaluated"] = [[int(n), float(s)] for n, s in self.fs_evaluated]
        return out


def ccfs(
    *,
    oracle: ProbeScores,
    incremental: Sequence[ProbeScores],
    hidden: int,
    cluster: ClusterColumns,
    train: TrainProbes,
    ct: float = 0.3,
    ls_delta: float = 0.01,
    fs_delta: float = 0.01,
    grid: Callable[[int], Sequence[int]] | Sequence[int] = neuron_grid,
    steps: int = 1000,
    batch: int = 8,
) -> CCFSResult:
    """LayerSelector → correlation clustering → feature selection (Section 7).

    1. LS: ``k`` = lowest prefix of layers whose probe (``incremental[k]``, layers ``0..k``,
       layer-major columns ``0 .. (k+1)·hidden − 1``) reaches ``oracle.dev × (1 − ls_delta)``;
       if none does, all layers are kept and ``ls_reached`` is False.
    2. CC: ``cluster(columns of layers 0..k, ct)`` returns one representative per cluster.
    3. A probe on the survivors sets the new target ``survivors_dev × (1 − fs_delta)`` and its
       weights rank the survivors (LCA, :func:`rank_neurons`).
    4. FS: :func:`minimal_set` over that ranking with ``grid(len(survivors))``.
    """
    return ccfs_many(
        oracles={0: oracle},
        incrementals={0: incremental},
        hidden=hidden,
        cluster=cluster,
        train=lambda subsets: {0: train(subsets[0])},
        ct=ct,
        ls_delta=ls_delta,
        fs_delta=fs_delta,
        grid=grid,
        steps=steps,
        batch=batch,
    )[0]


def ccfs_many(
    *,
    oracles: Mapping[Any, ProbeScores],
    incrementals: Mapping[Any, Sequence[ProbeScores]],
    hidden: int,
    cluster: ClusterColumns,
    train: Callable[[dict[Any, dict[str, np.ndarray]]], Mapping[Any, Mapping[str, ProbeScores]]],
    ct: float = 0.3,
    ls_delta: float = 0.01,
    fs_delta: float = 0.01,
    grid: Callable[[int], Sequence[int]] | Sequence[int] = neuron_grid,
    steps: int = 1000,
    batch: int = 8,
) -> dict[Any, CCFSResult]:
    """:func:`ccfs` for several sets of probes at once (e.g. one per probe seed: each its own
    oracle and incremental probes, so its own LS layer, CC probe, ranking and minimal set), with
    every training step of all of them in one call of ``train`` (``{key: {name: columns}}`` ->
    ``{key: {name: ProbeScores}}``; one pass in the shell). The clustering depends only on the
    layers kept, so it runs once per distinct LS layer. Each result is what :func:`ccfs` gives
    for that key alone."""
    if isinstance(hidden, bool) or not isinstance(hidden, int | np.integer) or hidden < 1:
        raise LexpInputError(
            f"ccfs: hidden = {hidden!r} must be the positive layer width (neurons per layer)"
        )
    if set(oracles) != set(incrementals):
        raise LexpInputError("ccfs: oracles and incrementals must have the same keys")
    steps_ls: dict[Any, dict[str, Any]] = {}
    clusters: dict[int, np.ndarray] = {}
    for key in oracles:
        oracle = _probe("oracle probe", oracles[key])
        layers = [_probe(f"probe on layers 0..{k}", r) for k, r in enumerate(incrementals[key])]
        if not layers:
            raise LexpInputError("ccfs: incremental is empty; pass the probes on layers 0..k for every k")
        ls_target = relative_target(oracle.dev, delta=ls_delta)
        k = layer_selector([r.dev for r in layers], ls_target)
        ls_reached = k is not None
        if k is None:
            k = len(layers) - 1
        ls_columns = np.arange((k + 1) * int(hidden), dtype=np.int64)
        if k not in clusters:
            survivors = np.sort(_as_columns(f"cluster(layers 0..{k}, ct={ct})", cluster(ls_columns, ct)))
            if survivors[-1] >= ls_columns.size:
                raise LexpInputError(
                    f"ccfs: the clustering returned column {int(survivors[-1])}, outside layers 0..{k} "
                    f"(columns 0..{ls_columns.size - 1}); it must return a subset of the columns it was given"
                )
            clusters[k] = survivors
        steps_ls[key] = {
            "oracle": oracle,
            "layers": layers,
            "ls_target": ls_target,
            "ls_reached": ls_reached,
            "k": k,
            "ls_columns": ls_columns,
            "survivors": clusters[k],
        }
    trained = train({key: {"cc": st["survivors"]} for key, st in steps_ls.items()})
    orderings, targets = {}, {}
    for key, st in steps_ls.items():
        if "cc" not in trained.get(key, {}):
            raise LexpInputError("ccfs: the probe trainer returned no result for the subset named 'cc'")
        cc = _probe("probe on the CC survivors", trained[key]["cc"], st["survivors"].size)
        st["cc"] = cc
        targets[key] = st["fs_target"] = relative_target(cc.dev, delta=fs_delta)
        orderings[key] = st["survivors"][rank_neurons(cc.weights, steps=steps)]
    found = minimal_sets(orderings, grid, train, targets, batch=batch)
    n_total = 0
    out: dict[Any, CCFSResult] = {}
    for key, st in steps_ls.items():
        fs, k, layers, oracle, cc = found[key], st["k"], st["layers"], st["oracle"], st["cc"]
        n_total = len(layers) * int(hidden)
        final = _probe(f"probe on the top {fs.n} survivors", fs.outcome)
        out[key] = CCFSResult(
            n_neurons_total=n_total,
            oracle_dev=float(oracle.dev),
            oracle_test=float(oracle.test),
            ls_delta=float(ls_delta),
            ls_target=st["ls_target"],
            ls_reached=st["ls_reached"],
            ls_layer=int(k),
            ls_n_layers=int(k) + 1,
            ls_n_neurons=int(st["ls_columns"].size),
            ls_dev=float(layers[k].dev),
            ls_test=float(layers[k].test),
            ct=float(ct),
            cc_n_neurons=int(st["survivors"].size),
            cc_dev=float(cc.dev),
            cc_test=float(cc.test),
            fs_delta=float(fs_delta),
            fs_target=st["fs_target"],
            fs_reached=fs.reached,
            ccfs_n_neurons=fs.n,
            ccfs_dev=float(final.dev),
            ccfs_test=float(final.test),
            reduction=1.0 - fs.n / n_total,
            cc_columns=st["survivors"],
            ccfs_columns=fs.columns,
            fs_evaluated=fs.evaluated,
        )
    return out
