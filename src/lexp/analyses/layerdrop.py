"""analysis=layerdrop: Block Influence, angular distance and adjacent CKA side by side, then the
drop test — the model with the most redundant block(s) removed, against the full model.

The measures come from the stored hidden states (no extra forward pass; lexp.redundancy.layerdrop).
The drop test, for every n in ``analysis.drop``: blocks ℓ*..ℓ*+n−1 (Gromov et al.'s choice, the
lowest d(ℓ*, ℓ*+n)) are removed from the model, (a) a probe is trained on the last hidden state of
the dropped model (word tasks: train/dev/test extracted again, last layer only, into the run dir)
and compared with the same probe on the full model's last layer (trained in the oracle's pass);
(b) for a causal LM, its perplexity on ``analysis.ppl_sentences`` sentences of ``analysis.ppl_split``
with its own LM head (AutoModelForCausalLM, blocks removed) against the full model's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lexp.experiment import RunContext, datamodule, public, torch_threads
from lexp.report import figures

log = logging.getLogger("lexp")


def prepare(ctx: RunContext) -> dict[str, np.ndarray]:
    """Layer measures from the store; the full model's last-layer probe joins the oracle's pass."""
    from lexp.redundancy.layerdrop import layer_similarity

    cfg = ctx.cfg.analysis
    store = ctx.stores[str(cfg.split)]
    with torch_threads(ctx.cfg.threads.clustering):
        ctx.layerdrop_state = layer_similarity(  # type: ignore[attr-defined]
            store, max_gap=int(cfg.max_gap), chunk_rows=int(cfg.chunk_rows)
        )
    return {"last_layer": store.layer_columns([store.n_layers - 1])}


def _is_causal_lm(model_dir: Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    names = list(getattr(config, "architectures", None) or [])
    return any(n.endswith("ForCausalLM") or n.endswith("LMHeadModel") for n in names)


def _dropped_stores(ctx: RunContext, blocks: list[int], folder: Path) -> dict[str, Any]:
    """Train/dev/test stores of the dropped model's last hidden state (word tasks)."""
    from lexp.encoders.extract import extract_words
    from lexp.encoders.loading import load_encoder
    from lexp.redundancy.layerdrop import drop_blocks
    from lexp.store import StoreWriter, open_store

    cfg = dict(ctx.cfg.model)
    cfg["name_or_path"] = str(ctx.model_dir)
    cfg["random_init"] = False
    encoder = load_encoder(cfg, device=ctx.run_device())
    drop_blocks(encoder.model, blocks)
    hidden = int(encoder.info["hidden"])
    stores = {}
    for split in ctx.stores:
        items = ctx.task.splits[split]
        labels, _ = ctx.task.encode_labels(split)
        lengths = np.fromiter((len(s.words) for s in items), dtype=np.int64, count=len(items))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        target = folder / split
        with torch_threads(ctx.cfg.threads.extract):
            stream = extract_words(
                encoder.model,
                encoder.tokenizer,
                [s.words for s in items],
                batch_size=int(ctx.cfg.extract.batch_size),
                subword=str(ctx.cfg.extract.subword),
                long_sentences=str(ctx.cfg.extract.long_sentences),
                progress=bool(ctx.cfg.progress),
                sources=[s.source for s in items],
            )
            manifest = {
                "fingerprint": f"layerdrop-{'-'.join(map(str, blocks))}-{split}",
                "model": str(ctx.cfg.model.name),
                "task": ctx.task.name,
                "split": split,
                "label_vocab": list(ctx.task.labels),
            }
            with StoreWriter(
                target, n_rows=int(offsets[-1]), n_layers=1, hidden=hidden, dtype="float32", manifest=manifest
            ) as writer:
                for i, rows in stream:
                    writer.write_rows(
                        int(offsets[i]), np.ascontiguousarray(rows[:, -hidden:], dtype=np.float32)
                    )
                writer.finish(labels, offsets)
        stores[split] = open_store(target)
    return stores


def _probe(ctx: RunContext, stores: dict[str, Any]) -> dict[str, Any]:
    from lexp.probes import train_probes

    with torch_threads(ctx.cfg.threads.probes):
        return train_probes(
            datamodule(ctx, stores=stores),
            None,
            probe_cfg=ctx.probe_cfg(),
            trainer_kwargs=ctx.trainer_kwargs(one_process=True),
        )["all"]


def run(ctx: RunContext, heads: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lexp.encoders.loading import load_pretrained
    from lexp.redundancy.layerdrop import drop_blocks, perplexity

    cfg = ctx.cfg.analysis
    state = ctx.layerdrop_state  # type: ignore[attr-defined]
    metric = ctx.metric
    store = ctx.stores[str(cfg.split)]
    L = store.n_layers
    full = heads["last_layer"]
    causal = _is_causal_lm(ctx.model_dir)
    texts: list[str] = []
    lm_full = None
    if causal:
        split = str(cfg.ppl_split)
        items = ctx.task.splits[split][: int(cfg.ppl_sentences)]
        texts = [" ".join(s.words) if hasattr(s, "words") else s.text_a for s in items]
        tokenizer = AutoTokenizer.from_pretrained(str(ctx.model_dir))

        def lm() -> Any:
            return (
                load_pretrained(AutoModelForCausalLM, str(ctx.model_dir), dtype=torch.float32)
                .eval()
                .to(ctx.run_device())
            )

        with torch_threads(ctx.cfg.threads.extract):
            lm_full = perplexity(lm(), tokenizer, texts)
    drops = []
    for n in sorted({int(v) for v in cfg.drop}):
        if n > L - 2 or str(n) not in state["best_blocks"]:
            log.warning(
                "layerdrop: drop n=%d skipped (the model has %d blocks; max_gap=%d)", n, L - 1, cfg.max_gap
            )
            continue
        best = state["best_blocks"][str(n)]
        row: dict[str, Any] = {
            "n": n,
            "blocks": best["blocks"],
            "angular_distance": best["distance"],
            "n_blocks_left": L - 1 - n,
        }
        if ctx.task.kind == "labelling":
            folder = ctx.run_dir / "layerdrop" / f"drop{n}"
            probe = _probe(ctx, _dropped_stores(ctx, best["blocks"], folder))
            row["probe"] = public(probe)
            for split in ("dev", "test"):
                if metric in (probe.get(split) or {}) and metric in (full.get(split) or {}):
                    row[f"probe_{split}"] = float(probe[split][metric])
                    row[f"full_{split}"] = float(full[split][metric])
                    row[f"delta_{split}"] = row[f"probe_{split}"] - row[f"full_{split}"]
        if causal and lm_full is not None:
            with torch_threads(ctx.cfg.threads.extract):
                ppl = perplexity(drop_blocks(lm(), best["blocks"]), tokenizer, texts)
            row["perplexity"] = ppl["perplexity"]
            row["perplexity_full"] = lm_full["perplexity"]
            row["perplexity_ratio"] = ppl["perplexity"] / lm_full["perplexity"]
        drops.append(row)
        log.info(
            "layerdrop: n=%d drop blocks %s: %s",
            n,
            best["blocks"],
            {k: v for k, v in row.items() if k.startswith(("probe_", "perplexity"))},
        )
    table = [
        {
            "block": b,
            "block_influence": state["block_influence"][b],
            "cka_adjacent": state["cka_adjacent"][b],
            **{f"angular_{g}": vals[b] for g, vals in state["angular_distance"].items() if b < len(vals)},
        }
        for b in range(L - 1)
    ]
    result = {
        "metric": metric,
        "split": str(cfg.split),
        "rows": state["rows"],
        "block_influence": state["block_influence"],
        "angular_distance": state["angular_distance"],
        "cka_adjacent": state["cka_adjacent"],
        "best_blocks": state["best_blocks"],
        "table": table,
        "full_last_layer": public(full),
        "causal_lm": causal,
        "perplexity_full": None if lm_full is None else lm_full["perplexity"],
        "ppl_tokens": None if lm_full is None else lm_full["tokens"],
        "drops": drops,
    }
    ctx.report["layerdrop"] = result
    path = figures.layer_redundancy(
        state["block_influence"],
        state["angular_distance"],
        state["cka_adjacent"],
        ctx.run_dir / "figures" / "layerdrop.png",
        f"{ctx.cfg.model.name}: layer redundancy (BI, angular distance, adjacent CKA)",
    )
    ctx.report.figure(path)
    ctx.tracker.log_image("layerdrop/figure", path)
    ctx.report["summary_lines"] = [
        f"drop {r['n']} block(s) {r['blocks']}: "
        + (f"probe dev {r['probe_dev']:.4f} vs full {r['full_dev']:.4f}" if "probe_dev" in r else "")
        + (f"  ppl {r['perplexity']:.2f} vs {r['perplexity_full']:.2f}" if "perplexity" in r else "")
        for r in drops
    ]
