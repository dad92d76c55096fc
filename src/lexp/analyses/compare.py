"""Cross-model CKA (beyond the paper): how the layers of two models over the same words relate.

Model A is the run's ``model``; model B is ``analysis.other`` (each null key = model A's, or
``model@analysis.other=<option>`` for a config of ``conf/model/``; ``layers`` = A's only for the same
checkpoint, else all of B's). B's store of the split is built
or reused through the same store machinery as A's (:func:`lexp.experiment.build_model_stores`), so
both hold one row per word of the same sentences: checked (rows, sentence offsets, labels, task and
split), else one error naming both stores. One streaming pass over the two stores read in lockstep
(:class:`PairedStores`: A's columns then B's) gives the co-moment of all N_A + N_B neurons and the
debiased-CKA row sums; every block of it is a CKA: the A × B block is the cross-model heatmap,
the diagonal blocks are each model's own Figure 1. Results (biased = the paper's estimator,
debiased = unbiased HSIC) are cached beside A's store, keyed by both stores' fingerprints.

Cost: the pass is a (N_A + N_B)² product per row — 4× one model's pass for two models of the same
size — and the float64 co-moment takes (N_A + N_B)² × 8 bytes (0.23 GB for two MiniLMs, 3.2 GB
for BERT-base + XLNet-base).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lexp.errors import LexpInputError
from lexp.experiment import RunContext, build_model_stores, torch_threads
from lexp.locks import PARTIAL, ensure_entry, remove_partials, replace_dir
from lexp.report import figures

log = logging.getLogger("lexp")

#: experiment.run skips the oracle for this analysis: it trains no probe.
TRAINS_PROBES = False


#: The keys that say which checkpoint a config loads: B inherits A's ``layers`` only when they agree.
_CHECKPOINT_KEYS = ("name_or_path", "revision")


def other_model_cfg(model_cfg: Mapping[str, Any], other: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model B's config: model A's, with every non-null key of ``analysis.other`` in its place.

    ``layers`` is the exception: A's layer numbers belong to A's depth, so B inherits them only when
    B loads the same checkpoint (its random twin, another dtype); a different checkpoint keeps all
    its layers unless ``analysis.other.layers`` names some (A's ``[0,12,24]`` would not exist in a
    6-layer B, and ``every:4`` of A is not what a user comparing two depths asked for).
    """
    other = dict(other or {})
    out = dict(model_cfg)
    out.update({k: v for k, v in other.items() if v is not None})
    same_checkpoint = all(out.get(k) == model_cfg.get(k) for k in _CHECKPOINT_KEYS)
    if other.get("layers") is None and not same_checkpoint and "layers" in out:
        out["layers"] = None
    return out


def model_labels(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, str]:
    """Names of the two models; under one name, the settings that differ are added (as in lexp.tables:
    ``minilm`` vs ``minilm[random_init=true]``)."""
    name_a, name_b = str(a.get("name")), str(b.get("name"))
    if name_a != name_b:
        return name_a, name_b
    differ = [k for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)]

    def label(cfg: Mapping[str, Any]) -> str:
        # a setting at its default (random_init=false) names nothing, as in lexp.tables
        parts = [
            f"{k}={json.dumps(cfg[k]).strip(chr(34))}"
            for k in differ
            if k in cfg and cfg[k] not in (None, False)
        ]
        return f"{cfg['name']}[{','.join(parts)}]" if parts else str(cfg["name"])

    la, lb = label(a), label(b)
    return (la, lb) if la != lb else (f"{name_a} (A)", f"{name_b} (B)")


def check_aligned(a: Any, b: Any) -> None:
    """The two stores hold the same words in the same order: same task, split, rows, sentence
    offsets and labels; else a LexpInputError naming both stores and what differs."""
    problems = []
    if a.task != b.task:  # the task whose labels each store was opened with
        problems.append(f"task {a.task!r} vs {b.task!r}")
    if a.manifest.get("split") != b.manifest.get("split"):
        problems.append(f"split {a.manifest.get('split')!r} vs {b.manifest.get('split')!r}")
    if a.n_rows != b.n_rows:
        problems.append(f"{a.n_rows} vs {b.n_rows} rows")
    elif not np.array_equal(a.offsets, b.offsets):
        bad = int(np.flatnonzero(a.offsets != b.offsets)[0]) if a.offsets.shape == b.offsets.shape else None
        problems.append(
            f"sentence offsets differ ({len(a.offsets) - 1} vs {len(b.offsets) - 1} sentences"
            + (f", first at sentence {bad}" if bad is not None else "")
            + ")"
        )
    elif not np.array_equal(a.labels, b.labels):
        problems.append(f"labels differ (first at row {int(np.flatnonzero(a.labels != b.labels)[0])})")
    if problems:
        raise LexpInputError(
            f"analysis=compare: the stores {a.path} and {b.path} do not hold the same words: "
            f"{'; '.join(problems)}. Both must come from the same task, split and limits; delete "
            "the stale one to rebuild it"
        )


class PairedStores:
    """A chunk source over two aligned stores read in lockstep: rows ``[A's neurons | B's neurons]``.

    ``max_rows`` keeps only the first rows. Chunks are float32, written into one reused buffer.
    """

    def __init__(self, a: Any, b: Any, max_rows: int | None = None) -> None:
        check_aligned(a, b)
        self.a, self.b = a, b
        self.n_rows = a.n_rows if max_rows is None else min(int(max_rows), a.n_rows)
        self.n_neurons = a.n_neurons + b.n_neurons
        self.path = f"{a.path} | {b.path} (columns >= {a.n_neurons} are B's)"

    @property
    def layer_sizes(self) -> list[int]:
        return [self.a.hidden] * self.a.n_layers + [self.b.hidden] * self.b.n_layers

    def iter_chunks(self, chunk_rows: int = 8192, columns: np.ndarray | None = None) -> Iterator[np.ndarray]:
        if columns is not None:
            raise LexpInputError("PairedStores: reads whole layers of both models; pass columns=None")
        if self.n_rows == 0:
            return
        na = self.a.n_neurons
        buffer = np.empty((min(chunk_rows, self.n_rows), self.n_neurons), dtype=np.float32)
        done = 0
        for ca, cb in zip(self.a.iter_chunks(chunk_rows), self.b.iter_chunks(chunk_rows), strict=True):
            k = min(ca.shape[0], self.n_rows - done)
            if k <= 0:
                break
            out = buffer[:k]
            out[:, :na] = ca[:k]
            out[:, na:] = cb[:k]
            yield out
            done += k


def cross_cka(ctx: RunContext, a: Any, b: Any) -> dict[str, Any]:
    """Biased and debiased CKA of every layer pair of A and B (cached beside A's store)."""
    from lexp.redundancy.cka import cka_blocks
    from lexp.redundancy.covariance import streaming_moments
    from lexp.store import fingerprint

    cfg = ctx.cfg.analysis
    max_rows = int(cfg.max_rows) if cfg.get("max_rows") else None
    settings = {
        "store_a": a.manifest["fingerprint"],
        "store_b": b.manifest["fingerprint"],
        "max_rows": max_rows,
        "compute": str(cfg.compute),
    }
    fp = fingerprint(settings, [])
    cache = a.path.parent / f"{a.path.name}.compare-{fp[:12]}"
    names = ("cka", "cka_debiased")
    timing: dict[str, float] = {}

    def ready(entry: Path) -> bool:
        return (entry / "manifest.json").exists() and all((entry / f"{k}.npy").exists() for k in names)

    def load(entry: Path) -> dict[str, Any]:
        out: dict[str, Any] = {k: np.load(entry / f"{k}.npy", allow_pickle=False) for k in names}
        return out | {"path": entry, "rows": json.loads((entry / "manifest.json").read_text())["rows"]}

    def build(entry: Path) -> None:
        source = PairedStores(a, b, max_rows)
        device = ctx.run_device()
        ctx.record_device("compare_covariance", str(cfg.compute))
        start = time.perf_counter()
        with torch_threads(ctx.cfg.threads.clustering):
            moments = streaming_moments(
                source,
                chunk_rows=int(cfg.chunk_rows),
                compute=str(cfg.compute),
                progress=bool(ctx.cfg.progress),
                device=device,
                layer_sizes=source.layer_sizes,
            )
        timing["pass_s"] = time.perf_counter() - start
        out = {"cka": cka_blocks(moments), "cka_debiased": cka_blocks(moments, debiased=True)}
        rows = int(moments.n)
        del moments
        remove_partials(entry)  # under the exclusive lock: every partial of this entry is stale
        tmp = entry.with_name(entry.name + f"{PARTIAL}{os.getpid()}")
        tmp.mkdir(parents=True)
        for key in names:
            np.save(tmp / f"{key}.npy", out[key], allow_pickle=False)
        manifest = {"fingerprint": fp, "settings": settings, "rows": rows, "computed_on": str(device)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, entry)

    # One job builds, concurrent jobs of a sweep wait and reuse (lexp.locks).
    out, reused = ensure_entry(cache, ready=ready, build=build, load=load)
    return out | {"reused": reused} | timing


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    del heads  # no probes
    cfg = ctx.cfg.analysis
    split = str(cfg.split)
    model_a = OmegaConf.to_container(ctx.cfg.model, resolve=True)
    other = OmegaConf.to_container(cfg.other, resolve=True) if cfg.get("other") is not None else {}
    model_b = other_model_cfg(model_a, other)  # type: ignore[arg-type]
    label_a, label_b = model_labels(model_a, model_b)  # type: ignore[arg-type]
    if model_a == model_b:
        log.warning("analysis=compare: model B is model A (%s); every layer matches itself", label_a)
    start = time.perf_counter()
    sibling = build_model_stores(ctx, model_b, splits=[split])
    ctx.report.timing("compare_stores", time.perf_counter() - start)
    a, b = ctx.stores[split], sibling.stores[split]
    result = cross_cka(ctx, a, b)
    la = a.n_layers
    full, full_d = np.asarray(result["cka"]), np.asarray(result["cka_debiased"])
    cross, cross_d = full[:la, la:], full_d[:la, la:]
    block: dict[str, Any] = {
        "models": [label_a, label_b],
        "split": split,
        "rows": result["rows"],
        "model_a": {
            "config": model_a,
            "n_layers": la,
            "layer_ids": a.layer_ids,  # the model's layer number of each row (model.layers)
            "hidden": a.hidden,
            "store": str(a.path),
        },
        "model_b": {
            "config": model_b,
            "n_layers": b.n_layers,
            "layer_ids": b.layer_ids,
            "hidden": b.hidden,
            "store": str(b.path),
            "store_reused": sibling.report.data.get("stores_reused", {}).get(split),
            "model_dir": sibling.report.data.get("model_dir"),
        },
        # rows: A's layers (0 = embeddings), columns: B's layers
        "cka": cross,
        "cka_debiased": cross_d,
        "cka_a": full[:la, :la],
        "cka_b": full[la:, la:],
        "cka_a_debiased": full_d[:la, :la],
        "cka_b_debiased": full_d[la:, la:],
        # for each layer of A, the most similar layer of B (biased CKA; B's layer numbers)
        "best_b_layers": [int(b.layer_ids[j]) for j in np.argmax(cross, axis=1)],
        "cache": str(result["path"]),
        "cache_reused": bool(result["reused"]),
    }
    if "pass_s" in result:
        block["pass_s"] = round(float(result["pass_s"]), 3)
    if la == b.n_layers and a.layer_ids == b.layer_ids:
        block["diagonal"] = [float(cross[i, i]) for i in range(la)]
        block["diagonal_debiased"] = [float(cross_d[i, i]) for i in range(la)]
    ctx.report["compare"] = block
    for name, matrix, what in (
        ("cka_compare.png", cross, "linear CKA"),
        ("cka_compare_debiased.png", cross_d, "debiased linear CKA"),
    ):
        path = figures.cka_cross_heatmap(
            matrix,
            ctx.run_dir / "figures" / name,
            f"{ctx.task.name}: {what}, {label_a} vs {label_b}",
            xlabel=f"{label_b} layer",
            ylabel=f"{label_a} layer",
            row_layers=a.layer_ids,
            col_layers=b.layer_ids,
        )
        ctx.report.figure(path)
        ctx.tracker.log_image(f"compare/{name.removesuffix('.png')}", path)
    if "diagonal" in block:
        ctx.tracker.log_metrics(
            {f"compare/diagonal/{i}": v for i, v in enumerate(block["diagonal"])}
            | {f"compare/diagonal_debiased/{i}": v for i, v in enumerate(block["diagonal_debiased"])}
        )
    lines = [f"CKA {label_a} (rows) vs {label_b} (columns), {result['rows']} {split} rows:"]
    best = np.argmax(cross, axis=1)
    lines += [
        f"  A layer {a.layer_ids[i]}: best B layer {block['best_b_layers'][i]} (CKA {cross[i].max():.3f}, "
        f"debiased {cross_d[i, best[i]]:.3f})"
        for i in range(la)
    ]
    ctx.report["summary_lines"] = lines
