"""Task-specific neuron-level redundancy (Section 6.2): LCA ranking and the minimal neuron set.

Tables 1, 2 (size of the minimal set) and 8 (oracle, #neurons, reduced score).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lexp.experiment import RunContext, public, train_subsets
from lexp.report import figures


def grid_from_cfg(grid_cfg: Any) -> Any:
    """``neuron_grid`` with the configured counts/fractions/step (a callable of n_total)."""
    from lexp.redundancy.selection import neuron_grid

    kwargs = {k: v for k, v in OmegaConf.to_container(grid_cfg, resolve=True).items() if v is not None}
    return partial(neuron_grid, **kwargs)


class Outcome:
    """A probe result seen through the ``ProbeScores`` protocol of :mod:`lexp.redundancy.selection`."""

    def __init__(self, result: dict[str, Any], metric: str) -> None:
        self.result = result
        self.dev = float(result["dev"][metric])
        self.test = float(result["test"][metric]) if "test" in result else float("nan")
        self.weights = result.get("weights")


def evaluator(ctx: RunContext) -> Any:
    """Train named column subsets in one multi-head pass and return their outcomes."""

    def evaluate(subsets: dict[str, np.ndarray]) -> dict[str, Outcome]:
        return {name: Outcome(r, ctx.metric) for name, r in train_subsets(ctx, subsets).items()}

    return evaluate


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    from lexp.redundancy.ranking import rank_neurons
    from lexp.redundancy.selection import minimal_set, relative_target

    cfg = ctx.cfg.analysis
    metric = ctx.metric
    oracle = Outcome(ctx.oracle, metric)
    n_total = ctx.model_info["n_neurons"]
    hidden = ctx.model_info["hidden"]
    ordering = rank_neurons(oracle.weights, steps=int(cfg.ranking_steps))
    target = relative_target(oracle.dev, fraction=float(cfg.target_fraction))
    found = minimal_set(
        ordering, grid_from_cfg(cfg.grid)(n_total), evaluator(ctx), target, batch=int(cfg.batch)
    )
    chosen = found.outcome
    layer_counts = np.bincount(found.columns // hidden, minlength=ctx.model_info["n_layers"])
    result = {
        "metric": metric,
        "oracle_dev": oracle.dev,
        "oracle_test": oracle.test,
        "target_fraction": float(cfg.target_fraction),
        "target_dev": target,
        "reached": bool(found.reached),
        "n_neurons": int(found.n),
        "pct_of_all": 100.0 * found.n / n_total,
        "reduced_dev": chosen.dev,
        "reduced_test": chosen.test,
        "evaluated": [[int(n), float(s)] for n, s in found.evaluated],
        "selected_neurons": found.columns,
        "selected_per_layer": layer_counts,
        "ranking": ordering,
        "probe": public(chosen.result),
    }
    ctx.report["neurons"] = result
    ctx.tracker.log_metrics(
        {
            "neurons/n_neurons": found.n,
            f"neurons/reduced_dev/{metric}": chosen.dev,
            f"neurons/reduced_test/{metric}": chosen.test,
        }
    )
    ctx.tracker.log_table(
        "neurons/table8",
        ["task", "oracle_test", "n_neurons", "reduced_test", "oracle_dev", "reduced_dev"],
        [[ctx.task.name, oracle.test, found.n, chosen.test, oracle.dev, chosen.dev]],
    )
    ns, scores = zip(*found.evaluated, strict=True)
    path = figures.curve(
        list(ns),
        {"probe on top-n neurons": list(scores)},
        ctx.run_dir / "figures" / "minimal_set.png",
        f"{ctx.task.name} · {ctx.cfg.model.name}: top-n neurons (Sec. 6.2)",
        "number of top neurons n",
        f"dev {metric}",
        hlines={"oracle": oracle.dev, f"{cfg.target_fraction:.0%} of oracle": target},
    )
    ctx.report.figure(path)
    ctx.tracker.log_image("neurons/minimal_set", path)
    ctx.report["summary_lines"] = [
        f"minimal set: {found.n} neurons ({result['pct_of_all']:.1f}% of {n_total}) "
        f"dev {chosen.dev:.4f} test {chosen.test:.4f} (target {target:.4f}{'' if found.reached else ', NOT reached'})",
        "per layer: " + " ".join(str(int(c)) for c in layer_counts),
    ]
