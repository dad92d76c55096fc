"""One lexp run: read the task, extract (or reuse) activation stores, train the oracle, analyse.

This is the body behind ``python -m lexp.run``; it takes a composed config and a run directory, so
tests and notebooks can call :func:`run` without Hydra's command line.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

import lexp
from lexp.device import describe_device, resolve_run_device
from lexp.errors import LexpInputError, LexpModelError, RunKilled
from lexp.report.results import Report
from lexp.report.tracking import Tracker, make_tracker

log = logging.getLogger("lexp")

ANALYSES = ("oracle", "general", "layers", "neurons", "pipeline", "compare", "layerdrop")


@dataclass
class RunContext:
    """Everything the analyses share: config, task, stores, oracle and the run's outputs."""

    cfg: DictConfig
    run_dir: Path
    report: Report
    tracker: Tracker
    task: Any = None
    stores: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    oracle: dict[str, Any] | None = None
    #: the run's one compute device (lexp.device.resolve_run_device), set before any stage
    device: Any = None
    #: task.control=true: the control task's class ids per split (store row order), else None
    control_labels: dict[str, np.ndarray] | None = None

    @property
    def regression(self) -> bool:
        return self.task.kind == "regression"

    @property
    def metric(self) -> str:
        """The headline metric every decision uses (the paper: accuracy; STS-B: Pearson)."""
        return "pearson" if self.regression else "accuracy"

    def trainer_kwargs(self, *, one_process: bool = False) -> dict[str, Any]:
        """The trainer config with accelerator/devices set from the run's device.

        ``one_process``: the probes' Trainer: the run's one device and no distributed strategy
        (``trainer.devices=2 trainer.strategy=ddp`` are for fine-tuning; probes run once).
        """
        from lexp.device import trainer_device_kwargs

        kwargs: dict[str, Any] = OmegaConf.to_container(self.cfg.trainer, resolve=True)  # type: ignore[assignment]
        if one_process:
            kwargs = {**kwargs, "devices": 1, "strategy": "auto"}
        return {**kwargs, **trainer_device_kwargs(self.run_device(), kwargs)}

    def record_device(self, stage: str, dtype: Any = None) -> None:
        """Log once which device and dtype ``stage`` runs on, and record it in results.json."""
        from lexp.device import log_stage_device

        info = log_stage_device(stage, self.run_device(), dtype)
        stages = self.report.data.setdefault("device_stages", {})
        stages[stage] = {k: info[k] for k in ("device", "dtype") if k in info}

    def run_device(self) -> Any:
        """The run's torch.device, resolved from the config on first use (tests build contexts by hand)."""
        if self.device is None:
            self.device = resolve_run_device(self.cfg.get("device", "auto"), self.cfg.get("trainer"))
        return self.device

    def probe_cfg(self) -> dict[str, Any]:
        probe = OmegaConf.to_container(self.cfg.probe, resolve=True)
        probe["regression"] = self.regression
        return probe  # type: ignore[return-value]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch threads (None: leave the setting alone)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def stage(ctx: RunContext, name: str) -> Iterator[None]:
    """Time a stage, record it in results.json and the tracker."""
    log.info("stage %s ...", name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    ctx.report.timing(name, seconds)
    ctx.tracker.log_metrics({f"time_s/{name}": seconds})
    log.info("stage %s done in %.1f s", name, seconds)


def _run_group(cfg: DictConfig) -> tuple[str, str]:
    """(run name, group) for the tracker: multirun jobs are grouped by their sweep directory."""
    name = f"{cfg.task.name}-{cfg.model.name}-{cfg.analysis.name}"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"{name}-{hc.job.num}", Path(hc.sweep.dir).name
    except (ImportError, ValueError):
        pass
    return name, "single"


def _final_status(exc: BaseException) -> str:
    if isinstance(exc, RunKilled):
        return f"killed ({exc.name})"
    if isinstance(exc, KeyboardInterrupt):
        return "killed (SIGINT)"
    return f"failed: {type(exc).__name__}: {exc}"


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run every stage named by the config and return the contents of results.json."""
    from lexp.jobsignals import job_signals

    with job_signals():  # SIGTERM (SLURM, kill): RunKilled, results.json says killed (SIGTERM)
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from lexp.fs import writable_problem
    from lexp.schema import check_config, command_line

    check_config(cfg)  # every setting, before any work (lexp.schema)
    problem = writable_problem(Path(str(cfg.cache_dir)), "cache_dir")  # read-only, full, a file
    if problem is not None:
        raise LexpInputError(problem)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name, group = _run_group(cfg)
    report = Report(
        run_dir,
        task=cfg.task.name,
        model=cfg.model.name,
        analysis=cfg.analysis.name,
        lexp_version=lexp.__version__,
        command=command_line(),  # each argument shell-quoted: copy-pasteable
        python=platform.python_version(),
        config=resolved,
    )
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    # The checks and the memory plan come first, with a no-op tracker: importing pytorch_lightning
    # (seed_everything, the W&B/CSV loggers) takes ~10 s, and a plan that does not fit must fail
    # in seconds. Nothing before the seed draws a random number (every choice takes cfg.seed).
    tracker: Tracker = Tracker()
    ctx = RunContext(cfg=cfg, run_dir=run_dir, report=report, tracker=tracker)
    exit_code = 1  # until the run completes: the tracker marks an interrupted run failed
    try:
        if cfg.analysis.name not in ANALYSES:
            raise LexpInputError(
                f"analysis={cfg.analysis.name!r} is unknown; choose one of {', '.join(ANALYSES)}"
            )
        report["device"] = describe_device(ctx.run_device())
        log.info("device: %s (%s)", report["device"]["device"], report["device"]["name"])
        check_model_source(cfg.model)  # a model path that is not there: before reading the data
        kept_layers(ctx, OmegaConf.to_container(cfg.model, resolve=True))  # type: ignore[arg-type]
        with stage(ctx, "read"):
            read_task(ctx)
            plan_memory(ctx)  # seconds: config.json + row counts, before transformers is imported
        # the family's facts (tokenizer): a sentence vector it cannot give fails before any model work
        _model_family(ctx, OmegaConf.to_container(cfg.model, resolve=True))  # type: ignore[arg-type]
        from pytorch_lightning import seed_everything

        seed_everything(int(cfg.seed), workers=True, verbose=False)
        ctx.tracker = tracker = make_tracker(cfg.logger, run_dir, name=name, group=group, config=resolved)  # type: ignore[arg-type]
        tracker.log_metrics({"time_s/read": report.data["timings_s"]["read"]})
        with stage(ctx, "extract"):
            build_stores(ctx)
        module = None
        extra: dict[str, np.ndarray] = {}
        if cfg.analysis.name != "oracle":
            from importlib import import_module

            module = import_module(f"lexp.analyses.{cfg.analysis.name}")
            if hasattr(module, "prepare"):  # heads that can share the oracle's pass over the data
                with stage(ctx, f"{cfg.analysis.name}_prepare"):
                    extra = module.prepare(ctx)
        heads: dict[str, Any] = {}
        if getattr(module, "TRAINS_PROBES", True):  # analysis=compare trains none
            with stage(ctx, "probes" if extra else "oracle"):
                heads = train_oracle(ctx, extra)
        if module is not None:
            with stage(ctx, cfg.analysis.name):
                module.run(ctx, heads)
        report.timing("total", time.perf_counter() - start)
        report["status"] = "complete"
        tracker.summary(_flat_summary(report.data))
        print_summary(ctx)
        exit_code = 0
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a full disk: Report keeps a short record in place
            report["status"] = _final_status(exc)
        raise
    finally:
        tracker.finish(exit_code=exit_code)
    return report.data


# --------------------------------------------------------------------------------------------- read
def read_task(ctx: RunContext) -> None:
    """Read the task's files (readers raise clear errors on bad input)."""
    from lexp.tasks import load_task

    task_cfg = OmegaConf.to_container(ctx.cfg.task, resolve=True)
    task = load_task(task_cfg)  # type: ignore[arg-type]
    for split, n in (ctx.cfg.get("limit") or {}).items():
        if n is None or split not in task.splits:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # [:-1] or [:0] would be silent
            raise LexpInputError(
                f"limit.{split}={n!r} must be an integer >= 1 or null. Fix: limit.{split}=null"
            )
        task.splits[split] = task.splits[split][:n]
        task.notes[f"limit_{split}"] = n
    ctx.task = task
    if ctx.cfg.task.get("control", False):  # Hewitt & Liang's control task, seeded by the run seed
        ctx.control_labels = {s: task.control_labels(s, int(ctx.cfg.seed)) for s in task.splits}
        ctx.report["control_task"] = {
            "seed": int(ctx.cfg.seed),
            "rule": "one label per word type, drawn from the train label distribution by hash(seed, type)",
            "word_types": {s: len({w for x in task.splits[s] for w in x.words}) for s in task.splits},
        }
    counts: dict[str, Any] = {}
    for split, items in task.splits.items():
        if task.kind == "labelling":
            counts[split] = {"sentences": len(items), "tokens": int(sum(len(s.words) for s in items))}
        else:
            counts[split] = {"examples": len(items)}
    ctx.report.update(
        {
            "task_kind": task.kind,
            "data_files": [str(p) for p in task.files],
            "counts": counts,
            "n_labels": len(task.labels),
            "labels": list(task.labels),
            "unseen_labels": task.unseen_labels(),
            "unseen_label_counts": {s: int(sum(c.values())) for s, c in task.unseen_labels().items()},
            "task_notes": task.notes,
        }
    )
    for split, unseen in task.unseen_labels().items():
        if unseen:
            log.warning(
                "%s: %d %s tokens carry %d labels never seen in train (counted as errors): %s",
                task.name,
                sum(unseen.values()),
                split,
                len(unseen),
                ", ".join(sorted(unseen)[:10]),
            )


def plan_memory(ctx: RunContext) -> None:
    """Print the memory plan (lexp.plan) from the task's row counts and the model's config, and
    stop with one error when it does not fit; ctx.plan carries the general analysis' method."""
    from lexp.plan import make_plan

    model_cfg = OmegaConf.to_container(ctx.cfg.model, resolve=True)
    shape = model_shape(local_model_dir(model_cfg, ctx.cfg.cache_dir))  # type: ignore[arg-type]
    if shape is None:
        return  # loading the model reports the problem with its own clear error
    ids = kept_layers(ctx, model_cfg)  # type: ignore[arg-type]
    n_layers, hidden = (shape[0] if ids is None else len(ids)), shape[1]  # the kept width
    task = ctx.task
    rows = {
        s: int(sum(len(x.words) for x in items)) if task.kind == "labelling" else len(items)
        for s, items in task.splits.items()
        if s in _split_names(ctx)
    }
    plan = make_plan(ctx.cfg, rows=rows, n_layers=n_layers, hidden=hidden, n_classes=len(task.labels))
    for line in plan.lines():
        log.info("%s", line)
    ctx.plan = plan  # type: ignore[attr-defined]
    ctx.report["memory_plan"] = plan.as_dict()


def model_shape(folder: str | Path) -> tuple[int, int] | None:
    """(hidden states incl. the embeddings, hidden size): config.json read directly (no
    transformers import: the memory plan is refused in seconds), else transformers' AutoConfig."""
    from lexp.layers import config_shape

    shape = config_shape(folder)
    if shape is not None:
        return shape
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return (int(layers) + 1, int(hidden)) if hidden and layers else None


def kept_layers(ctx: RunContext, model_cfg: Mapping[str, Any]) -> list[int] | None:
    """The model layer numbers ``model.layers`` keeps (None: all), checked against the model's
    depth from its config before any data is read (lexp.layers)."""
    from lexp.layers import resolve_layers

    spec = model_cfg.get("layers")
    if spec is None or spec == "all":
        return None
    folder = local_model_dir(model_cfg, ctx.cfg.cache_dir)
    shape = model_shape(folder)
    if shape is None:
        raise LexpModelError(f"{folder}/config.json does not give the model's depth; model.layers needs it")
    ids = resolve_layers(list(spec) if not isinstance(spec, str) else spec, shape[0], where=str(folder))
    if ids is not None and str(ctx.cfg.analysis.name) == "layerdrop":
        raise LexpInputError(
            f"analysis=layerdrop needs every layer of the model, model.layers={spec} keeps {ids}: its "
            "measures relate each layer to the next ones (Block Influence, d(l, l+n)) and its drop test "
            "removes blocks of the model. Fix: model.layers=null"
        )
    return ids


# ------------------------------------------------------------------------------------------ extract
def local_model_dir(model_cfg: Mapping[str, Any], cache_root: str | Path | None = None) -> Path:
    """The folder holding the model's files: a local dir, or the hub id's snapshot in the local cache
    (``model.random_init``: its random-weights twin, saved once under ``cache_root``).

    When neither exists, loading the encoder raises the one clear error that says what was tried.
    """
    from lexp.encoders.loading import (
        _hub_snapshot,
        init_seed,
        load_encoder,
        materialize_random_init,
        resolve_name_or_path,
    )

    if init_seed(model_cfg) is not None:
        return materialize_random_init(model_cfg, cache_root if cache_root is not None else ".cache/lexp")

    target = resolve_name_or_path(model_cfg.get("name_or_path"))
    if Path(target).is_dir():
        return Path(target)
    snapshot = _hub_snapshot(target, model_cfg.get("revision"))
    if snapshot is None:
        load_encoder(model_cfg)  # raises LexpModelError naming what was tried and the fix
        raise LexpModelError(f"model {target!r} loaded but its files were not found in the local cache")
    return Path(snapshot)


def check_model_source(model_cfg: Mapping[str, Any]) -> None:
    """Raise the one clear LexpModelError of a model whose files are not there (a local folder that
    does not exist, a hub id not in the offline cache) at start, before the data is read or a store
    is built. ``random_init`` twins are checked through their source model."""
    cfg = dict(model_cfg)
    cfg["random_init"] = False
    local_model_dir(cfg)


def _split_names(ctx: RunContext) -> list[str]:
    wanted = list(ctx.cfg.extract.splits)
    missing = [s for s in ("train", "dev") if s not in ctx.task.splits]
    if missing:
        raise LexpInputError(
            f"task {ctx.task.name} has no {missing} split; every analysis needs train and dev"
        )
    return [s for s in wanted if s in ctx.task.splits]


def build_stores(ctx: RunContext) -> None:
    """Open the cached store of every split, extracting only what is missing or stale."""
    from lexp.encoders.writer import report_counts
    from lexp.store import ensure_labels, ensure_store, fingerprint, sentences_digest, store_dir

    cfg = ctx.cfg
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if ctx.task.notes.get("reader") in ("table_sentences", "table_tokens"):  # before any fine-tuning
        from lexp.tasks.tabular import check_model_lengths

        base_dir = local_model_dir(model_cfg, cfg.cache_dir)  # type: ignore[arg-type]
        check_model_lengths(
            ctx.task,
            base_dir,
            max_seq_length=int(cfg.finetune.max_seq_length),
            long_sentences=str(cfg.extract.long_sentences),
            long_texts=str(cfg.task.get("long_texts", "error")),
        )
    # run() checked it before reading the task; a second model (analysis=compare) is checked here
    family = ctx.report.data.get("model_family") or _model_family(ctx, model_cfg)
    if ctx.task.kind != "labelling":
        from lexp.analyses.sentence import finetuned_model_dir

        with torch_threads(cfg.threads.get("finetune")):
            model_dir = finetuned_model_dir(ctx)
    else:
        model_dir = local_model_dir(model_cfg, cfg.cache_dir)  # type: ignore[arg-type]
    ctx.model_dir = Path(model_dir)
    from lexp.encoders.loading import model_digest

    digest = model_digest(ctx.model_dir)
    extract_cfg = OmegaConf.to_container(cfg.extract, resolve=True)
    from lexp.encoders.loading import store_model_settings

    layer_ids = kept_layers(ctx, model_cfg)  # type: ignore[arg-type]
    cache_root = Path(cfg.cache_dir)
    encoder = None
    reused: dict[str, bool] = {}
    labels_reused: dict[str, bool] = {}
    label_sets: dict[str, str] = {}
    paths: dict[str, str] = {}
    extraction: dict[str, Any] = {}
    plan: list[tuple[str, str, dict[str, Any], Path]] = []
    for split in _split_names(ctx):
        # Keyed by the sentences, not the task: the activations do not depend on the labels, so
        # tasks over the same sentences (sem, ccg) share the store and add their labels to it.
        items = ctx.task.splits[split]
        inputs = (
            (s.words for s in items)
            if ctx.task.kind == "labelling"
            else ((e.text_a, e.text_b) for e in items)
        )
        settings = {
            "model": store_model_settings(model_cfg),  # type: ignore[arg-type]
            "model_digest": digest,
            "kind": "words" if ctx.task.kind == "labelling" else "sentences",
            "sentences": sentences_digest(inputs),
            "split": split,
            "subword": extract_cfg["subword"],
            "long_sentences": extract_cfg["long_sentences"],
            "store_dtype": cfg.store.dtype,
            "max_length": cfg.finetune.max_seq_length if ctx.task.kind != "labelling" else None,
            # What the numbers are computed in: a bfloat16 store is never reused as a float32 one.
            # Not the device nor the batching: a float32 store built on the CPU or a GPU, in
            # sentence or token-budget batches, holds the same rows within 1e-4 (tested).
            "model_dtype": str(model_cfg.get("dtype") or "float32"),  # type: ignore[union-attr]
            "precision": str(extract_cfg.get("precision", "32")),
        }
        if family["sentence"] not in (None, "cls"):  # [CLS] stores keep the fingerprints they had
            settings["sentence"] = family["sentence"]
        if layer_ids is not None:  # model.layers: a subset is another store (all layers: as before)
            settings["layers"] = layer_ids
        fp = fingerprint(settings, [])
        plan.append((split, fp, settings, store_dir(cache_root, str(cfg.model.name), split, fp)))
    missing = [(split, path) for split, _, _, path in plan if not path.exists()]
    _require_space_for(ctx, missing, layer_ids)
    prepared: dict[str, Any] = {}
    if missing:  # every split's checks (sentence lengths, words) run before the first extraction
        encoder = _load_encoder(ctx, model_cfg)  # type: ignore[arg-type]
        with torch_threads(cfg.threads.extract):
            prepared = {split: _prepare_extraction(ctx, encoder, split, layer_ids) for split, _ in missing}
    for split, fp, settings, path in plan:

        def build(target: Path, split: str = split, fp: str = fp, settings: dict = settings) -> None:
            nonlocal encoder
            if encoder is None:
                encoder = _load_encoder(ctx, model_cfg)  # type: ignore[arg-type]
            _write_store(ctx, encoder, split, target, fp, settings, prepared.pop(split, None), layer_ids)

        with torch_threads(cfg.threads.extract):
            store, was_reused = ensure_store(path, build, labels=False)
        y, _ = ctx.task.encode_labels(split)
        store, have_labels = ensure_labels(
            store,
            ctx.task.name,
            y,
            list(ctx.task.labels),
            extra_manifest={"task_kind": ctx.task.kind, "data_files": [str(p) for p in ctx.task.files]},
        )
        ctx.stores[split] = store
        reused[split] = was_reused
        labels_reused[split] = have_labels
        paths[split] = str(store.path)
        label_sets[split] = store.label_path.name
        extraction[split] = report_counts(split, store.manifest.get("extraction"), was_reused)
        log.info(
            "%s store %s: %s (%d rows × %d neurons); %s labels %s",
            split,
            "reused" if was_reused else "built",
            store.path,
            store.n_rows,
            store.n_neurons,
            ctx.task.name,
            f"reused ({store.label_path.name})" if have_labels else f"added ({store.label_path.name})",
        )
    for stream in prepared.values():  # a split another process built meanwhile
        stream[0].close()
    _check_consistent_stores(ctx.stores)
    first = next(iter(ctx.stores.values()))
    ctx.model_info = {
        "n_layers": first.n_layers,
        "hidden": first.hidden,
        "n_neurons": first.n_neurons,
        "layer_ids": first.layer_ids,  # the model's number of each stored layer (model.layers)
    }
    ctx.report.update(
        {
            "model_dir": str(ctx.model_dir),
            "n_layers": first.n_layers,
            "layer_ids": first.layer_ids,
            "hidden": first.hidden,
            "n_neurons": first.n_neurons,
            "stores": paths,
            "stores_reused": reused,
            "store_labels": label_sets,
            "labels_reused": labels_reused,
            "rows": {s: int(st.n_rows) for s, st in ctx.stores.items()},
            "extraction": extraction,
        }
    )


def _check_consistent_stores(stores: Mapping[str, Any]) -> None:
    """Every split's store must hold the train store's layers, width, dtype, model and label
    vocabulary: a store edited or copied in by hand from another run is refused, not mixed in."""
    train = stores.get("train")
    if train is None:
        return
    keys = ("n_layers", "hidden", "dtype", "model")

    def facts(store: Any) -> dict[str, Any]:
        return {k: store.manifest.get(k) for k in keys} | {
            "task": store.task,
            "label_vocab": store.label_vocab,
            "layer_ids": list(store.layer_ids),
        }

    want = facts(train)
    for split, store in stores.items():
        have = facts(store)
        differ = [k for k in have if have[k] != want[k]]
        if split != "train" and differ:
            shown = "; ".join(f"{k}: {have[k]!r} vs train {want[k]!r}" for k in differ[:3])
            raise LexpInputError(
                f"{store.path}: this {split} store does not match the train store {train.path} ({shown}); "
                "one of them was edited or copied in by hand. Delete both store directories and rerun."
            )


def _model_family(ctx: RunContext, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model family, tokenizer kind and sentence representation (lexp.encoders.families), from
    the config and tokenizer alone; recorded in results.json as ``model_family``."""
    from lexp.encoders.families import inspect_model

    folder = local_model_dir(model_cfg, ctx.cfg.cache_dir)
    sentence = str(ctx.cfg.extract.get("sentence", "auto"))
    kind = ctx.task.kind if ctx.task is not None else str(ctx.cfg.task.get("kind", "labelling"))
    family = inspect_model(folder, sentence, sentence_task=kind != "labelling")
    ctx.report["model_family"] = family
    log.info(
        "model family %s, %s tokenizer (%s), words aligned by word_ids%s",
        family["family"],
        family["tokenizer_kind"],
        family["tokenizer_class"],
        f", sentence vector: {family['sentence']}" if family["sentence"] else "",
    )
    return family


def _require_space_for(
    ctx: RunContext, missing: list[tuple[str, Path]], layer_ids: list[int] | None = None
) -> None:
    """Fail before the first extraction when the stores still to build do not fit on the disk
    (each StoreWriter checks and reserves its own store again)."""
    if not missing:
        return
    from lexp.store import require_free_space, store_nbytes

    shape = model_shape(ctx.model_dir)  # type: ignore[arg-type]
    if shape is None:
        return  # an unusual config: the per-store check still applies
    layers = shape[0] if layer_ids is None else len(layer_ids)
    total = 0
    for split, _ in missing:
        items = ctx.task.splits[split]
        rows = sum(len(s.words) for s in items) if ctx.task.kind == "labelling" else len(items)
        total += store_nbytes(rows, layers, shape[1], str(ctx.cfg.store.dtype))
    require_free_space(missing[0][1], total)


class _StoreFacts:
    """What build_stores records about a second model's stores, kept apart from results.json."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def update(self, values: Mapping[str, Any]) -> None:
        self.data.update(values)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def save(self) -> None:
        pass


def build_model_stores(
    ctx: RunContext, model_cfg: Mapping[str, Any], splits: list[str] | None = None
) -> RunContext:
    """The stores of another model over ctx's task (analysis=compare), built or reused by
    :func:`build_stores` itself — same fingerprints, extraction settings and limits as a run of that
    model would use — on a sibling context whose ``cfg.model`` is ``model_cfg``. ``splits``: only
    these (default: ``extract.splits``). Its ``report.data`` holds what build_stores recorded."""
    import copy
    from dataclasses import replace

    from omegaconf import open_dict

    cfg = copy.deepcopy(ctx.cfg)  # DictConfig.copy() would share extract with ctx.cfg
    with open_dict(cfg):
        cfg.model = OmegaConf.create(dict(model_cfg))
        if splits is not None:
            cfg.extract.splits = list(splits)
    other = replace(ctx, cfg=cfg, report=_StoreFacts(), stores={}, model_dir=None, model_info={}, oracle=None)
    build_stores(other)
    return other


def _load_encoder(ctx: RunContext, model_cfg: Mapping[str, Any]) -> Any:
    """The encoder (pretrained, or fine-tuned for sentence tasks) on the run's device."""
    from lexp.encoders.loading import load_encoder

    cfg = dict(model_cfg)
    cfg["name_or_path"] = str(ctx.model_dir)
    cfg["random_init"] = False  # ctx.model_dir holds the run's weights (random_init: already random)
    encoder = load_encoder(cfg, device=ctx.run_device())
    ctx.record_device("extract", encoder.info["dtype"])
    return encoder


def _prepare_extraction(
    ctx: RunContext, encoder: Any, split: str, layer_ids: list[int] | None = None
) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """The split's extraction stream (not started: tokenised and checked), its sentence offsets and
    batching facts. Building it runs every input check (too-long sentences, non-string words), so
    build_stores prepares all splits before the first one is extracted."""
    from lexp.encoders.extract import batch_plan, extract_cls, extract_words, state_bytes_per_token

    task = ctx.task
    cfg = ctx.cfg
    items = task.splits[split]
    device = next(encoder.model.parameters()).device
    max_tokens = cfg.extract.get("max_tokens", None)
    batch_size, max_tokens = batch_plan(
        device, int(cfg.extract.batch_size), max_tokens, state_bytes_per_token(encoder.model)
    )
    precision = str(cfg.extract.get("precision", "32"))  # YAML may give 32 as an int
    if task.kind == "labelling":
        lengths = np.fromiter((len(s.words) for s in items), dtype=np.int64, count=len(items))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        stream = extract_words(
            encoder.model,
            encoder.tokenizer,
            [s.words for s in items],
            batch_size=batch_size,
            max_tokens=max_tokens,
            precision=precision,
            rows_dtype=str(cfg.store.dtype),  # cast on the device: half the copy, no host cast
            subword=str(cfg.extract.subword),
            long_sentences=str(cfg.extract.long_sentences),
            progress=bool(cfg.progress),
            sources=[s.source for s in items],
            layers=layer_ids,
        )
    else:
        offsets = np.arange(len(items) + 1, dtype=np.int64)
        stream = extract_cls(
            encoder.model,
            encoder.tokenizer,
            [(e.text_a, e.text_b) for e in items],
            batch_size=batch_size,
            max_tokens=max_tokens,
            precision=precision,
            rows_dtype=str(cfg.store.dtype),  # cast on the device: half the copy, no host cast
            max_length=int(cfg.finetune.max_seq_length),
            progress=bool(cfg.progress),
            sources=[e.source for e in items],
            sentence=str((ctx.report.data.get("model_family") or {}).get("sentence") or "cls"),
            layers=layer_ids,
        )
    facts = {"device": device, "precision": precision, "batch_size": batch_size, "max_tokens": max_tokens}
    return stream, offsets, facts


def _write_store(
    ctx: RunContext,
    encoder: Any,
    split: str,
    target: Path,
    fp: str,
    settings: Mapping,
    prepared: tuple[Any, np.ndarray, dict[str, Any]] | None = None,
    layer_ids: list[int] | None = None,
) -> None:
    """Extract one split into a new store (written to a partial dir, then renamed by the writer)."""
    from lexp.encoders.writer import write_extraction
    from lexp.store import StoreWriter

    cfg = ctx.cfg
    n_layers, hidden = int(encoder.info["n_layers"]), int(encoder.info["hidden"])
    if layer_ids is not None:
        n_layers = len(layer_ids)
    manifest = {
        "fingerprint": fp,
        "settings": settings,
        "model": str(cfg.model.name),
        "model_dir": str(ctx.model_dir),
        "kind": settings["kind"],
        "split": split,
    }
    if layer_ids is not None:  # block j holds the model's layer layer_ids[j]
        manifest["layer_ids"] = list(layer_ids)
    stream, offsets, facts = (
        prepared if prepared is not None else _prepare_extraction(ctx, encoder, split, layer_ids)
    )
    device, precision = facts["device"], facts["precision"]
    batch_size, max_tokens = facts["batch_size"], facts["max_tokens"]
    with StoreWriter(
        target,
        n_rows=int(offsets[-1]),
        n_layers=n_layers,
        hidden=hidden,
        dtype=str(cfg.store.dtype),
        manifest=manifest,
    ) as writer:
        write_extraction(stream, writer, offsets)  # rows stored by a background thread
        counts = stream.stats.as_dict() | {
            "device": str(device),
            "model_dtype": str(encoder.info.get("dtype")),
            "precision": precision,
            "batch_size": batch_size,
            "max_tokens": max_tokens,
        }
        writer.finish(None, offsets, extra_manifest={"extraction": counts})  # labels: ensure_labels


# ------------------------------------------------------------------------------------------- oracle
def datamodule(
    ctx: RunContext, columns: np.ndarray | None = None, stores: Mapping[str, Any] | None = None
) -> Any:
    """The only way probes see data: a seeded stream over the stores (held on the run's device
    when ``probe.resident`` says so: by default on a GPU, when a split fits). ``stores``: other
    stores than the run's (analysis=layerdrop's dropped model), without the control task."""
    from lexp.datamodules import ActivationDataModule
    from lexp.probes import PROBE_DEFAULTS

    own = stores is None
    stores = ctx.stores if stores is None else stores
    return ActivationDataModule(
        stores["train"],
        stores.get("dev"),
        stores.get("test"),
        columns=columns,
        batch_size=int(ctx.cfg.probe.batch_size),
        seed=int(ctx.cfg.probe.seed),
        regression=ctx.regression,
        read_steps=int(ctx.cfg.probe.get("read_steps", PROBE_DEFAULTS["read_steps"])),
        resident=ctx.cfg.probe.get("resident", PROBE_DEFAULTS["resident"]),
        device=ctx.run_device(),
        extra_labels=ctx.control_labels if own else None,  # task.control: the control task as label vector 1
    )


def train_heads(
    ctx: RunContext, subsets: Mapping[str, np.ndarray] | None, columns: np.ndarray | None = None
) -> dict:
    """Train one probe per neuron subset in a single pass over the data (see MultiHeadProbe)."""
    from lexp.probes import train_probes

    ctx.record_device("probes", str(ctx.cfg.trainer.precision))
    with torch_threads(ctx.cfg.threads.probes):
        return train_probes(
            datamodule(ctx, columns),
            dict(subsets) if subsets is not None else None,
            probe_cfg=ctx.probe_cfg(),
            trainer_kwargs=ctx.trainer_kwargs(one_process=True),
            logger=ctx.tracker.lightning_logger(),
            control=ctx.control_labels is not None,  # a control-task head beside every head
        )


def train_subsets(ctx: RunContext, subsets: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Train one probe per subset of *store* columns, reading only their union from disk.

    Each result's ``weights`` columns follow the order of its subset, and ``columns`` holds the
    subset itself (store column indices).
    """
    from dataclasses import replace

    from lexp.probes import HeadSpec, as_spec

    specs = {name: as_spec(value) for name, value in subsets.items()}  # a HeadSpec: its seed/target
    union = np.unique(np.concatenate([np.asarray(s.columns, dtype=np.int64) for s in specs.values()]))
    local: dict[str, Any] = {}
    for name, spec in specs.items():
        cols = np.searchsorted(union, np.asarray(spec.columns, dtype=np.int64))
        local[name] = replace(spec, columns=cols) if isinstance(subsets[name], HeadSpec) else cols
    everything = len(union) == ctx.model_info["n_neurons"]
    results = train_heads(ctx, local, None if everything else union)
    for name, spec in specs.items():
        results[name]["columns"] = np.asarray(spec.columns, dtype=np.int64)
    return results


def score(result: Mapping[str, Any], split: str, metric: str) -> float:
    return float(result[split][metric])


def train_oracle(ctx: RunContext, extra: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The oracle (one ElasticNet probe on all neurons of all layers), plus any extra heads.

    Extra heads (e.g. one per layer) train in the same pass over the activations.
    """
    heads = {"oracle": np.arange(ctx.model_info["n_neurons"]), **(extra or {})}
    results = train_heads(ctx, heads)
    oracle = results["oracle"]
    ctx.oracle = oracle
    ctx.report["oracle"] = {"metric": ctx.metric, **public(oracle)}
    ctx.tracker.log_metrics(
        {
            f"oracle/{split}/{k}": v
            for split in ("dev", "test")
            if split in oracle
            for k, v in oracle[split].items()
        }
    )
    return results


def public(result: Mapping[str, Any]) -> dict[str, Any]:
    """A probe result without its weight arrays (those are too big for results.json)."""
    arrays = {"weights", "bias", "columns", "seed_weights", "seed_bias"}
    return {k: v for k, v in result.items() if k not in arrays}


def _flat_summary(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": data.get("task"),
        "model": data.get("model"),
        "analysis": data.get("analysis"),
    }
    oracle = data.get("oracle") or {}
    for split in ("dev", "test"):
        for key, value in (oracle.get(split) or {}).items():
            out[f"oracle/{split}/{key}"] = value
    for key in ("n_neurons", "n_layers"):
        out[key] = data.get(key)
    return out


def _unseen_text(unseen: Any) -> str:
    """``; not in train: dev 6 labels (19 tokens), test 5 labels (8 tokens)`` (labels and tokens
    named apart: a bare count next to the label count read as labels)."""
    if not isinstance(unseen, Mapping):
        return ""
    parts = [
        f"{split} {len(counts)} label{'s' if len(counts) != 1 else ''} ({sum(counts.values())} "
        f"token{'s' if sum(counts.values()) != 1 else ''})"
        for split, counts in unseen.items()
        if isinstance(counts, Mapping) and counts
    ]
    return (
        f"; not in train (scored as errors): {', '.join(parts)}"
        if parts
        else "; every dev/test label is in train"
    )


def _family_line(family: Mapping[str, Any]) -> str:
    """``llama, sentencepiece bpe tokenizer, sentence vector: last`` (the report's family line)."""
    text = f"{family.get('family')}, {family.get('tokenizer_kind')} tokenizer, words by word_ids"
    return text + (f", sentence vector: {family['sentence']}" if family.get("sentence") else "")


def print_summary(ctx: RunContext) -> None:
    """A short table on stdout; results.json has everything."""
    data = ctx.report.data
    metric = ctx.metric
    lines = [
        f"lexp {data['task']} · {data['model']} · analysis={data['analysis']}",
        f"  neurons        {data.get('n_neurons')} ({data.get('n_layers')} layers × {data.get('hidden')})",
        "  family         " + _family_line(data.get("model_family") or {}),
        "  rows           " + ", ".join(f"{s}={n}" for s, n in data.get("rows", {}).items()),
        f"  labels         {data.get('n_labels')} in train{_unseen_text(data.get('unseen_labels'))}",
    ]
    if ctx.oracle:
        lines.append(
            f"  oracle         {metric}: dev {ctx.oracle['dev'][metric]:.4f}   "
            f"test {ctx.oracle.get('test', {}).get(metric, float('nan')):.4f}"
        )
    for line in data.get("summary_lines", []):
        lines.append("  " + line)
    lines.append("  timings (s)    " + ", ".join(f"{k}={v:.1f}" for k, v in data["timings_s"].items()))
    lines.append(f"  results        {ctx.report.path}")
    print("\n".join(lines), flush=True)


def config_dir() -> Path:
    """The conf/ folder: packaged with the wheel, or at the top of a checkout / editable install."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def friendly_errors(exc: BaseException) -> str | None:
    """One clear message for errors whose fix is known (no wall of traceback)."""
    if isinstance(exc, (LexpInputError, LexpModelError)):
        return f"lexp: error: {exc}"
    from lexp.fs import disk_error_message

    disk = disk_error_message(exc)  # a full / read-only disk under any writer
    return f"lexp: error: {disk}" if disk is not None else None
