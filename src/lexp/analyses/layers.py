"""Layer-level task-specific redundancy (Section 6.1): Table 7 and Figure 4."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lexp.experiment import RunContext, public
from lexp.report import figures


def layer_heads(store: Any, incremental: bool = True) -> dict[str, np.ndarray]:
    """One head per stored layer, and (optionally) one per prefix of layers 0..k (k below the top
    stored layer; all = oracle). Names carry the model's layer numbers (``store.layer_ids``):
    with ``model.layers=[0,4,8]``, ``layer_4`` and ``layers_0_4`` (= the stored layers 0 and 4)."""
    ids = store.layer_ids
    heads = {f"layer_{layer}": store.layer_columns([layer]) for layer in ids}
    if incremental:
        for k in range(len(ids) - 1):
            heads[f"layers_0_{ids[k]}"] = store.layer_columns(ids[: k + 1])
    return heads


def incremental_scores(
    heads: dict[str, Any], layer_ids: Sequence[int], split: str, metric: str
) -> list[float]:
    """Scores of the probes on the stored layers 0..k, k over ``layer_ids`` (the last: the oracle)."""
    return [float(heads[f"layers_0_{k}"][split][metric]) for k in layer_ids[:-1]] + [
        float(heads["oracle"][split][metric])
    ]


def score_fields(
    result: Mapping[str, Any], metric: str, *, dev: str = "dev", test: str = "test", prefix: str = ""
) -> dict[str, Any]:
    """A probe result's scores as results.json rows hold them: ``dev``/``test`` (named by ``dev``
    and ``test``), each with ``<key>_std`` beside it when the probe ran under several seeds
    (``probe.seeds``: the score is the mean), and with a control task (``task.control``)
    ``<prefix>control_dev|test`` and ``<prefix>selectivity_dev|test`` (score − control score,
    Hewitt & Liang 2019), with their ``_std``. The names lexp.tables and lexp.report read."""
    out: dict[str, Any] = {}
    for split, key in (("dev", dev), ("test", test)):
        scores = result.get(split) or {}
        out[key] = float(scores[metric]) if metric in scores else None
        _std(out, key, scores, metric)
        for block in ("control", "selectivity"):
            values = (result.get(block) or {}).get(split)
            if values and metric in values:
                name = f"{prefix}{block}_{split}"
                out[name] = float(values[metric])
                _std(out, name, values, metric)
    return out


def _std(out: dict[str, Any], key: str, scores: Mapping[str, Any], metric: str) -> None:
    std = scores.get(f"{metric}_std")
    if std is not None:
        out[f"{key}_std"] = float(std)


def prepare(ctx: RunContext) -> dict[str, np.ndarray]:
    return layer_heads(ctx.stores["train"], bool(ctx.cfg.analysis.incremental))


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    cfg = ctx.cfg.analysis
    metric = ctx.metric
    layer_ids = ctx.stores["train"].layer_ids  # the model's layer numbers (model.layers)
    threshold = float(cfg.redundancy_threshold)
    oracle = score_fields(ctx.oracle, metric, dev="oracle_dev", test="oracle_test", prefix="oracle_")
    oracle_dev = float(oracle["oracle_dev"])
    rows = []
    for layer in layer_ids:
        head = heads[f"layer_{layer}"]
        fields = score_fields(head, metric)
        row = {
            "layer": layer,
            **{k: fields.pop(k) for k in ("dev", "dev_std", "test", "test_std") if k in fields},
            # on the mean over seeds (probe.seeds); per seed in redundant_per_seed
            "redundant": bool(head["dev"][metric] >= threshold * oracle_dev),
        }
        if "per_seed" in head and "per_seed" in ctx.oracle:
            row["redundant_per_seed"] = [
                bool(s["dev"][metric] >= threshold * o["dev"][metric])
                for s, o in zip(head["per_seed"], ctx.oracle["per_seed"], strict=True)
            ]
        if cfg.incremental:
            inc = heads[f"layers_0_{layer}"] if layer < layer_ids[-1] else heads["oracle"]
            row.update(
                {
                    k: v
                    for k, v in score_fields(
                        inc, metric, dev="incremental_dev", test="incremental_test"
                    ).items()
                    if k.startswith("incremental_")
                }
            )
        row.update(fields)  # control_dev|test, selectivity_dev|test (task.control)
        rows.append(row)
    ctx.report["layers"] = {
        "metric": metric,
        **oracle,
        "threshold": threshold,
        "threshold_score_dev": threshold * oracle_dev,
        "table": rows,
        "redundant_layers": [r["layer"] for r in rows if r["redundant"]],
        "heads": {name: public(h) for name, h in heads.items()},
    }
    if "seeds" in ctx.oracle:
        ctx.report["layers"]["seeds"] = list(ctx.oracle["seeds"])
    columns = ["layer", "dev", "test", "redundant"] + (
        ["incremental_dev", "incremental_test"] if cfg.incremental else []
    )
    columns += [
        c for c in ("control_dev", "control_test", "selectivity_dev", "selectivity_test") if c in rows[0]
    ]
    ctx.tracker.log_table("layers/table7", columns, [[r.get(c) for c in columns] for r in rows])
    for r in rows:
        ctx.tracker.log_metrics({f"layers/dev/{metric}": r["dev"], "layers/layer": r["layer"]})
    path = figures.layer_scores(
        [r["dev"] for r in rows],
        [r["incremental_dev"] for r in rows] if cfg.incremental else None,
        oracle_dev,
        threshold,
        ctx.run_dir / "figures" / "layers.png",
        f"{ctx.task.name} · {ctx.cfg.model.name}: per-layer probes (Fig. 4)",
        control=[r["control_dev"] for r in rows] if "control_dev" in rows[0] else None,
        layers=layer_ids,
    )
    ctx.report.figure(path)
    ctx.tracker.log_image("layers/figure4", path)
    ctx.report["summary_lines"] = [
        f"layer {r['layer']:>2}: dev {r['dev']:.4f}"
        + (f" ± {r['dev_std']:.4f}" if "dev_std" in r else "")
        + (f"  0..{r['layer']}: {r['incremental_dev']:.4f}" if cfg.incremental else "")
        + (
            f"  control {r['control_dev']:.4f}  selectivity {r['selectivity_dev']:.4f}"
            if "control_dev" in r
            else ""
        )
        + ("  redundant" if r["redundant"] else "")
        for r in rows
    ]
