"""General redundancy (Section 5): CKA between layers and correlation clustering of neurons.

One streaming pass over a store gives the column means and the neuron × neuron co-moment; from
that one matrix come both the layer CKA matrix (Figure 1) and the neuron correlations. The
average-linkage tree is built once, cached beside the store, and cut at every requested ct
(Figures 2, 3; Table 6). Labels are never read here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lexp.experiment import RunContext, public, torch_threads
from lexp.locks import PARTIAL, ensure_entry, remove_partials, replace_dir
from lexp.report import figures

log = logging.getLogger("lexp")


def thresholds(value: Any) -> list[float]:
    """``analysis.ct`` is a number or a list of numbers in [0, 1]."""
    values = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") else [value]
    out = sorted({round(float(v), 6) for v in values})
    bad = [v for v in out if not 0.0 <= v <= 1.0]
    if bad:
        from lexp.errors import LexpInputError

        raise LexpInputError(f"analysis.ct={bad} is outside [0, 1]; the distance 1-|corr| lies in [0, 1]")
    return out


def clustering_cache(ctx: RunContext, store: Any, columns: np.ndarray | None, tag: str) -> dict[str, Any]:
    """CKA matrix, correlation linkage (and float32 correlations for medoids), cached by fingerprint.

    The cache lives beside the store, so a sweep over ct (or a rerun) never recomputes the pass.
    Concurrent jobs share it through :func:`lexp.locks.ensure_entry` (one builds, the others wait
    and reuse; an incomplete older entry is replaced only under the exclusive lock).
    """
    from lexp.redundancy import cka as cka_mod
    from lexp.redundancy import clustering, covariance
    from lexp.store import fingerprint

    cfg = ctx.cfg.analysis
    max_rows = int(cfg.max_rows) if cfg.get("max_rows") else None
    need_corr = str(cfg.get("representative", "random")) == "medoid"
    settings: dict[str, Any] = {
        "store": store.manifest["fingerprint"],
        "columns": None if columns is None else np.asarray(columns).tolist(),
        "max_rows": max_rows,
        "signed": bool(cfg.signed),
        "compute": str(cfg.compute),
    }
    method, budget = clustering_method(ctx, store, columns, max_rows)
    if method == "blocked":  # exact below the largest ct only: part of the cache's identity
        settings["method"] = "blocked-components"
        settings["exact_up_to_ct"] = max(thresholds(cfg.ct))
    fp = fingerprint(settings, [])
    cache = store.path.parent / f"{store.path.name}.{tag}-{fp[:12]}"

    def ready(entry: Path) -> bool:
        # a cache from before the debiased CKA is recomputed once (whole layers only)
        has_cka = columns is not None or (entry / "cka_debiased.npy").exists()
        needs = (entry / "manifest.json").exists() and has_cka
        return needs and (not need_corr or (entry / "corr32.npy").exists())

    def load(entry: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"linkage": clustering.load_linkage(entry / "linkage.npy"), "path": entry}
        for key in ("cka", "cka_debiased"):
            if (entry / f"{key}.npy").exists():
                out[key] = np.load(entry / f"{key}.npy", allow_pickle=False)
        if need_corr:  # a memory map stays valid even if a later job replaces the entry
            out["corr"] = np.load(entry / "corr32.npy", mmap_mode="r")
        return out

    def build(entry: Path) -> None:
        source: Any = store if max_rows is None else store.activations[:max_rows]
        device = ctx.run_device()
        ctx.record_device("covariance", str(cfg.compute))
        if method == "blocked":
            return build_blocked(entry, source, device)
        with torch_threads(ctx.cfg.threads.clustering):
            moments = covariance.streaming_moments(
                source,
                chunk_rows=int(cfg.chunk_rows),
                columns=None if columns is None else np.asarray(columns),
                compute=str(cfg.compute),
                progress=bool(ctx.cfg.progress),
                device=device,
                # the debiased CKA's per-row layer norms: ~6% of the pass at MiniLM size (bench_cka.py)
                layer_sizes=[store.hidden] * store.n_layers if columns is None else None,
            )
        cka = cka_debiased = None
        if columns is None:  # CKA needs whole layers
            cka = cka_mod.cka_matrix(moments, store.n_layers, store.hidden)
            cka_debiased = cka_mod.cka_matrix(moments, store.n_layers, store.hidden, debiased=True)
        corr = covariance.correlation(moments, out=moments.comoment)  # in place: saves N×N float64
        del moments
        linkage = clustering.neuron_linkage(corr, signed=bool(cfg.signed))
        remove_partials(entry)  # under the exclusive lock: every partial of this entry is stale
        tmp = entry.with_name(entry.name + f"{PARTIAL}{os.getpid()}")
        tmp.mkdir(parents=True)
        try:
            clustering.save_linkage(linkage, tmp / "linkage.npy")
            if cka is not None:
                np.save(tmp / "cka.npy", cka, allow_pickle=False)
                np.save(tmp / "cka_debiased.npy", cka_debiased, allow_pickle=False)
            if need_corr:
                np.save(tmp / "corr32.npy", corr.astype(np.float32), allow_pickle=False)
            manifest = {"fingerprint": fp, "settings": settings, "computed_on": str(device)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        except BaseException:  # a full disk or a signal: no half-written entry stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, entry)  # an older, incomplete entry goes only under the exclusive lock

    def build_blocked(entry: Path, source: Any, device: Any) -> None:
        from lexp.redundancy import wide

        with torch_threads(ctx.cfg.threads.clustering):
            result = wide.wide_general(
                source,
                ct_max=float(settings["exact_up_to_ct"]),
                budget_bytes=budget,
                chunk_rows=int(cfg.chunk_rows),
                columns=None if columns is None else np.asarray(columns),
                compute=str(cfg.compute),
                signed=bool(cfg.signed),
                layer_sizes=[store.hidden] * store.n_layers if columns is None else None,
                device=device,
                progress=(lambda msg: log.info("general: %s", msg)) if ctx.cfg.progress else None,
            )
        remove_partials(entry)
        tmp = entry.with_name(entry.name + f"{PARTIAL}{os.getpid()}")
        tmp.mkdir(parents=True)
        clustering.save_linkage(result.linkage, tmp / "linkage.npy")
        if result.cka is not None:
            np.save(tmp / "cka.npy", result.cka, allow_pickle=False)
            np.save(tmp / "cka_debiased.npy", result.cka_debiased, allow_pickle=False)
        manifest = {
            "fingerprint": fp,
            "settings": settings,
            "computed_on": str(device),
            "blocked": result.info,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, entry)

    # One job builds, concurrent jobs of a sweep wait and reuse; nothing is replaced while read.
    out, reused = ensure_entry(cache, ready=ready, build=build, load=load)
    info = json.loads((out["path"] / "manifest.json").read_text()).get("blocked")
    method_info = info or {"method": "exact"}
    return out | {"reused": reused, "method": method_info}


def clustering_method(
    ctx: RunContext, store: Any, columns: np.ndarray | None, max_rows: int | None
) -> tuple[str, float]:
    """(``exact`` | ``blocked``, budget in bytes) for this store and column selection: exact when
    its ≈ 16·N² bytes fit ``analysis.max_memory_gb`` (lexp.plan), unless ``analysis.method`` says."""
    from lexp.plan import general_method, memory_budget

    cfg = ctx.cfg.analysis
    plan = getattr(ctx, "plan", None)
    budget = plan.budget if plan is not None else memory_budget(cfg.get("max_memory_gb"))
    n = store.n_neurons if columns is None else len(columns)
    rows = store.n_rows if max_rows is None else min(store.n_rows, max_rows)
    method, _ = general_method(
        str(cfg.get("method", "auto")), rows, n, budget, int(cfg.chunk_rows), str(cfg.compute)
    )
    if method == "blocked" and str(cfg.get("representative", "random")) == "medoid":
        from lexp.errors import LexpInputError

        raise LexpInputError(
            f"analysis.representative=medoid needs the dense N × N correlations; at {n:,} neurons the "
            f"clustering runs blocked (analysis.max_memory_gb={budget / 1e9:.2f}). Fix: "
            "analysis.representative=random, or raise analysis.max_memory_gb"
        )
    return method, budget


def prepare(ctx: RunContext) -> dict[str, np.ndarray]:
    """Cluster the neurons and return one probe head of representatives per ct."""
    from lexp.redundancy import clustering

    cfg = ctx.cfg.analysis
    store = ctx.stores[str(cfg.split)]
    cached = clustering_cache(ctx, store, None, "general")
    cts = thresholds(cfg.ct)
    labels_at = clustering.cut_many(cached["linkage"], cts)
    from lexp.layers import neuron_layers

    neuron_layer = neuron_layers(store.layer_ids, store.hidden)  # the model's layer numbers
    state: dict[str, Any] = {"cached": cached, "cts": cts, "clusters": {}}
    heads: dict[str, np.ndarray] = {}
    for ct in cts:
        labels = labels_at[ct]
        reps = clustering.representatives(
            labels, mode=str(cfg.representative), seed=int(ctx.cfg.seed), corr=cached.get("corr")
        )
        makeup = clustering.cluster_makeup(labels, neuron_layer)
        state["clusters"][ct] = {"representatives": reps, "makeup": makeup}
        if cfg.evaluate:
            heads[f"ct_{ct:g}"] = reps
    ctx.general_state = state  # type: ignore[attr-defined]
    return heads


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    cfg = ctx.cfg.analysis
    state = ctx.general_state  # type: ignore[attr-defined]
    metric = ctx.metric
    store = ctx.stores[str(cfg.split)]
    n = store.n_neurons
    rows = []
    for ct in state["cts"]:
        info = state["clusters"][ct]
        reps = info["representatives"]
        row: dict[str, Any] = {
            "task": ctx.task.name,
            "ct": ct,
            "n_neurons": int(len(reps)),
            "pct_removed": 100.0 * (1 - len(reps) / n),
            "makeup": info["makeup"],
        }
        head = heads.get(f"ct_{ct:g}")
        if head is not None:
            from lexp.analyses.layers import score_fields  # dev, test (+ _std over seeds, control)

            row.update(score_fields(head, metric))
            row["probe"] = public(head)
        rows.append(row)
        ctx.tracker.log_metrics(
            {
                "general/ct": ct,
                "general/n_neurons": row["n_neurons"],
                "general/pct_removed": row["pct_removed"],
            }
            | ({f"general/dev/{metric}": row["dev"]} if "dev" in row else {})
        )
    result: dict[str, Any] = {
        "metric": metric,
        "split": str(cfg.split),
        "n_neurons_total": n,
        "oracle_dev": float(ctx.oracle["dev"][metric]),
        # None without a test store (extract.splits=[train,dev]: the probe's "test" block is empty)
        "oracle_test": float(ctx.oracle["test"][metric])
        if metric in (ctx.oracle.get("test") or {})
        else None,
        "cache": str(state["cached"]["path"]),
        "cache_reused": bool(state["cached"]["reused"]),
        # exact (dense, as NeuroX) or blocked-components (exact up to exact_up_to_ct; lexp.redundancy.wide)
        "clustering_method": state["cached"]["method"],
        "table6": rows,
        "representatives": {f"{ct:g}": state["clusters"][ct]["representatives"] for ct in state["cts"]},
    }
    if "cka" in state["cached"]:
        cka = np.asarray(state["cached"]["cka"])
        result["cka"] = cka
        result["cka_layers"] = store.layer_ids  # the model's layer of each row/column (model.layers)
        # neighbouring stored layers: with a model.layers subset, the kept layers next to each other
        adjacent = [float(cka[i, i + 1]) for i in range(len(cka) - 1)]
        result["cka_adjacent"] = adjacent
        path = figures.cka_heatmap(
            cka,
            ctx.run_dir / "figures" / "cka.png",
            f"{ctx.cfg.model.name}: linear CKA between layers (Fig. 1)",
            layers=store.layer_ids,
        )
        ctx.report.figure(path)
        ctx.tracker.log_image("general/figure1_cka", path)
    if "cka_debiased" in state["cached"]:  # unbiased HSIC (Nguyen et al. 2021), same pass
        debiased = np.asarray(state["cached"]["cka_debiased"])
        result["cka_debiased"] = debiased
        result["cka_adjacent_debiased"] = [float(debiased[i, i + 1]) for i in range(len(debiased) - 1)]
        path = figures.cka_heatmap(
            debiased,
            ctx.run_dir / "figures" / "cka_debiased.png",
            f"{ctx.cfg.model.name}: debiased linear CKA between layers",
            layers=store.layer_ids,
        )
        ctx.report.figure(path)
        ctx.tracker.log_image("general/figure1_cka_debiased", path)
    ctx.report["general"] = result
    columns = ["task", "ct", "n_neurons", "pct_removed", "dev", "test"]
    ctx.tracker.log_table("general/table6", columns, [[r.get(c) for c in columns] for r in rows])
    if any("dev" in r for r in rows):
        path = figures.reduction_vs_score(
            [r["ct"] for r in rows],
            [r["pct_removed"] for r in rows],
            [r.get("dev", np.nan) for r in rows],
            result["oracle_dev"],
            ctx.run_dir / "figures" / "reduction_vs_score.png",
            f"{ctx.task.name} · {ctx.cfg.model.name}: CC threshold (Fig. 2)",
        )
        ctx.report.figure(path)
        ctx.tracker.log_image("general/figure2", path)
    path = figures.cluster_makeup_bars(
        {r["ct"]: r["makeup"]["pct"] for r in rows},
        ctx.run_dir / "figures" / "cluster_makeup.png",
        f"{ctx.cfg.model.name}: where clustered neurons lie (Fig. 3)",
    )
    ctx.report.figure(path)
    ctx.tracker.log_image("general/figure3", path)
    ctx.report["summary_lines"] = [
        f"ct={r['ct']:.2f}: {r['n_neurons']:>5} neurons ({r['pct_removed']:.1f}% removed)"
        + (f"  dev {r['dev']:.4f}" if "dev" in r else "")
        for r in rows
    ]
