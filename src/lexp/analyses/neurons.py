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
        self.test = float(result["test"][metric]) if result.get("test") else float("nan")
        self.weights = result.get("weights")

    @classmethod
    def of_seed(cls, result: dict[str, Any], index: int, metric: str) -> Outcome:
        """Seed ``index``'s own probe of a result trained under ``probe.seeds`` (its scores and
        weights, not the mean); the result itself when it has no seeds."""
        if "per_seed" not in result:
            return cls(result, metric)
        seed = result["per_seed"][index]
        view = {**seed, "weights": result["seed_weights"][index], "bias": result["seed_bias"][index]}
        return cls(view, metric)


def seeds_of(ctx: RunContext) -> list[int | None]:
    """The probe seeds of the run's heads (``probe.seeds``), or ``[None]``: one probe, init_seed."""
    return list(ctx.oracle.get("seeds") or [None])


def evaluator(ctx: RunContext) -> Any:
    """Train named column subsets in one multi-head pass and return their outcomes."""

    def evaluate(subsets: dict[str, np.ndarray]) -> dict[str, Outcome]:
        return {name: Outcome(r, ctx.metric) for name, r in train_subsets(ctx, subsets).items()}

    return evaluate


def seed_evaluator(ctx: RunContext, seeds: list[int | None]) -> Any:
    """Train ``{seed index: {name: columns}}`` in one multi-head pass, each subset under its own
    seed only (per-seed searches of :func:`lexp.redundancy.selection.minimal_sets`), with a
    control head each when ``task.control`` is on."""
    from lexp.probes import HeadSpec

    def evaluate(candidates: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, Outcome]]:
        named = {
            f"s{i}_{name}": HeadSpec(np.asarray(cols), seed=seeds[i])
            for i, subsets in candidates.items()
            for name, cols in subsets.items()
        }
        trained = train_subsets(ctx, named)
        return {
            i: {name: Outcome(trained[f"s{i}_{name}"], ctx.metric) for name in subsets}
            for i, subsets in candidates.items()
        }

    return evaluate


def seed_block(per_seed: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Mean over seeds of each number in ``keys`` with ``<key>_std`` beside it (sample std) and
    ``<key>_per_seed``; one seed: its values as they are."""
    from lexp.probes import mean_std

    if len(per_seed) == 1:
        return {k: per_seed[0][k] for k in keys if k in per_seed[0]}
    out: dict[str, Any] = {}
    for key in keys:
        values = [p.get(key) for p in per_seed]
        if any(v is None for v in values):
            continue
        out.update(mean_std([{key: float(v)} for v in values]))
        out[f"{key}_per_seed"] = values
    return out


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    from lexp.analyses.layers import score_fields
    from lexp.redundancy.ranking import rank_neurons
    from lexp.redundancy.selection import minimal_sets, relative_target

    cfg = ctx.cfg.analysis
    metric = ctx.metric
    n_total = ctx.model_info["n_neurons"]
    hidden = ctx.model_info["hidden"]
    seeds = seeds_of(ctx)
    # one search per probe seed (its own oracle ranking and target), all in lock-step: every
    # round's candidates of every seed train in one pass
    oracles = {i: Outcome.of_seed(ctx.oracle, i, metric) for i in range(len(seeds))}
    orderings = {i: rank_neurons(o.weights, steps=int(cfg.ranking_steps)) for i, o in oracles.items()}
    targets = {i: relative_target(o.dev, fraction=float(cfg.target_fraction)) for i, o in oracles.items()}
    found = minimal_sets(
        orderings, grid_from_cfg(cfg.grid), seed_evaluator(ctx, seeds), targets, batch=int(cfg.batch)
    )
    per_seed = []
    for i, seed in enumerate(seeds):
        got, chosen = found[i], found[i].outcome
        per_seed.append(
            {
                "seed": seed,
                "oracle_dev": oracles[i].dev,
                "oracle_test": oracles[i].test,
                "target_dev": targets[i],
                "reached": bool(got.reached),
                "n_neurons": int(got.n),
                "pct_of_all": 100.0 * got.n / n_total,
                **score_fields(chosen.result, metric, dev="reduced_dev", test="reduced_test"),
                "selected_per_layer": np.bincount(
                    got.columns // hidden, minlength=ctx.model_info["n_layers"]
                ),
            }
        )
    primary, chosen = found[0], found[0].outcome
    numbers = [
        "oracle_dev",
        "oracle_test",
        "target_dev",
        "n_neurons",
        "pct_of_all",
        "reduced_dev",
        "reduced_test",
    ]
    numbers += [f"{b}_{s}" for b in ("control", "selectivity") for s in ("dev", "test")]
    result = {
        "metric": metric,
        "target_fraction": float(cfg.target_fraction),
        **seed_block(per_seed, numbers),
        "reached": all(p["reached"] for p in per_seed),
        # the first seed's search (the others: per_seed)
        "evaluated": [[int(n), float(s)] for n, s in primary.evaluated],
        "selected_neurons": primary.columns,
        "selected_per_layer": per_seed[0]["selected_per_layer"],
        "ranking": orderings[0],
        "probe": public(chosen.result),
    }
    if len(seeds) > 1:
        result["seeds"] = seeds
        result["reached_per_seed"] = [p["reached"] for p in per_seed]
        result["per_seed"] = per_seed
    ctx.report["neurons"] = result
    reduced_test = result["reduced_test"] if result["reduced_test"] is not None else float("nan")
    ctx.tracker.log_metrics(
        {
            "neurons/n_neurons": result["n_neurons"],
            f"neurons/reduced_dev/{metric}": result["reduced_dev"],
            f"neurons/reduced_test/{metric}": reduced_test,
        }
    )
    ctx.tracker.log_table(
        "neurons/table8",
        ["task", "oracle_test", "n_neurons", "reduced_test", "oracle_dev", "reduced_dev"],
        [
            [
                ctx.task.name,
                result["oracle_test"],
                result["n_neurons"],
                reduced_test,
                result["oracle_dev"],
                result["reduced_dev"],
            ]
        ],
    )
    # the figure: the first seed's search, its oracle and target
    oracle, target, chosen = oracles[0], targets[0], Outcome(chosen.result, metric)
    ns, scores = zip(*primary.evaluated, strict=True)
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
    n = result["n_neurons"]
    ctx.report["summary_lines"] = [
        f"minimal set: {n:g}"
        + (f" ± {result['n_neurons_std']:.1f}" if "n_neurons_std" in result else "")
        + f" neurons ({result['pct_of_all']:.1f}% of {n_total}) dev {result['reduced_dev']:.4f} "
        f"test {reduced_test:.4f} (target {result['target_dev']:.4f}{'' if result['reached'] else ', NOT reached'})",
        "per layer (seed 1): " if len(seeds) > 1 else "per layer: ",
    ]
    ctx.report["summary_lines"][-1] += " ".join(str(int(c)) for c in result["selected_per_layer"])
    if "selectivity_dev" in result:
        ctx.report["summary_lines"].append(
            f"control dev {result['control_dev']:.4f}  selectivity dev {result['selectivity_dev']:.4f}"
        )
    if len(seeds) > 1:
        ctx.report["summary_lines"].append(
            "n per seed: " + " ".join(str(v) for v in result["n_neurons_per_seed"])
        )
