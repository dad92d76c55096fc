"""Layer-level task-specific redundancy (Section 6.1): Table 7 and Figure 4."""

from __future__ import annotations

from typing import Any

import numpy as np

from lexp.experiment import RunContext, public
from lexp.report import figures


def layer_heads(store: Any, incremental: bool = True) -> dict[str, np.ndarray]:
    """One head per layer, and (optionally) one per prefix of layers 0..k (k < L-1; 0..L-1 = oracle)."""
    heads = {f"layer_{layer}": store.layer_columns([layer]) for layer in range(store.n_layers)}
    if incremental:
        for k in range(store.n_layers - 1):
            heads[f"layers_0_{k}"] = store.layer_columns(range(k + 1))
    return heads


def incremental_scores(heads: dict[str, Any], n_layers: int, split: str, metric: str) -> list[float]:
    """Scores of the probes on layers 0..k for k = 0..L-1 (the last one is the oracle)."""
    return [float(heads[f"layers_0_{k}"][split][metric]) for k in range(n_layers - 1)] + [
        float(heads["oracle"][split][metric])
    ]


def prepare(ctx: RunContext) -> dict[str, np.ndarray]:
    return layer_heads(ctx.stores["train"], bool(ctx.cfg.analysis.incremental))


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    cfg = ctx.cfg.analysis
    metric = ctx.metric
    n_layers = ctx.stores["train"].n_layers
    threshold = float(cfg.redundancy_threshold)
    oracle_dev = float(ctx.oracle["dev"][metric])
    oracle_test = float(ctx.oracle["test"][metric]) if "test" in ctx.oracle else None
    rows = []
    for layer in range(n_layers):
        head = heads[f"layer_{layer}"]
        row = {
            "layer": layer,
            "dev": float(head["dev"][metric]),
            "test": float(head["test"][metric]) if "test" in head else None,
            "redundant": bool(head["dev"][metric] >= threshold * oracle_dev),
        }
        if cfg.incremental:
            inc = heads[f"layers_0_{layer}"] if layer < n_layers - 1 else heads["oracle"]
            row["incremental_dev"] = float(inc["dev"][metric])
            row["incremental_test"] = float(inc["test"][metric]) if "test" in inc else None
        rows.append(row)
    ctx.report["layers"] = {
        "metric": metric,
        "oracle_dev": oracle_dev,
        "oracle_test": oracle_test,
        "threshold": threshold,
        "threshold_score_dev": threshold * oracle_dev,
        "table": rows,
        "redundant_layers": [r["layer"] for r in rows if r["redundant"]],
        "heads": {name: public(h) for name, h in heads.items()},
    }
    columns = ["layer", "dev", "test", "redundant"] + (
        ["incremental_dev", "incremental_test"] if cfg.incremental else []
    )
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
    )
    ctx.report.figure(path)
    ctx.tracker.log_image("layers/figure4", path)
    ctx.report["summary_lines"] = [
        f"layer {r['layer']:>2}: dev {r['dev']:.4f}"
        + (f"  0..{r['layer']}: {r['incremental_dev']:.4f}" if cfg.incremental else "")
        + ("  redundant" if r["redundant"] else "")
        for r in rows
    ]
