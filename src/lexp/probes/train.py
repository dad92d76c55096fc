"""The shell: :func:`train_probes` (Lightning's ``Trainer.fit`` + ``Trainer.test``, plain numbers and
numpy arrays out) and :func:`predict` (a trained head on new rows).

The Trainer runs on whatever accelerator ``trainer_kwargs`` names (``lexp.device.trainer_device_kwargs``
of the run's device); the probe and, with :class:`lexp.datamodules.ActivationDataModule`, the data
follow it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.model_helpers import is_overridden

from lexp.datamodules import parse_resident
from lexp.device import synchronize
from lexp.errors import LexpInputError
from lexp.probes.heads import CONTROL_TARGET, HeadSpec, Variants
from lexp.probes.loss import _check_columns
from lexp.probes.modules import ALL_COLUMNS, ElasticNetProbe, MultiHeadProbe, _ProbeModule

__all__ = ["PROBE_DEFAULTS", "predict", "train_probes"]

log = logging.getLogger("lexp.probes")

#: The paper's settings (Section 3.2); ``conf/probe/elasticnet.yaml`` holds the same values.
PROBE_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 128,
    "l1": 1e-5,
    "l2": 1e-5,
    "seed": 42,
    "init_seed": None,
    "select_on_dev": True,
    "regression": None,
    "read_steps": 16,
    "resident": None,  # auto: on a GPU when a split fits (lexp.datamodules.parse_resident)
    "seeds": None,  # init seeds trained as extra heads of the one pass (lexp.probes.heads.Variants)
}
_CONFIG_KEYS = {*PROBE_DEFAULTS, "name"}


# ----------------------------------------------------------------------------------- the shell
def _settings(probe_cfg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(probe_cfg) - _CONFIG_KEYS
    if unknown:
        raise LexpInputError(
            f"probe config: unknown key(s) {sorted(unknown)}; known keys are {sorted(_CONFIG_KEYS)} "
            "(see conf/probe/elasticnet.yaml)"
        )
    cfg = {**PROBE_DEFAULTS, **dict(probe_cfg)}
    for key in ("epochs", "seed"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, np.integer)):
            raise LexpInputError(f"probe config: {key} = {cfg[key]!r} must be an integer")
    if cfg["epochs"] < 1:
        raise LexpInputError(f"probe config: epochs = {cfg['epochs']} must be at least 1")
    for key in ("lr", "l1", "l2"):
        value = cfg[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not np.isfinite(value)
            or value < 0
        ):
            raise LexpInputError(f"probe config: {key} = {value!r} must be a finite number >= 0")
    # the datamodule's setting (it holds the data); checked here too, so a bad value fails early
    cfg["resident"] = parse_resident(cfg["resident"], "probe config: resident")
    if cfg["init_seed"] is None:
        cfg["init_seed"] = cfg["seed"]
    seeds = cfg["seeds"]
    if seeds is not None:
        if (
            isinstance(seeds, (str, bytes))
            or not isinstance(seeds, Sequence)
            or not seeds
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds)
        ):
            raise LexpInputError(
                f"probe config: seeds = {seeds!r} must be null or a non-empty list of integers, e.g. [1,2,3,4,5]"
            )
        cfg["seeds"] = tuple(int(s) for s in seeds)
    return cfg


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's per-Trainer banners (GPU/TPU availability, tips): a minimal-set search
    builds dozens of Trainers. Warnings still show."""
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            # In-memory batches need no worker processes; Lightning's hint does not apply.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # The train loss is logged once per epoch, so a short epoch loses nothing to this.
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _restore_determinism() -> Iterator[None]:
    """``Trainer(deterministic=True)`` switches torch's global flag on; switch it back afterwards so
    that code running later in the same process (a notebook, other stages) is unaffected."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


#: Trainer options that only fine-tuning uses, with Lightning's defaults.
_FINETUNE_ONLY: dict[str, Any] = {
    "accumulate_grad_batches": 1,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
}


#: The precisions a probe trains in; any other trainer.precision (a fine-tuning setting) means 32-true.
_PROBE_PRECISIONS = ("32", "32-true", "bf16-mixed")


def _trainer(epochs: int, trainer_kwargs: Mapping[str, Any] | None, logger: Any) -> pl.Trainer:
    kwargs = dict(trainer_kwargs or {})
    if "max_epochs" in kwargs:
        raise LexpInputError(
            "trainer_kwargs: max_epochs is set by the probe config; use probe.epochs instead"
        )
    # Fine-tuning settings of the shared trainer config: a probe takes one Adam step per
    # probe.batch_size rows, unclipped (the paper's probe), and its optimisation is manual, which
    # Lightning refuses to combine with these.
    for key, default in _FINETUNE_ONLY.items():
        value = kwargs.pop(key, default)
        if value != default:
            log.info(
                "probes ignore trainer.%s=%s (a fine-tuning setting): a probe step is probe.batch_size rows",
                key,
                value,
            )
    # The probes' gradients are written by hand (FusedHeads) into float32 weights: under 16-mixed
    # Lightning's GradScaler would unscale gradients it never scaled, and the *-true precisions turn
    # the weights into bf16/fp16/fp64 that the float32 products cannot meet. bf16-mixed (bfloat16
    # products, float32 weights and sums) is the probes' one mixed precision.
    precision = str(kwargs.get("precision", "32-true"))
    if precision not in _PROBE_PRECISIONS:
        log.info(
            "probes run in 32-true: trainer.precision=%s is for fine-tuning (the probes' mixed "
            "precision is bf16-mixed)",
            precision,
        )
        kwargs["precision"] = "32-true"
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # Redrawing on every one of ~1,200 steps per epoch would cost more than the steps.
        callbacks.append(TQDMProgressBar(refresh_rate=25))
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 50,
        **kwargs,
        "logger": logger or False,
        "max_epochs": int(epochs),
        "callbacks": callbacks,
    }
    return pl.Trainer(**settings)


def _has_split(datamodule: pl.LightningDataModule, split: str) -> bool:
    """Whether the datamodule can serve ``split`` ("dev" or "test")."""
    stores = getattr(datamodule, "stores", None)  # ActivationDataModule: one store per split given
    if isinstance(stores, Mapping):
        return split in stores
    return is_overridden("val_dataloader" if split == "dev" else "test_dataloader", datamodule)


def train_probes(
    datamodule: pl.LightningDataModule,
    subsets: Mapping[str, np.ndarray | HeadSpec] | None,
    *,
    probe_cfg: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any] | None = None,
    logger: Any = None,
    reference: bool = False,
    control: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train one probe per subset (all in one pass) and evaluate the selected epoch on dev and test.

    ``subsets`` maps a head name to column indices into the datamodule's batches; ``None`` trains a
    single probe on all columns, returned under the name ``"all"``. Probes train as heads of a
    :class:`MultiHeadProbe`; ``reference=True`` (``subsets=None`` only) trains the plain autograd
    :class:`ElasticNetProbe` instead — the slow, obviously correct version the fused one is tested
    against.
    ``probe_cfg`` holds the keys of ``conf/probe/elasticnet.yaml`` (``batch_size``, ``seed``,
    ``read_steps`` and ``resident`` are the datamodule's business: it was built with them; they are
    only checked here). ``regression: null`` reads ``datamodule.regression``.

    Returns, per head: ``dev`` and ``test`` metric dicts (``accuracy``, ``macro_f1``; or ``pearson``,
    ``spearman``, ``mse``), ``best_epoch`` (1-based), ``dev_history`` (dev score per epoch),
    ``weights`` (K × C float32) and ``bias`` (K,) of the selected epoch, ``columns`` (C,),
    ``train_seconds`` (wall time of the shared training pass, dev evaluation included) and
    ``heads_in_pass``.

    Variants as extra heads of the same pass (:class:`lexp.probes.heads.Variants`): ``probe_cfg``
    ``seeds`` (a list of init seeds; the batch order stays ``seed``'s) trains every subset once per
    seed, and ``control=True`` trains each also against the datamodule's label vector 1, the
    control task (``ActivationDataModule(extra_labels=...)``). The result per subset is then the
    first seed's, with ``dev``/``test`` the mean over seeds and ``<metric>_std`` beside each, and
    ``per_seed``, ``seed_weights``, ``seed_bias``, ``control`` and ``selectivity`` (see
    :meth:`Variants.collect`). A subset given as a :class:`HeadSpec` with a ``seed`` is trained
    under that seed only.
    """
    cfg = _settings(probe_cfg)
    regression = cfg["regression"]
    if regression is None:
        regression = bool(getattr(datamodule, "regression", False))
    n_features = int(datamodule.n_features)
    n_classes = int(datamodule.n_classes) if not regression else 0
    common = {
        "l1": cfg["l1"],
        "l2": cfg["l2"],
        "lr": cfg["lr"],
        "seed": int(cfg["init_seed"]),
        "regression": bool(regression),
        "select_on_dev": bool(cfg["select_on_dev"]),
        # rows per optimiser step: the datamodule's minibatch (its training batches may hold several)
        "batch_size": getattr(datamodule, "batch_size", None),
    }
    if cfg["select_on_dev"] and not _has_split(datamodule, "dev"):
        raise LexpInputError(
            f"probe.select_on_dev=true, but {type(datamodule).__name__} has no dev split; "
            "give it a dev split or set probe.select_on_dev=false"
        )
    if reference and subsets is not None:
        raise LexpInputError("train_probes: reference=True trains one ElasticNetProbe; pass subsets=None")
    n_targets = int(getattr(datamodule, "n_targets", 1))
    variants = Variants(cfg["seeds"] or (), bool(control))
    if control and n_targets <= CONTROL_TARGET:
        raise LexpInputError(
            "train_probes: control=True, but the datamodule has no control labels; build it with "
            "ActivationDataModule(extra_labels={split: control labels}) (lexp: task.control=true)"
        )
    if reference and (variants.active or n_targets > 1):
        raise LexpInputError(
            "train_probes: reference=True trains one ElasticNetProbe on one label vector and one seed; "
            "drop probe.seeds / control (the fused heads are tested equal to it)"
        )
    columns = {ALL_COLUMNS: np.arange(n_features)} if subsets is None else dict(subsets)
    heads = (
        variants.expand(columns)
        if variants.active or any(isinstance(v, HeadSpec) for v in columns.values())
        else columns
    )
    if reference:
        module: _ProbeModule = ElasticNetProbe(n_features, n_classes, **common)
    else:
        module = MultiHeadProbe(heads, n_features, n_classes, n_targets=n_targets, **common)

    with _quiet_lightning(), _restore_determinism():
        trainer = _trainer(cfg["epochs"], trainer_kwargs, logger)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        synchronize(module.device)  # CUDA runs asynchronously: the clock waits for its queue
        train_seconds = time.perf_counter() - start
        if _has_split(datamodule, "test"):
            trainer.test(module, datamodule=datamodule, verbose=False)

    results = module.head_results()
    for result in results.values():
        result["train_seconds"] = train_seconds
        result["heads_in_pass"] = len(module.head_names)
    if heads is columns or reference:
        return results
    return variants.collect(results, columns)


def predict(
    weights: np.ndarray,
    bias: np.ndarray,
    x: np.ndarray,
    *,
    columns: np.ndarray | None = None,
    chunk_rows: int = 8192,
) -> np.ndarray:
    """Predictions of a trained head on rows ``x``: class ids (int64), or values for regression.

    ``weights`` (K, C) and ``bias`` (K,) as returned by :func:`train_probes`; ``x`` has C columns, or
    give ``columns`` to pick them from a wider matrix (e.g. a memory-mapped store). Rows are read in
    chunks of ``chunk_rows`` and computed in float32 (never a float64 copy of ``x``).
    """
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
    b = torch.as_tensor(np.asarray(bias, dtype=np.float32))
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise LexpInputError(
            f"predict: weights must be (K, C) and bias (K,), got {tuple(w.shape)} and {tuple(b.shape)}; "
            "pass a head's 'weights' and 'bias' from train_probes"
        )
    if x.ndim != 2 or (columns is None and x.shape[1] != w.shape[1]):
        raise LexpInputError(
            f"predict: x has shape {x.shape}, the probe expects {w.shape[1]} columns; "
            "pass the head's 'columns' to select them from a wider matrix"
        )
    if columns is not None:
        columns = _check_columns("predict", columns, x.shape[1])
        if columns.size != w.shape[1]:
            raise LexpInputError(
                f"predict: {columns.size} columns given for a probe with {w.shape[1]} inputs; "
                "pass the head's own 'columns'"
            )
    regression = w.shape[0] == 1
    out = np.empty(x.shape[0], dtype=np.float32 if regression else np.int64)
    take: Callable[[np.ndarray], np.ndarray] = (lambda a: a) if columns is None else (lambda a: a[:, columns])
    with torch.inference_mode():
        for start in range(0, x.shape[0], chunk_rows):
            chunk = torch.from_numpy(
                np.ascontiguousarray(take(x[start : start + chunk_rows]), dtype=np.float32)
            )
            logits = F.linear(chunk, w, b)
            out[start : start + chunk.shape[0]] = (
                logits[:, 0] if regression else logits.argmax(dim=1)
            ).numpy()
    return out
