"""Neuron ranking by Linguistic Correlation Analysis (LCA; Dalvi et al., 2019), Section 6.2.

A trained linear probe has a weight matrix ``W`` (classes × neurons; one row for regression).
For one class row, the *top neurons at p* are the shortest prefix of the neurons sorted by
``|W[c]|`` descending whose cumulative mass reaches ``p`` × the row's total mass; the neuron
that crosses the threshold is included. The top neurons of the probe are the union over classes.
The global ranking sweeps ``p`` over ``0, 1/steps, ..., 1`` and appends neurons as they enter.

These are the semantics of NeuroX 1.0.9 (``get_top_neurons`` / ``get_neuron_ordering``, the
paper's code), with these deliberate differences, all of which only make the result well
defined where NeuroX's depends on floating-point or sort-algorithm accidents:

* **Ties** in ``|w|`` are broken by neuron index (stable sort on ``(-|w|, index)``); NeuroX uses
  a reversed unstable ``argsort``, so its order among equal weights is unspecified.
* **Row total** is the last element of the row's cumulative sum, not a separately computed
  ``np.sum``. NeuroX compares a sequential ``cumsum`` with a pairwise ``sum``; when rounding makes
  the cumsum fall short of the sum, ``p = 1`` selects *every* neuron of that class, including
  zero-weight ones. Here ``p = 1`` selects exactly the neurons that carry mass.
* **All-zero rows** select nothing (no neuron carries any of their mass); NeuroX selects an
  arbitrary zero-weight neuron for them. Neurons with zero weight in every class therefore never
  enter; ``rank_neurons`` appends them at the end, by index.
* **Precision**: masses are accumulated in float64 (NeuroX: float32).
* **Memory**: one class row at a time in float64 (its order and cumulative mass), so the extra
  memory is O(neurons) beside the weights themselves — the ranking at 131K neurons × 1,272 CCG
  classes needs the 0.7 GB float32 weights plus a few MB, not a float64 copy per class.
* **Order within one step** of the sweep (NeuroX: set iteration order, i.e. arbitrary) is by the
  neuron's exact entry point — the smallest fraction of a class's mass that precedes it — which
  is the order an infinitely fine sweep would give; then by max ``|w|`` over classes, then index.

As in NeuroX, the prefix always holds at least one neuron: at ``p = 0`` every (non-zero) class
contributes its top neuron.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lexp.errors import LexpInputError

__all__ = ["entry_steps", "rank_neurons", "top_neurons"]


def _abs_weights(W: Any) -> np.ndarray:
    """The (classes × neurons) weights, checked, in their own float dtype (no copy); a 1-D ``W`` is
    one row (regression). :func:`_abs_row` gives one class's ``|w|`` in float64."""
    if hasattr(W, "detach"):  # torch tensor, without importing torch here
        W = W.detach().cpu()
        W = (W.double() if W.element_size() == 2 else W).numpy()  # numpy has no bfloat16
    A = np.asarray(W)
    if not np.issubdtype(A.dtype, np.floating):
        A = A.astype(np.float64)
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
        raise LexpInputError(
            f"probe weights: expected a non-empty (classes × neurons) matrix, got shape {np.shape(W)}; "
            "pass the weight matrix of the probe's linear layer (one row per class, one for regression)"
        )
    if not np.all(np.isfinite(A)):
        bad = np.argwhere(~np.isfinite(A))[0]
        raise LexpInputError(
            f"probe weights: non-finite value at class {bad[0]}, neuron {bad[1]}; "
            "the probe diverged — retrain it (lower learning rate, check the activations for inf/NaN)"
        )
    return A


def _abs_row(A: np.ndarray, c: int) -> np.ndarray:
    return np.abs(A[c].astype(np.float64))


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise LexpInputError(
            f"top_neurons: p = {p!r} is outside [0, 1]; p is a fraction of each class's weight mass"
        )
    return float(p)


def _sorted_mass(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One class row ``|w|``: neuron order by ``(-|w|, index)``, cumulative mass in that order,
    total mass (the cumulative sum's last element)."""
    order = np.argsort(-a, kind="stable")
    cum = np.cumsum(a[order])
    return order, cum, float(cum[-1])


def top_neurons(W: Any, p: float) -> np.ndarray:
    """Top neurons at weight-mass fraction ``p``: union over classes, sorted by neuron index.

    For each class with total mass ``T > 0``, the selected prefix has length
    ``min{k >= 1 : S_k >= p·T}`` where ``S_k`` is the mass of the ``k`` heaviest neurons.
    """
    p = _check_p(p)
    A = _abs_weights(W)
    chosen = np.zeros(A.shape[1], dtype=bool)
    for c in range(A.shape[0]):
        order, cum, total = _sorted_mass(_abs_row(A, c))
        if total > 0:
            k = int(np.searchsorted(cum, p * total, side="left")) + 1
            chosen[order[:k]] = True
    return np.flatnonzero(chosen)


def _entry_points(A: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step at which each neuron first enters the top set, and its exact entry mass fraction.

    Neuron at sorted position ``k >= 2`` of a class is in the prefix at ``p`` iff
    ``S_{k-1} < p·T``, so it enters at the first sweep step ``j`` with ``(j/steps)·T > S_{k-1}``:
    one ``searchsorted`` per class over the ``steps + 1`` thresholds (computed with the very same
    floating-point operations as :func:`top_neurons`), then the minimum over classes. Also returns
    each neuron's largest ``|w|`` over classes (a tie-break of the ranking).
    """
    n_classes, n_neurons = A.shape
    never = steps + 1
    step = np.full(n_neurons, never, dtype=np.int64)
    mass = np.full(n_neurons, np.inf)
    peak = np.zeros(n_neurons)
    p = np.arange(steps + 1) / steps
    before = np.empty(n_neurons)
    for c in range(n_classes):
        a = _abs_row(A, c)
        np.maximum(peak, a, out=peak)
        idx, cum, total = _sorted_mass(a)
        if not total > 0:
            continue
        before[0] = 0.0
        before[1:] = cum[:-1]
        j = np.searchsorted(p * total, before, side="right")
        j[0] = 0  # the heaviest neuron of every class is in the prefix from p = 0 on
        frac = np.where(j < never, before / total, np.inf)
        np.minimum(step[idx], j, out=j)
        step[idx] = j
        mass[idx] = np.minimum(mass[idx], frac)
    return step, mass, peak


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise LexpInputError(
            f"rank_neurons: steps = {steps!r} must be a positive integer (the paper uses 1000)"
        )
    return int(steps)


def entry_steps(W: Any, steps: int = 1000) -> np.ndarray:
    """For each neuron, the sweep step ``j`` (``p = j/steps``) at which it first becomes a top neuron.

    ``steps + 1`` marks neurons that never enter (zero weight in every class). The cut-offs of the
    NeuroX ordering are ``np.searchsorted(np.sort(entry_steps(W)), np.arange(steps + 1), "right")``.
    """
    return _entry_points(_abs_weights(W), _check_steps(steps))[0]


def rank_neurons(W: Any, steps: int = 1000) -> np.ndarray:
    """Global LCA ordering of all neurons, most important first (a permutation of ``range(N)``).

    Equals appending the new members of ``top_neurons(W, j / steps)`` for ``j = 0, ..., steps``,
    ordering the neurons that enter at the same step by (exact entry mass fraction, ``-max |w|``,
    index), then the neurons that never enter by (``-max |w|``, index) — for all-zero neurons,
    simply by index. Vectorised over neurons: one sort per class row and one ``searchsorted`` per
    class, no loop over steps (9,984 neurons × 1,272 CCG classes: 2–2.6 s on 2 cores).
    """
    steps = _check_steps(steps)
    A = _abs_weights(W)
    step, mass, peak = _entry_points(A, steps)
    # np.lexsort: the last key is the primary one.
    return np.lexsort((np.arange(A.shape[1]), -peak, mass, step))
