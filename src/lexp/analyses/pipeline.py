"""Efficient transfer learning (Section 7): LayerSelector + CCFS, timings and the reduced extractor.

Tables 3, 9, 10 (one row per task), Figure 5 / 10-14 timings, and ``extractor/`` in the run
directory: the encoder truncated to the selected layers, the selected neurons and their probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lexp.analyses.general import clustering_cache
from lexp.analyses.layers import layer_heads
from lexp.analyses.neurons import Outcome, grid_from_cfg, seed_block, seed_evaluator, seeds_of
from lexp.experiment import RunContext
from lexp.report import figures
from lexp.report.results_schema import forward_record, pct_reduction

log = logging.getLogger("lexp")


def prepare(ctx: RunContext) -> dict[str, np.ndarray]:
    """The incremental probes on layers 0..k train in the oracle's pass over the data."""
    heads = layer_heads(ctx.stores["train"], incremental=True)
    return {name: cols for name, cols in heads.items() if name.startswith("layers_0_")}


def cluster_columns(ctx: RunContext, columns: np.ndarray, ct: float) -> np.ndarray:
    """Correlation clustering restricted to ``columns`` (layers 0..k); one representative each."""
    from lexp.redundancy import clustering

    cfg = ctx.cfg.analysis
    store = ctx.stores["train"]
    clock = time.perf_counter()
    log.info("pipeline: clustering %d neurons (ct=%s) ...", len(columns), ct)
    cached = clustering_cache(ctx, store, columns if len(columns) < store.n_neurons else None, "pipeline")
    labels = clustering.flat_clusters(cached["linkage"], ct)
    reps = clustering.representatives(
        labels, mode=str(cfg.representative), seed=int(ctx.cfg.seed), corr=cached.get("corr")
    )
    log.info(
        "pipeline: %d clusters of %d neurons in %.1f s%s",
        len(reps),
        len(columns),
        time.perf_counter() - clock,
        " (linkage reused)" if cached.get("reused") else "",
    )
    return np.asarray(columns)[reps]


def logged_evaluator(evaluate: Any) -> Any:
    """The probe trainer of the feature search, with a log line per pass (heads, sizes, seconds):
    on an 80K-token task the search trains for minutes between the covariance bar and the timings."""
    calls = 0

    def run(candidates: dict[int, dict[str, np.ndarray]]) -> Any:
        nonlocal calls
        calls += 1
        sizes = sorted({len(cols) for subsets in candidates.values() for cols in subsets.values()})
        n_heads = sum(len(subsets) for subsets in candidates.values())
        shown = ", ".join(map(str, sizes[:8])) + (" ..." if len(sizes) > 8 else "")
        log.info("pipeline: probe pass %d: %d heads of %s neurons ...", calls, n_heads, shown)
        clock = time.perf_counter()
        out = evaluate(candidates)
        log.info("pipeline: probe pass %d done in %.1f s", calls, time.perf_counter() - clock)
        return out

    return run


#: numbers of a CCFS result reported as mean ± std over probe seeds (decisions also per seed)
_SEED_NUMBERS = [
    "oracle_dev", "oracle_test", "ls_target", "ls_layer", "ls_n_layers", "ls_n_neurons", "ls_dev", "ls_test",
    "cc_n_neurons", "cc_dev", "cc_test", "fs_target", "ccfs_n_neurons", "ccfs_dev", "ccfs_test", "reduction",
]  # fmt: skip


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    from lexp.redundancy.selection import ccfs_many

    cfg = ctx.cfg.analysis
    metric = ctx.metric
    n_layers = ctx.model_info["n_layers"]
    layer_ids = ctx.stores["train"].layer_ids  # the model's layer of each stored layer (model.layers)
    seeds = seeds_of(ctx)
    # one LS + CCFS per probe seed (its own oracle, prefixes, CC probe, ranking and minimal set);
    # every probe of every seed in one pass per step
    incrementals = {
        i: [Outcome.of_seed(heads[f"layers_0_{k}"], i, metric) for k in layer_ids[:-1]]
        + [Outcome.of_seed(ctx.oracle, i, metric)]
        for i in range(len(seeds))
    }
    start = time.perf_counter()
    log.info(
        "pipeline: LayerSelector (delta %s) + CCFS (ct %s, delta %s) over %d seed(s) ...",
        cfg.ls_delta,
        cfg.ct,
        cfg.fs_delta,
        len(seeds),
    )
    by_seed = ccfs_many(
        oracles={i: Outcome.of_seed(ctx.oracle, i, metric) for i in range(len(seeds))},
        incrementals=incrementals,
        hidden=int(ctx.model_info["hidden"]),
        cluster=lambda cols, ct: cluster_columns(ctx, cols, ct),
        train=logged_evaluator(seed_evaluator(ctx, seeds)),
        ct=float(cfg.ct),
        ls_delta=float(cfg.ls_delta),
        fs_delta=float(cfg.fs_delta),
        grid=grid_from_cfg(cfg.grid),
        steps=int(cfg.ranking_steps),
        batch=int(cfg.batch),
    )
    # LS chose the k-th stored layer: results name the model's layer number (ls_n_layers stays the
    # number of stored layers the probe read; equal to ls_layer + 1 without model.layers)
    by_seed = {i: replace(r, ls_layer=int(layer_ids[r.ls_layer])) for i, r in by_seed.items()}
    result = by_seed[0]  # the first seed's decisions build the extractor and the timings
    log.info(
        "pipeline: LS kept layers 0..%d, CCFS kept %d neurons, in %.1f s",
        result.ls_layer,
        result.ccfs_n_neurons,
        time.perf_counter() - start,
    )
    row = result.to_dict()
    if len(seeds) > 1:
        per_seed = [{"seed": seed, **by_seed[i].to_dict()} for i, seed in enumerate(seeds)]
        row.update(seed_block(per_seed, _SEED_NUMBERS))
        row["ls_reached"] = all(p["ls_reached"] for p in per_seed)
        row["fs_reached"] = all(p["fs_reached"] for p in per_seed)
        row["seeds"] = seeds
        row["per_seed"] = [
            {k: v for k, v in p.items() if k not in ("cc_columns", "ccfs_columns", "fs_evaluated")}
            for p in per_seed
        ]
        row["extractor_seed"] = seeds[0]
    for block in [row, *row.get("per_seed", [])]:  # results.json v2: shares of the model in %
        pct_reduction(block)
    row["metric"] = metric
    row["seconds"] = time.perf_counter() - start
    ctx.report["pipeline"] = row
    ctx.tracker.log_metrics({f"pipeline/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    columns = [
        "task",
        "oracle_test",
        "ls_test",
        "ls_n_layers",
        "ccfs_test",
        "ccfs_n_neurons",
        "pct_reduction",
    ]
    ctx.tracker.log_table("pipeline/table9", columns, [[ctx.task.name] + [row[c] for c in columns[1:]]])
    ctx.report["summary_lines"] = [
        f"LS: layers 0..{result.ls_layer} ({result.ls_n_layers} of {n_layers})  dev {result.ls_dev:.4f} test {result.ls_test:.4f}",
        f"CC (ct={result.ct}): {result.cc_n_neurons} neurons  dev {result.cc_dev:.4f}",
        f"CCFS: {result.ccfs_n_neurons} neurons ({100 * result.reduction:.1f}% reduction)  dev {result.ccfs_dev:.4f} test {result.ccfs_test:.4f}",
    ]
    if len(seeds) > 1:
        ctx.report["summary_lines"] = (
            [f"seed {seeds[0]} (the extractor's):"]
            + ctx.report["summary_lines"]
            + [
                "LS layers per seed: " + " ".join(str(v) for v in row["ls_n_layers_per_seed"]),
                "CCFS neurons per seed: " + " ".join(str(v) for v in row["ccfs_n_neurons_per_seed"]),
            ]
        )
    final = _final_probe(ctx, result)
    if cfg.timing.enabled:
        timings(ctx, result)
    if cfg.save_extractor:
        save_extractor(ctx, result, final)


def _final_probe(ctx: RunContext, result: Any) -> dict[str, Any]:
    """The probe trained on the final CCFS neurons (weights, bias, columns) — retrained if needed."""
    from lexp.experiment import train_subsets
    from lexp.probes import HeadSpec

    # the first probe seed's (probe.seeds), as its decisions chose the columns; no control head
    spec = HeadSpec(np.asarray(result.ccfs_columns), seed=seeds_of(ctx)[0])
    found = train_subsets(ctx, {"ccfs": spec})["ccfs"]
    return found


def timings(ctx: RunContext, result: Any) -> None:
    """Forward-pass speed-up of the truncated encoder and classifier time vs features, on the run's device.

    The forward pass runs with ``threads.extract``, the classifier with ``threads.probes`` and the
    probes' own step (:func:`lexp.redundancy.timing.classifier_timing`); both show progress bars and
    honour ``timing.repeats``. ``timing.classifier_steps`` Adam steps are timed per run and scaled
    to the full ``classifier_epochs`` over ``classifier_rows`` (a step's cost does not depend on the data).
    """
    from lexp.encoders.loading import load_encoder
    from lexp.experiment import torch_threads
    from lexp.redundancy import timing

    log = logging.getLogger("lexp")
    tcfg = ctx.cfg.analysis.timing
    device = ctx.run_device()
    progress = bool(ctx.cfg.progress)
    repeats = int(tcfg.repeats)
    model_cfg = OmegaConf.to_container(ctx.cfg.model, resolve=True)
    model_cfg["name_or_path"] = str(ctx.model_dir)
    model_cfg["random_init"] = False  # ctx.model_dir holds the run's weights (random ones included)
    encoder = load_encoder(model_cfg, device=device)
    model = encoder.model
    ctx.record_device("timing", next(model.parameters()).dtype)
    batches = _timing_batches(ctx, encoder.tokenizer, int(tcfg.sentences), int(tcfg.batch_size))
    depth = timing.encoder_depth(model)
    n_sentences = sum(int(b["input_ids"].shape[0]) for b in batches)
    log.info(
        "timing the forward pass: full encoder and %d truncations, %d sentences, %d repeats",
        depth,
        n_sentences,
        repeats,
    )
    clock = time.perf_counter()
    with torch_threads(ctx.cfg.threads.extract):
        records = timing.forward_speedups(
            model, batches, sorted(set(range(depth))), repeats=repeats, progress=progress
        )
    del model, encoder
    selected = (
        next(r for r in records if r["n_layers"] == result.ls_layer)
        if result.ls_layer < depth
        else records[0]
    )
    out: dict[str, Any] = {
        "device": str(device),
        "forward": [forward_record(dict(r)) for r in records],  # results.json v2 names
        "ls_layer": result.ls_layer,
        "speedup_at_ls": float(selected["speedup"]),
        "sentences_timed": n_sentences,
        "forward_wall_seconds": time.perf_counter() - clock,
    }
    features = [f for f in tcfg.classifier_features if f <= ctx.model_info["n_neurons"]]
    features = sorted(set(features) | {int(result.ccfs_n_neurons)})
    steps = tcfg.get("classifier_steps")
    log.info(
        "timing the probe vs features %s: %d rows x %d epochs, %s steps timed per run, %d repeats",
        features,
        int(tcfg.classifier_rows),
        int(tcfg.classifier_epochs),
        "all" if steps is None else int(steps),
        repeats,
    )
    probe = ctx.cfg.probe
    clock = time.perf_counter()
    with torch_threads(ctx.cfg.threads.probes):
        out["classifier"] = timing.classifier_timing(
            n_rows=int(tcfg.classifier_rows),
            feature_counts=features,
            n_classes=max(2, len(ctx.task.labels)),
            epochs=int(tcfg.classifier_epochs),
            batch_size=int(probe.batch_size),
            lr=float(probe.lr),
            l1=float(probe.l1),
            l2=float(probe.l2),
            repeats=repeats,
            seed=int(ctx.cfg.seed),
            steps=None if steps is None else int(steps),
            device=device,
            progress=progress,
        )
    out["classifier_wall_seconds"] = time.perf_counter() - clock
    ctx.report["pipeline_timing"] = out
    ctx.tracker.log_metrics({"pipeline/speedup_at_ls": out["speedup_at_ls"]})
    by_depth = forward_curve(records)
    path = figures.curve(
        [n for n, _ in by_depth],
        {"ms per sentence": [ms for _, ms in by_depth]},
        ctx.run_dir / "figures" / "forward_time.png",
        f"{ctx.task.name} · {ctx.cfg.model.name}: forward pass vs layers kept (LS = {result.ls_layer})",
        "transformer layers kept",
        "ms per sentence",
    )
    ctx.report.figure(path)
    path = figures.curve(
        [r["n_features"] for r in out["classifier"]],
        {
            "train (s)": [r["train_seconds"] for r in out["classifier"]],
            "inference (s)": [r["predict_seconds"] for r in out["classifier"]],
        },
        ctx.run_dir / "figures" / "classifier_time.png",
        f"probe time vs features ({tcfg.classifier_rows} rows, {tcfg.classifier_epochs} epochs)",
        "number of features",
        "seconds",
    )
    ctx.report.figure(path)
    ctx.report["summary_lines"] = ctx.report["summary_lines"] + [
        f"forward speed-up with layers 0..{result.ls_layer}: {out['speedup_at_ls']:.2f}x"
    ]


def _timing_batches(ctx: RunContext, tokenizer: Any, n: int, batch_size: int) -> list[dict[str, Any]]:
    """Length-sorted batches of the task's own test (or dev) sentences, as the paper times them."""
    split = "test" if "test" in ctx.task.splits else "dev"
    items = ctx.task.splits[split][:n]
    if ctx.task.kind == "labelling":
        texts = [list(s.words) for s in items]
        kwargs = {"is_split_into_words": True}
        order = np.argsort([len(t) for t in texts], kind="stable")
        enc = [
            tokenizer(
                [texts[i] for i in order[j : j + batch_size]],
                padding=True,
                truncation=True,
                return_tensors="pt",
                **kwargs,
            )
            for j in range(0, len(texts), batch_size)
        ]
    else:
        pairs = [(e.text_a, e.text_b) for e in items]
        enc = []
        for j in range(0, len(pairs), batch_size):
            a = [p[0] for p in pairs[j : j + batch_size]]
            b = [p[1] for p in pairs[j : j + batch_size]] if pairs[0][1] is not None else None
            enc.append(
                tokenizer(
                    a,
                    b,
                    padding=True,
                    truncation=True,
                    max_length=int(ctx.cfg.finetune.max_seq_length),
                    return_tensors="pt",
                )
            )
    return [dict(e) for e in enc]


def save_extractor(ctx: RunContext, result: Any, final: dict[str, Any]) -> None:
    """Write extractor/ and check that it reproduces the reported test score."""
    from lexp.encoders.loading import load_encoder
    from lexp.extractor import save_reduced_extractor
    from lexp.layers import model_columns
    from lexp.redundancy.timing import truncate_encoder

    model_cfg = OmegaConf.to_container(ctx.cfg.model, resolve=True)
    model_cfg["name_or_path"] = str(ctx.model_dir)
    model_cfg["random_init"] = False  # ctx.model_dir holds the run's weights (random ones included)
    encoder = load_encoder(model_cfg)
    from lexp.encoders.families import final_norm_name
    from lexp.redundancy.timing import encoder_depth

    truncated = truncate_encoder(encoder.model, int(result.ls_layer), final_norm=True)
    base = getattr(encoder.model, encoder.model.base_model_prefix, encoder.model)
    path = save_reduced_extractor(
        ctx.run_dir / "extractor",
        model=truncated,
        tokenizer=encoder.tokenizer,
        n_layers_kept=int(result.ls_layer) + 1,
        # store columns -> the truncated model's columns (layer l's unit u = l * hidden + u)
        columns=model_columns(final["columns"], ctx.stores["train"].layer_ids, int(ctx.model_info["hidden"])),
        weights=final["weights"],
        bias=final["bias"],
        labels=ctx.task.labels,
        kind=ctx.task.kind,
        drop_final_norm=final_norm_name(base) is not None
        and int(result.ls_layer) < encoder_depth(encoder.model),
        settings={
            "subword": str(ctx.cfg.extract.subword),
            "long_sentences": str(ctx.cfg.extract.long_sentences),
            "max_tokens": ctx.cfg.extract.max_tokens,
            "precision": str(ctx.cfg.extract.precision),
            "store_dtype": str(ctx.cfg.store.dtype),
            "max_length": int(ctx.cfg.finetune.max_seq_length),
            "sentence": (ctx.report.data.get("model_family") or {}).get("sentence"),
            "task": ctx.task.name,
            "model": str(ctx.cfg.model.name),
            "test_score": final.get("test", {}).get(ctx.metric),
        },
    )
    info: dict[str, Any] = {
        "path": str(path),
        "n_layers_kept": int(result.ls_layer) + 1,
        "n_neurons": len(final["columns"]),
    }
    if ctx.cfg.analysis.verify_extractor and "test" in ctx.task.splits:
        info.update(_verify_extractor(ctx, path, final))
    ctx.report["extractor"] = info


def _verify_extractor(ctx: RunContext, path: Path, final: Mapping[str, Any]) -> dict[str, Any]:
    """Re-score the test set with the saved extractor, from raw text: what a user of it would get.

    Classification and tagging must reproduce the reported accuracy exactly; for regression the
    Pearson r can differ in the 4th decimal, because the probe was trained and reported on the
    float16 store while the extractor computes float32 features.
    """
    from lexp.extractor import ReducedExtractor

    tagger = ReducedExtractor.load(path, device=ctx.run_device())
    labels, _ = ctx.task.encode_labels("test")
    test = ctx.task.splits["test"]
    if ctx.task.kind == "regression":
        scores = np.asarray(tagger.classify([(e.text_a, e.text_b) for e in test]), dtype=np.float64)
        return {
            "test_pearson_reloaded": float(np.corrcoef(scores, np.asarray(labels, dtype=np.float64))[0, 1]),
            "test_pearson_reported": final.get("test", {}).get("pearson"),
        }
    if ctx.task.kind == "labelling":
        predicted = [
            t
            for tags in tagger.tag([list(s.words) for s in test], batch_size=int(ctx.cfg.extract.batch_size))
            for t in tags
        ]
    else:
        predicted = tagger.classify([(e.text_a, e.text_b) for e in test])
    index = {label: i for i, label in enumerate(ctx.task.labels)}
    pred_ids = np.array([index[t] for t in predicted])
    return {
        "test_accuracy_reloaded": float(np.mean(pred_ids == labels)),
        "test_accuracy_reported": final.get("test", {}).get("accuracy"),
    }


def forward_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(layers kept, ms per sentence) in order of layers kept: forward_speedups lists the full
    model first, and a line through the points in that order ran from the full model back to
    layer 0 (and seemed to stop one layer short)."""
    return sorted((int(r["n_layers"]), 1000 * float(r["seconds_per_sentence"])) for r in records)
