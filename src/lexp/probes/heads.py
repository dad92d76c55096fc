"""What one pass trains: :class:`HeadSpec` (a head's columns, init seed and target) and
:class:`Variants` (the same probes under several seeds and against the control task, as extra
heads of the one pass, and their results folded back into mean ± std and selectivity).

Why heads and not runs: the heads of a :class:`~lexp.probes.MultiHeadProbe` share nothing but the
data they read, so a probe trained under seed ``s`` or against the control labels is exactly the
probe trained alone with that seed / on those labels (tested), while one pass reads the activations
once and multiplies them by every head's weights in one product per block of shared columns.

Seeds (``probe.seeds``) vary the **weight initialisation** only; every seed sees the **same batch
order** (``probe.seed``): the heads of one pass read the same minibatches. The spread over seeds is
therefore the spread due to where the optimisation starts (and, through dev selection, which
epoch is kept) — not the data order's. This is what lets the seeds be heads of one pass; a run per
``probe.seed`` gives the batch-order spread.

The control task (Hewitt & Liang 2019) is a second label vector for the same rows
(``target=1``, see :meth:`lexp.tasks.TaskData.control_labels`); its heads select their epoch on
their own dev labels, as a control probe trained alone would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lexp.errors import LexpInputError

__all__ = ["CONTROL_TARGET", "HeadSpec", "Variants", "as_spec", "mean_std", "variant_name"]

#: The target index of the control task's labels (0 = the task's own labels).
CONTROL_TARGET = 1
#: Separates a head's base name from its variant (``layer_3~s1``, ``layer_3~control``).
SEPARATOR = "~"


@dataclass(frozen=True, eq=False)
class HeadSpec:
    """One head of a pass: ``columns`` it reads, ``seed`` of its initialisation (None: the probe's
    ``init_seed``) and ``target``, the label vector it learns (0: the task's labels; ``t >= 1``: the
    datamodule's extra label vector ``t``, e.g. the control task)."""

    columns: np.ndarray
    seed: int | None = None
    target: int = 0

    def __post_init__(self) -> None:
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer)
        ):
            raise LexpInputError(f"HeadSpec: seed = {self.seed!r} must be an integer or None")
        if isinstance(self.target, bool) or not isinstance(self.target, int | np.integer) or self.target < 0:
            raise LexpInputError(f"HeadSpec: target = {self.target!r} must be an integer >= 0")


def as_spec(value: Any) -> HeadSpec:
    """A :class:`HeadSpec` from a spec or plain column indices."""
    return value if isinstance(value, HeadSpec) else HeadSpec(np.asarray(value))


def variant_name(name: str, seed_index: int, target: int) -> str:
    """The head name of one variant: the base name for the first seed on the task's labels."""
    parts = [name]
    if target == CONTROL_TARGET:
        parts.append("control")
    elif target:
        parts.append(f"t{target}")
    if seed_index:
        parts.append(f"s{seed_index}")
    return SEPARATOR.join(parts)


def mean_std(values: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per metric, the mean over seeds and (with two or more seeds) ``<metric>_std``: the sample
    standard deviation (ddof = 1: seeds are a sample of the initialisations one could draw)."""
    if not values:
        return {}
    out: dict[str, float] = {}
    for key in values[0]:
        if key.endswith("_std"):
            continue
        column = np.array([float(v[key]) for v in values], dtype=np.float64)
        out[key] = float(column.mean())
        if len(values) > 1:
            out[f"{key}_std"] = float(column.std(ddof=1)) if np.all(np.isfinite(column)) else math.nan
    return out


def _difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: float(a[k]) - float(b[k]) for k in a if k in b and not k.endswith("_std")}


@dataclass(frozen=True)
class Variants:
    """The variants every head of a pass is trained in: ``seeds`` (init seeds; empty or one: no
    seed heads) and ``control`` (a control-task head beside every head)."""

    seeds: tuple[int, ...] = ()
    control: bool = False

    def __post_init__(self) -> None:
        seeds = tuple(int(s) for s in self.seeds)
        if len(set(seeds)) != len(seeds):
            raise LexpInputError(f"probe.seeds = {list(seeds)} repeats a seed; give distinct seeds")
        object.__setattr__(self, "seeds", seeds)

    @property
    def n_seeds(self) -> int:
        return max(1, len(self.seeds))

    @property
    def active(self) -> bool:
        return len(self.seeds) > 1 or self.control

    def expand(self, subsets: Mapping[str, Any]) -> dict[str, HeadSpec]:
        """Every head of the pass: per base head, one per seed (when its spec names none) and, with
        ``control``, the same again against the control labels. Names: :func:`variant_name`."""
        out: dict[str, HeadSpec] = {}
        for name, value in subsets.items():
            if SEPARATOR in name:
                raise LexpInputError(f"probe subset {name!r}: {SEPARATOR!r} is reserved for variant names")
            spec = as_spec(value)
            seeds: Sequence[int | None] = (
                [spec.seed] if spec.seed is not None or not self.seeds else self.seeds
            )
            targets = [spec.target] + ([CONTROL_TARGET] if self.control and spec.target == 0 else [])
            for target in targets:
                for i, seed in enumerate(seeds):
                    out[variant_name(name, i, target)] = HeadSpec(spec.columns, seed, target)
        return out

    def collect(self, results: Mapping[str, dict[str, Any]], subsets: Mapping[str, Any]) -> dict[str, dict]:
        """Fold the variants' results back into one result per base head.

        The result is the first seed's (weights, bias, columns, best epoch: what a decision that
        needs *one* probe uses), with ``dev``/``test`` the **mean over seeds** and ``<metric>_std``
        beside each metric (two or more seeds), plus: ``seeds``, ``per_seed`` (each seed's scores
        and best epoch) and ``seed_weights``/``seed_bias`` (each seed's arrays); with the control
        task ``control`` (its ``dev``/``test`` mean ± std, per seed) and ``selectivity`` (score −
        control score, per seed, then mean ± std) — Hewitt & Liang's selectivity.
        """
        out: dict[str, dict] = {}
        for name, value in subsets.items():
            spec = as_spec(value)
            n_seeds = 1 if spec.seed is not None else self.n_seeds
            seeds = [spec.seed] if spec.seed is not None else list(self.seeds) or [None]
            runs = [results[variant_name(name, i, spec.target)] for i in range(n_seeds)]
            result = dict(runs[0])
            splits = [s for s in ("dev", "test") if runs[0].get(s)]
            if n_seeds > 1:
                for split in splits:
                    result[split] = mean_std([r[split] for r in runs])
                result["seeds"] = seeds
                result["per_seed"] = [_seed_record(s, r, splits) for s, r in zip(seeds, runs, strict=True)]
                result["seed_weights"] = [r["weights"] for r in runs]
                result["seed_bias"] = [r["bias"] for r in runs]
            if self.control and spec.target == 0:
                controls = [results[variant_name(name, i, CONTROL_TARGET)] for i in range(n_seeds)]
                block: dict[str, Any] = {
                    split: mean_std([c[split] for c in controls])
                    for split in splits
                    if controls[0].get(split)
                }
                block["best_epoch"] = controls[0]["best_epoch"]
                if n_seeds > 1:
                    block["per_seed"] = [
                        _seed_record(s, c, splits) for s, c in zip(seeds, controls, strict=True)
                    ]
                result["control"] = block
                result["selectivity"] = {
                    split: mean_std(
                        [_difference(r[split], c[split]) for r, c in zip(runs, controls, strict=True)]
                    )
                    for split in splits
                    if split in block
                }
            out[name] = result
        return out


def _seed_record(seed: int | None, result: Mapping[str, Any], splits: Sequence[str]) -> dict[str, Any]:
    return {"seed": seed, **{s: dict(result[s]) for s in splits}, "best_epoch": result.get("best_epoch")}
