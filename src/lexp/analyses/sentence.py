"""Sentence tasks: the [CLS] store comes from a model fine-tuned on the task (cached by fingerprint)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from lexp.experiment import RunContext

log = logging.getLogger("lexp")


def finetuned_model_dir(ctx: RunContext) -> Path:
    """Fine-tune the configured encoder on the task (or reuse the cached one) and return its folder."""
    from lexp.encoders.finetune import finetune, spawn_strategy

    with_timing = ctx.report.data.setdefault("finetune", {})
    ctx.record_device("finetune", str(ctx.cfg.trainer.precision))
    model_cfg = OmegaConf.to_container(ctx.cfg.model, resolve=True)
    if model_cfg.get("random_init"):  # fine-tune from the random-weights twin (lexp.encoders.loading)
        from lexp.experiment import local_model_dir

        model_cfg["name_or_path"] = str(local_model_dir(model_cfg, ctx.cfg.cache_dir))
    # DDP ranks started by torch.multiprocessing run only the fit: the extraction and the probes
    # run once, here (Lightning's ddp would re-execute this Hydra command in every rank)
    trainer_kwargs, note = spawn_strategy(ctx.trainer_kwargs())
    if note:
        log.info(note)
    path = finetune(
        ctx.task,
        model_cfg,
        OmegaConf.to_container(ctx.cfg.finetune, resolve=True),
        cache_root=Path(ctx.cfg.cache_dir),
        trainer_kwargs=trainer_kwargs,
    )
    manifest = Path(path) / "manifest.json"
    if manifest.exists():
        import json

        with_timing.update(json.loads(manifest.read_text()))
    with_timing["path"] = str(path)
    ctx.report.save()
    return Path(path)
