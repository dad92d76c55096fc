"""Fine-tune an encoder on a sentence(-pair) task, so that its [CLS] vector represents the sentence.

The paper (§3.1) analyses sentence tasks through the [CLS] representation *of a model fine-tuned on
the task*, trained with the defaults of transformers' ``run_glue.py`` (§3.2): AdamW, lr 5e-5,
3 epochs, batch 8, max_seq_length 128, linear decay without warm-up, no weight decay, gradient
clipping at 1.0, seed 42 (``conf/finetune/default.yaml``).

:func:`finetune` trains a :class:`FineTuner` on the task's ``train`` split, evaluates it on ``dev``
and ``test`` and writes the fine-tuned model and tokenizer (``save_pretrained``, safetensors) to
``<cache_root>/finetuned/<model-slug>/<task>-<fp12>/``; ``AutoModel.from_pretrained`` of that folder
gives the fine-tuned encoder without its head, which is what the [CLS] extraction needs. The
fingerprint covers the base model's files, the task's data files and split notes, and every
hyper-parameter that changes the weights, so a second run (or every analysis of a sweep) reuses
the folder at once. The folder is written under ``<dir>.partial/`` and renamed into place when
complete; Lightning checkpoints live in ``<dir>.partial/checkpoints/`` so that an interrupted run
resumes from its last epoch.

Nothing here is device-specific: GPUs and DDP are Trainer settings
(``trainer.accelerator=gpu trainer.devices=2 trainer.strategy=ddp``).

DDP inside ``python -m lexp.run``: Lightning's ``ddp`` starts its other ranks by re-executing the
command line, which under Hydra reruns the whole job (extraction, probes, results.json) in every
rank, and in a multirun the whole sweep. :func:`spawn_strategy` therefore turns ``ddp`` into
``ddp_spawn`` for lexp runs (``lexp.analyses.sentence``): the ranks are started with
``torch.multiprocessing`` and run only ``trainer.fit``; the job's own process gets the trained
weights back and alone saves them, evaluates dev/test (on one device, every example once: a
DistributedSampler would pad), extracts the [CLS] store and trains the probes. Same weights, same
fingerprint (devices count, the launch method does not). Scripts that call :func:`finetune`
themselves can keep ``ddp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import Metric
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lexp.device import synchronize
from lexp.encoders.loading import load_pretrained, model_digest
from lexp.errors import LexpInputError, LexpModelError
from lexp.locks import entry_lock
from lexp.tasks.base import Example, TaskData

log = logging.getLogger(__name__)

SEQUENCE_HEADS = (
    "classifier.",
    "pre_classifier.",
    "score.",
    "sequence_summary.",
    "logits_proj.",
    "pooler.",  # DeBERTa's ContextPooler, BERT's pooler where a checkpoint lacks it
    "head.",  # ModernBERT's prediction head before its classifier
    "classification_head.",  # T5ForSequenceClassification
)
"""Parameter prefixes of the classification heads AutoModelForSequenceClassification adds (BERT,
DistilBERT, XLNet, DeBERTa, ModernBERT, T5, ...): new and randomly initialised before fine-tuning,
so not worth a warning."""

CONFIG_FILE = "conf/finetune/default.yaml"
CLASSIFICATION_METRICS = ("accuracy", "f1")
REGRESSION_METRICS = ("pearson", "spearman")
#: GLUE reports F1 next to accuracy for the paraphrase tasks.
F1_TASKS = frozenset({"mrpc", "qqp"})
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FineTuneConfig:
    """The ``finetune`` config group, validated. Defaults = transformers' run_glue.py (the paper)."""

    learning_rate: float = 5e-5
    epochs: int = 3
    batch_size: int = 8  # per device
    max_seq_length: int = 128
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    metrics: tuple[str, ...] | None = None  # None: default_metrics(task)
    positive_label: str = "1"  # the class whose F1 is reported
    eval_batch_size: int = 32
    num_workers: int = 0
    resume: bool = True
    keep_checkpoints: bool = False
    checkpoint_every_n_steps: int | None = None

    #: Settings that change the fine-tuned weights; the rest (evaluation, I/O) do not.
    WEIGHT_SETTINGS = (
        "learning_rate",
        "epochs",
        "batch_size",
        "max_seq_length",
        "weight_decay",
        "adam_epsilon",
        "adam_betas",
        "warmup_steps",
        "max_grad_norm",
        "seed",
    )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> FineTuneConfig:
        """Validate a plain mapping (e.g. ``OmegaConf.to_container(cfg.finetune)``)."""
        cfg = dict(cfg or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - set(fields))
        if unknown:
            raise LexpInputError(
                f"{CONFIG_FILE}: unknown fine-tuning setting(s) {unknown}; valid keys are {sorted(fields)}"
            )
        values: dict[str, Any] = {}
        for key, raw in cfg.items():
            default = fields[key].default
            try:
                values[key] = _coerce(key, raw, default)
            except (TypeError, ValueError) as err:
                raise LexpInputError(f"{CONFIG_FILE}: finetune.{key}={raw!r} is invalid: {err}") from None
        config = cls(**values)
        config._check()
        return config

    def _check(self) -> None:
        positive = {
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_seq_length": self.max_seq_length,
            "eval_batch_size": self.eval_batch_size,
        }
        for key, value in positive.items():
            if not value > 0:
                raise LexpInputError(f"{CONFIG_FILE}: finetune.{key} must be > 0, got {value}")
        for key in ("weight_decay", "warmup_steps", "num_workers"):
            if getattr(self, key) < 0:
                raise LexpInputError(f"{CONFIG_FILE}: finetune.{key} must be >= 0, got {getattr(self, key)}")
        if self.max_seq_length < 4:
            raise LexpInputError(
                f"{CONFIG_FILE}: finetune.max_seq_length={self.max_seq_length} leaves no room for text"
            )
        known = CLASSIFICATION_METRICS + REGRESSION_METRICS
        for name in self.metrics or ():
            if name not in known:
                raise LexpInputError(
                    f"{CONFIG_FILE}: finetune.metrics has unknown metric {name!r}; use any of {known}"
                )

    def weight_settings(self) -> dict[str, Any]:
        """The JSON-able settings that the fine-tuned weights depend on (fingerprinted)."""
        return {key: _jsonable(getattr(self, key)) for key in self.WEIGHT_SETTINGS}


def _coerce(key: str, raw: Any, default: Any) -> Any:
    if key == "adam_betas":
        betas = tuple(float(b) for b in raw)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("expected two numbers in [0, 1)")
        return betas
    if key == "metrics":
        if raw is None:
            return None
        if isinstance(raw, str):
            raise TypeError("expected a list of metric names, e.g. [accuracy, f1]")
        return tuple(str(m) for m in raw)
    if raw is None:
        if key in ("max_grad_norm", "checkpoint_every_n_steps"):
            return None
        raise TypeError("null is not allowed here")
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise TypeError("expected true or false")
        return raw
    if isinstance(default, int) or key == "checkpoint_every_n_steps":
        if isinstance(raw, bool) or float(raw) != int(raw):
            raise TypeError("expected an integer")
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return str(raw)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def default_metrics(task_name: str, kind: str) -> list[str]:
    """GLUE's metrics: accuracy (+ F1 for MRPC and QQP); Pearson and Spearman for STS-B."""
    if kind == "regression":
        return list(REGRESSION_METRICS)
    return ["accuracy", "f1"] if task_name.lower() in F1_TASKS else ["accuracy"]


# ------------------------------------------------------------------------------------- tokenising
def load_tokenizer(
    name_or_path: str | Path, model: torch.nn.Module | None = None, *, revision: str | None = None
) -> Any:
    """The model's tokenizer, set to return segment ids whenever the model takes them.

    transformers 5's XLNet tokenizer omits ``token_type_ids`` by default, but XLNet uses segments
    for sentence pairs and run_glue.py (the paper) passed them. Setting ``model_input_names`` is
    saved with the tokenizer, so the [CLS] extraction from the fine-tuned folder sees exactly the
    inputs the model was fine-tuned on.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), revision=revision, trust_remote_code=False
        )
    except (OSError, ValueError) as err:
        raise LexpModelError(
            f"cannot load a tokenizer from {name_or_path}: {err}. Point model.name_or_path at a folder "
            "with tokenizer files (tokenizer.json, vocab.txt or spiece.model)"
        ) from err
    from lexp.encoders.families import ensure_pad_token, require_fast

    require_fast(tokenizer, str(name_or_path))
    # Decoders (GPT-2, Llama, Mistral) ship no pad token: pad with their EOS, as transformers
    # documents; the sequence-classification head then finds each row's last non-pad token.
    ensure_pad_token(tokenizer, model)
    if model is not None and "token_type_ids" not in tokenizer.model_input_names:
        from lexp.encoders.families import takes_segments

        if takes_segments(model):  # not GPT-2: it would look segment ids up as words
            tokenizer.model_input_names = [*tokenizer.model_input_names, "token_type_ids"]
            tokenizer.init_kwargs["model_input_names"] = list(tokenizer.model_input_names)  # saved
    return tokenizer


@dataclass
class EncodedSplit(Dataset):
    """Token ids of one split, flat (no Python list per example), with one target per example."""

    input_ids: np.ndarray  # int32, all examples concatenated
    token_type_ids: np.ndarray | None  # int8, same layout, or None when the model takes no segments
    offsets: np.ndarray  # int64, len = n + 1
    targets: np.ndarray  # int64 class ids or float32 scores
    n_truncated: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None, Any]:
        start, end = self.offsets[i], self.offsets[i + 1]
        types = None if self.token_type_ids is None else self.token_type_ids[start:end]
        return self.input_ids[start:end], types, self.targets[i]


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    targets: np.ndarray,
    *,
    max_length: int,
) -> EncodedSplit:
    """Tokenise sentences or sentence pairs as the model expects them (pairs as pairs).

    Pairs longer than ``max_length`` are truncated longest-first, as in run_glue.py; the number of
    truncated examples is returned (and reported), never hidden.
    """
    if len(examples) != len(targets):
        raise LexpInputError(
            f"{len(examples)} examples but {len(targets)} labels; encode_labels() of the same split"
        )
    if not examples:
        return EncodedSplit(np.zeros(0, np.int32), None, np.zeros(1, np.int64), targets, 0)
    pairs = _pair_task(examples)
    with_types = "token_type_ids" in tokenizer.model_input_names
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples] if pairs else None
    enc = tokenizer(
        texts_a,
        texts_b,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=with_types,
    )
    ids = enc["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    # Only sequences that fill max_length can have been cut: re-tokenise those in full to count.
    full = np.flatnonzero(lengths == max_length)
    n_truncated = 0
    if len(full):
        check = tokenizer(
            [texts_a[i] for i in full],
            [texts_b[i] for i in full] if texts_b is not None else None,
            truncation=False,
            return_attention_mask=False,
            verbose=False,
        )
        n_truncated = sum(len(x) > max_length for x in check["input_ids"])
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    flat_types = None
    if with_types:
        types = enc["token_type_ids"]
        flat_types = np.fromiter((t for x in types for t in x), dtype=np.int8, count=int(offsets[-1]))
    return EncodedSplit(flat_ids, flat_types, offsets, targets, int(n_truncated))


def _pair_task(examples: Sequence[Example]) -> bool:
    """True for sentence-pair tasks; a split mixing single sentences and pairs is an input error."""
    pairs = examples[0].text_b is not None
    for example in examples:
        if (example.text_b is not None) != pairs:
            kind = "a sentence pair" if pairs else "a single sentence"
            raise LexpInputError(
                f"{example.source}: expected {kind} like the first example ({examples[0].source}); "
                "every row of a task must have the same number of text columns — fix the row or the "
                "task's column settings"
            )
    return pairs


class PadCollator:
    """Pads a batch to its longest example on the tokenizer's padding side (XLNet pads left)."""

    def __init__(self, pad_token_id: int, pad_token_type_id: int = 0, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.pad_token_type_id = int(pad_token_type_id)
        self.left = padding_side == "left"

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> PadCollator:
        return cls(tokenizer.pad_token_id, getattr(tokenizer, "pad_token_type_id", 0), tokenizer.padding_side)

    def __call__(self, items: Sequence[tuple[np.ndarray, np.ndarray | None, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _, _ in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        with_types = items[0][1] is not None
        token_type_ids = (
            torch.full((n, width), self.pad_token_type_id, dtype=torch.long) if with_types else None
        )
        for row, (ids, types, _) in enumerate(items):
            span = slice(width - len(ids), width) if self.left else slice(0, len(ids))
            input_ids[row, span] = torch.from_numpy(ids.astype(np.int64))
            attention_mask[row, span] = 1
            if token_type_ids is not None:
                token_type_ids[row, span] = torch.from_numpy(types.astype(np.int64))
        targets = np.asarray([t for _, _, t in items])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.from_numpy(targets),
        }
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return batch


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run sees the same batches.

    Lightning calls :meth:`set_epoch` before every training epoch.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class GlueDataModule(pl.LightningDataModule):
    """Tokenised train/dev/test splits of a sentence(-pair) task; seeded shuffling of train only.

    Evaluation batches are length-sorted (less padding); metrics do not depend on the order.
    """

    def __init__(
        self,
        tokenizer: Any,
        examples: Mapping[str, Sequence[Example]],
        targets: Mapping[str, np.ndarray],
        *,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        max_seq_length: int = 128,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        missing = sorted(set(examples) ^ set(targets))
        if missing:
            raise LexpInputError(f"splits {missing} have examples or labels but not both")
        self.tokenizer = tokenizer
        self.examples = dict(examples)
        self.targets = dict(targets)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.num_workers = num_workers
        self.collate = PadCollator.for_tokenizer(tokenizer)
        self.splits: dict[str, EncodedSplit] = {}

    @classmethod
    def from_task(cls, task: TaskData, tokenizer: Any, **kwargs: Any) -> GlueDataModule:
        splits = [s for s in ("train", "dev", "test") if s in task.splits]
        return cls(
            tokenizer,
            {s: task.splits[s] for s in splits},
            {s: task.encode_labels(s)[0] for s in splits},
            **kwargs,
        )

    def setup(self, stage: str | None = None) -> None:
        for split, examples in self.examples.items():
            if split not in self.splits:
                self.splits[split] = encode_examples(
                    self.tokenizer, examples, self.targets[split], max_length=self.max_seq_length
                )

    @property
    def truncated(self) -> dict[str, int]:
        """Examples cut to max_seq_length, per split (after :meth:`setup`)."""
        return {split: enc.n_truncated for split, enc in self.splits.items()}

    def train_dataloader(self) -> DataLoader:
        train = self._split("train")
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(train), self.seed),
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("dev")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        data = self._split(split)
        order = np.argsort(-data.lengths(), kind="stable").tolist()
        return DataLoader(
            data,
            batch_size=self.eval_batch_size,
            sampler=order,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def _split(self, split: str) -> EncodedSplit:
        if not self.splits:
            self.setup()
        if split not in self.splits:
            raise LexpInputError(f"the task has no {split!r} split (it has {sorted(self.splits)})")
        return self.splits[split]


# ----------------------------------------------------------------------------------------- module
class LinearDecay:
    """transformers' linear schedule: warm up for ``warmup_steps``, then decay linearly to 0.

    A callable object (not a lambda), so LambdaLR stores its two ints in the checkpoint and a resumed
    run continues the same schedule.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


class FineTuner(pl.LightningModule):
    """An encoder with a sequence-classification head (one output and MSE for regression).

    Hyper-parameters are plain str/int/float/bool/lists, so Lightning checkpoints load under
    ``torch.load(weights_only=True)``. The model is built from ``name_or_path`` (a local folder or a
    model id; never remote code), then the checkpoint's weights replace it.
    """

    def __init__(
        self,
        name_or_path: str,
        kind: str = "classification",
        labels: list[str] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        adam_epsilon: float = 1e-8,
        adam_betas: list[float] | None = None,
        warmup_steps: int = 0,
        metrics: list[str] | None = None,
        positive_label: str = "1",
        revision: str | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("classification", "regression"):
            raise LexpInputError(
                f"fine-tuning needs a classification or regression task, got kind={kind!r}; "
                "sequence-labelling tasks use the pretrained encoder directly"
            )
        labels = [str(label) for label in labels or []]
        if kind == "classification" and len(labels) < 2:
            raise LexpInputError(
                f"classification needs at least two labels in train, got {labels}; check the task's label column"
            )
        metrics = [str(m) for m in (metrics or default_metrics("", kind))]
        allowed = REGRESSION_METRICS if kind == "regression" else CLASSIFICATION_METRICS
        wrong = [m for m in metrics if m not in allowed]
        if wrong:
            raise LexpInputError(
                f"{CONFIG_FILE}: metrics {wrong} do not apply to {kind}; use any of {allowed}"
            )
        if "f1" in metrics and str(positive_label) not in labels:
            raise LexpInputError(
                f"{CONFIG_FILE}: F1 needs the positive class finetune.positive_label={positive_label!r}, "
                f"which is not among the train labels {labels}; set it to one of them"
            )
        self.save_hyperparameters(
            {
                "name_or_path": str(name_or_path),
                "kind": kind,
                "labels": labels,
                "learning_rate": float(learning_rate),
                "weight_decay": float(weight_decay),
                "adam_epsilon": float(adam_epsilon),
                "adam_betas": [float(b) for b in (adam_betas or (0.9, 0.999))],
                "warmup_steps": int(warmup_steps),
                "metrics": metrics,
                "positive_label": str(positive_label),
                "revision": None if revision is None else str(revision),
            }
        )
        self.regression = kind == "regression"
        self.num_labels = 1 if self.regression else len(labels)
        self.model = self._build_model()
        self.eval_metrics = torch.nn.ModuleDict({split: self._metrics() for split in ("dev", "test")})

    def _build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        hp = self.hparams
        label_kwargs: dict[str, Any] = {}
        if not self.regression:
            label_kwargs = {
                "id2label": dict(enumerate(hp.labels)),
                "label2id": {label: i for i, label in enumerate(hp.labels)},
            }
        try:
            model = load_pretrained(
                AutoModelForSequenceClassification,
                hp.name_or_path,
                new_head=SEQUENCE_HEADS,
                revision=hp.revision,
                num_labels=self.num_labels,
                problem_type="regression" if self.regression else "single_label_classification",
                dtype=torch.float32,
                trust_remote_code=False,
                **label_kwargs,
            )
        except (OSError, ValueError, KeyError) as err:
            raise LexpModelError(
                f"cannot build a sequence-classification model from {hp.name_or_path}: {err}. "
                "Point model.name_or_path at a local Hugging Face model folder (config.json + weights)"
            ) from err
        if getattr(model.config, "model_type", "") == "xlnet":
            # Evaluation forwards would otherwise return every layer's states as "mems" (memory only).
            model.config.use_mems_eval = False
        # transformers 5 returns models in eval mode; fine-tuning trains with dropout (Lightning keeps
        # the mode it finds and switches to eval only for validation).
        return model.train()

    def _metrics(self) -> torch.nn.ModuleDict:
        made: dict[str, Metric] = {}
        for name in self.hparams.metrics:
            if name == "accuracy":
                # One extra class stands for every dev/test label unseen in train: never predicted,
                # so such examples count as errors instead of crashing or being dropped.
                made[name] = MulticlassAccuracy(num_classes=self.num_labels + 1, average="micro")
            elif name == "f1":
                made[name] = BinaryF1Score()
            elif name == "pearson":
                made[name] = PearsonCorrCoef()
            elif name == "spearman":
                with warnings.catch_warnings():  # "saves all predictions": fine at dev/test sizes
                    warnings.simplefilter("ignore", UserWarning)
                    made[name] = SpearmanCorrCoef()
        return torch.nn.ModuleDict(made)

    @property
    def positive_id(self) -> int:
        return self.hparams.labels.index(self.hparams.positive_label)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (n, num_labels), or scores (n,) for regression."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self.model(**inputs).logits
        return logits.squeeze(-1) if self.regression else logits

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return F.mse_loss(output, target.to(output.dtype))
        known = target < self.num_labels  # labels unseen in train have no logit
        if not bool(known.any()):
            return output.sum() * 0.0
        return F.cross_entropy(output[known], target[known])

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("dev", batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, split: str, batch: Mapping[str, torch.Tensor]) -> None:
        target = batch["labels"]
        output = self(batch)
        n = len(target)
        self.log(f"{split}/loss", self._loss(output, target), batch_size=n, sync_dist=True)
        metrics = self.eval_metrics[split]
        if self.regression:
            scores, target = output.float(), target.float()
            for metric in metrics.values():
                metric.update(scores, target)
        else:
            preds = output.argmax(-1)
            for name, metric in metrics.items():
                if name == "accuracy":
                    metric.update(preds, target.clamp(max=self.num_labels))
                else:  # f1 of the positive class
                    metric.update((preds == self.positive_id).long(), (target == self.positive_id).long())
        for name, metric in metrics.items():
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # As in transformers: no weight decay on biases and LayerNorm weights (all 1-d parameters).
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        options = {"lr": hp.learning_rate, "betas": tuple(hp.adam_betas), "eps": hp.adam_epsilon}
        # The fused kernel makes the step ~6x faster on CPU (MiniLM, batch 8: 0.26 s -> 0.045 s), but
        # Lightning's mixed-precision plugin refuses to clip gradients for a fused optimizer.
        fused = "mixed" not in str(self.trainer.precision)
        try:
            optimizer = torch.optim.AdamW(groups, fused=fused, **options)
        except RuntimeError:  # parameters on a device without a fused kernel
            optimizer = torch.optim.AdamW(groups, **options)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(hp.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --------------------------------------------------------------------------------- cached finetune
class _Throughput(Callback):
    """Training examples per second of compute (forward, backward, optimiser step), per device."""

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        synchronize(module.device)  # CUDA runs asynchronously: time the batch's kernels, not their launch
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, out: Any, batch: Any, idx: int
    ) -> None:
        synchronize(module.device)
        self.seconds += time.perf_counter() - self._start
        self.examples += len(batch["labels"])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Under ddp_spawn the ranks are other processes: the callback_metrics are what Lightning
        # hands back to the launching process, so the counts travel there.
        for key, value in self.counts(trainer).items():
            trainer.callback_metrics[f"lexp_fit/{key}"] = torch.tensor(float(value), dtype=torch.float64)

    def counts(self, trainer: pl.Trainer) -> dict[str, float]:
        return {
            "examples": self.examples,
            "seconds": self.seconds,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
        }


SPAWN_STRATEGIES = {
    "ddp": "ddp_spawn",
    "ddp_find_unused_parameters_true": "ddp_spawn_find_unused_parameters_true",
    "ddp_find_unused_parameters_false": "ddp_spawn_find_unused_parameters_false",
}


def spawn_strategy(trainer_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``trainer.strategy=ddp`` (and its find_unused_parameters forms) as ``ddp_spawn``, for a
    Trainer inside a Hydra job; returns (kwargs, a note for the log, or None when unchanged).

    The ranks are this job's own processes, also inside a SLURM job (one task, submitit): Lightning
    would otherwise take SLURM's variables to mean that srun started the ranks, and wait for them.
    """
    kwargs = dict(trainer_kwargs)
    strategy = kwargs.get("strategy")
    if isinstance(strategy, str) and strategy in SPAWN_STRATEGIES:
        from lightning_fabric.plugins.environments import LightningEnvironment

        kwargs["strategy"] = SPAWN_STRATEGIES[strategy]
        plugins = kwargs.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), LightningEnvironment()]
        return kwargs, (
            f"trainer.strategy={strategy} runs as {kwargs['strategy']} for fine-tuning: the ranks run "
            "only trainer.fit (Lightning's ddp would re-execute the whole lexp command in every rank)"
        )
    return kwargs, None


@contextlib.contextmanager
def _startable_method() -> Iterator[None]:
    """A process start method that a fresh interpreter knows, while DDP ranks are spawned.

    A joblib (loky) worker's default method is ``loky``, which a spawned rank cannot set up
    (``cannot find context for 'loky'``) and whose failure leaves rank 0 waiting for it; so
    ``spawn`` is the default for the duration of the fit, then the worker's own comes back.
    """
    import multiprocessing as mp

    current = mp.get_start_method(allow_none=True)
    if current in (None, "spawn", "fork", "forkserver"):
        yield
        return
    mp.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        mp.set_start_method(current, force=True)


def _spawned(trainer: pl.Trainer) -> bool:
    """Whether fit ran in other processes (ddp_spawn, ddp_fork), this one only launching them."""
    return trainer.world_size > 1 and getattr(trainer.strategy, "_start_method", None) in (
        "spawn",
        "fork",
        "forkserver",
    )


def finetune(
    task_data: TaskData,
    model: Mapping[str, Any] | str | Path,
    ft_cfg: Mapping[str, Any] | None = None,
    *,
    cache_root: str | Path,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Fine-tune ``model`` on ``task_data`` (or reuse the cached result) and return its folder.

    ``model`` is the model config (``name``, ``name_or_path``) or a model folder. ``trainer_kwargs``
    go to ``pl.Trainer`` (accelerator, devices, strategy, precision, logger, callbacks, ...); the
    number of epochs and gradient clipping come from ``ft_cfg``. The folder holds the fine-tuned
    model and tokenizer and ``manifest.json`` (dev/test metrics of the fine-tuned classifier,
    timing, truncation counts).
    """
    config = FineTuneConfig.from_mapping(ft_cfg)
    if task_data.kind not in ("classification", "regression"):
        raise LexpInputError(
            f"task {task_data.name} is a {task_data.kind} task; fine-tuning is for sentence tasks "
            "(classification or regression). Sequence-labelling tasks use the pretrained encoder"
        )
    for split in ("train", "dev"):
        if not task_data.splits.get(split):
            raise LexpInputError(
                f"task {task_data.name} has no {split} examples; fine-tuning needs train and dev"
            )
    slug, name_or_path, model_cfg = _model_source(model)
    trainer_kwargs = dict(trainer_kwargs or {})
    settings = {
        # Not the whole model config: its dtype only concerns extraction (fine-tuning is float32).
        "model": {"name_or_path": model_cfg.get("name_or_path"), "revision": model_cfg.get("revision")},
        "model_digest": model_digest(name_or_path),
        "task": task_data.name,
        "kind": task_data.kind,
        "labels": list(task_data.labels),
        "split_notes": task_data.notes,
        # The examples themselves: whatever carved, capped or sampled them, other data = other model.
        "examples": {s: [len(v), examples_digest(v)] for s, v in sorted(task_data.splits.items())},
        "finetune": config.weight_settings(),
        # The effective batch (devices × accumulation) and the precision change the weights too.
        "trainer": {
            k: str(trainer_kwargs.get(k))
            for k in ("devices", "num_nodes", "accumulate_grad_batches", "precision")
        },
    }
    from lexp.store import fingerprint

    fp = fingerprint(settings, [Path(f) for f in task_data.files])
    out = Path(cache_root) / "finetuned" / _safe_name(slug) / f"{_safe_name(task_data.name)}-{fp[:12]}"
    if _is_complete(out, fp):
        log.info("reusing fine-tuned model %s", out)
        return out
    with _exclusive(out):  # a parallel sweep job fine-tuning the same thing waits, then reuses it
        if _is_complete(out, fp):
            log.info("reusing fine-tuned model %s", out)
            return out
        if out.exists():
            raise LexpInputError(
                f"{out} exists but its {MANIFEST} is missing or belongs to another run; delete the folder"
            )
        revision = model_cfg.get("revision")
        return _train_and_save(
            task_data, name_or_path, revision, slug, config, settings, fp, out, trainer_kwargs
        )


def _train_and_save(
    task_data: TaskData,
    name_or_path: str,
    revision: str | None,
    slug: str,
    config: FineTuneConfig,
    settings: Mapping[str, Any],
    fp: str,
    out: Path,
    trainer_kwargs: dict[str, Any],
) -> Path:
    partial = out.with_name(out.name + ".partial")
    checkpoints = partial / "checkpoints"
    last = checkpoints / "last.ckpt"
    resume_from = str(last) if config.resume and last.is_file() else None
    if _is_rank_zero():
        if resume_from is None and partial.exists():
            shutil.rmtree(partial)
        checkpoints.mkdir(parents=True, exist_ok=True)
    if resume_from:
        log.info("resuming fine-tuning from %s", resume_from)

    pl.seed_everything(config.seed, workers=True, verbose=False)  # the classifier head's init
    module = FineTuner(
        name_or_path,
        kind=task_data.kind,
        labels=list(task_data.labels),
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_epsilon=config.adam_epsilon,
        adam_betas=list(config.adam_betas),
        warmup_steps=config.warmup_steps,
        metrics=list(config.metrics or default_metrics(task_data.name, task_data.kind)),
        positive_label=config.positive_label,
        revision=revision,
    )
    _check_length(module.model, config.max_seq_length, name_or_path)
    tokenizer = load_tokenizer(name_or_path, module.model, revision=revision)
    data = GlueDataModule.from_task(
        task_data,
        tokenizer,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        max_seq_length=config.max_seq_length,
        seed=config.seed,
        num_workers=config.num_workers,
    )
    data.setup()
    for split, n in data.truncated.items():
        if n:
            log.warning(
                "%s %s: %d of %d examples exceed max_seq_length=%d tokens and were truncated "
                "longest-first (as in run_glue.py); raise finetune.max_seq_length to keep them whole",
                task_data.name,
                split,
                n,
                len(data.splits[split]),
                config.max_seq_length,
            )

    throughput = _Throughput()
    # Keeps only the newest checkpoint (no monitor), with last.ckpt linking to it.
    saver = ModelCheckpoint(
        dirpath=checkpoints,
        save_last="link",
        save_top_k=1,
        every_n_train_steps=config.checkpoint_every_n_steps,
    )
    kwargs: dict[str, Any] = {"logger": False, "num_sanity_val_steps": 0, **trainer_kwargs}
    kwargs.update(
        max_epochs=config.epochs,
        gradient_clip_val=config.max_grad_norm,
        default_root_dir=str(partial),
        callbacks=[*trainer_kwargs.get("callbacks", []), saver, throughput],
    )
    trainer = pl.Trainer(**kwargs)
    started = time.perf_counter()
    with warnings.catch_warnings():
        if resume_from:  # the checkpoint folder is meant to be non-empty when resuming
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        with _startable_method():
            trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    fit_seconds = time.perf_counter() - started

    spawned = _spawned(trainer)
    counts = throughput.counts(trainer)
    if spawned:  # rank 0 counted; Lightning brought its callback_metrics back
        for key in counts:
            value = trainer.callback_metrics.get(f"lexp_fit/{key}")
            counts[key] = float(value) if value is not None else counts[key]
        counts["seconds"] *= trainer.world_size  # per device, as below: every rank saw as many
        counts["examples"] *= trainer.world_size
    results: dict[str, dict[str, float]] = {}
    timing: dict[str, float] = {
        "fit_seconds": round(fit_seconds, 3),
        "train_examples": int(counts["examples"]),
        "train_examples_per_s": round(counts["examples"] / max(counts["seconds"], 1e-9), 2),
    }
    evaluator = trainer
    if spawned:  # dev/test here, on one device: no processes to start, every example counted once
        single = {k: v for k, v in kwargs.items() if k not in ("strategy", "callbacks", "num_nodes")}
        evaluator = pl.Trainer(**(single | {"devices": 1, "enable_checkpointing": False}))
    for split, run in (("dev", evaluator.validate), ("test", evaluator.test)):
        if not task_data.splits.get(split):
            continue
        started = time.perf_counter()
        (logged,) = run(module, datamodule=data, verbose=False)
        seconds = time.perf_counter() - started
        results[split] = {k.split("/", 1)[1]: float(v) for k, v in logged.items()}
        timing[f"{split}_examples_per_s"] = round(len(task_data.splits[split]) / max(seconds, 1e-9), 2)

    if _is_rank_zero():
        module.model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if not config.keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
        manifest = _manifest(task_data, name_or_path, slug, config, settings, fp, module, trainer, data)
        manifest.update(metrics=results, timing=timing, resumed_from=resume_from)
        manifest.update(epochs=int(counts["epochs"]), global_step=int(counts["global_step"]))
        manifest["world_size"] = trainer.world_size
        manifest["strategy"] = type(trainer.strategy).__name__ + (" (spawned ranks)" if spawned else "")
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(partial, out)
        log.info("fine-tuned %s on %s: %s -> %s", slug, task_data.name, results, out)
    trainer.strategy.barrier("lexp-finetune-saved")
    return out


def _manifest(
    task_data: TaskData,
    name_or_path: str,
    slug: str,
    config: FineTuneConfig,
    settings: Mapping[str, Any],
    fp: str,
    module: FineTuner,
    trainer: pl.Trainer,
    data: GlueDataModule,
) -> dict[str, Any]:
    import transformers

    import lexp

    return {
        "complete": True,
        "fingerprint": fp,
        "model": slug,
        "base_model": name_or_path,
        "task": task_data.name,
        "kind": task_data.kind,
        "labels": list(task_data.labels),
        "metric_names": list(module.hparams.metrics),
        "settings": settings,
        "finetune": {k: _jsonable(v) for k, v in dataclasses.asdict(config).items()},
        "examples": {s: len(v) for s, v in data.splits.items()},
        "truncated": data.truncated,
        "unseen_labels": task_data.unseen_labels(),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "lexp_version": lexp.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a fine-tuned folder (metrics, timing, settings)."""
    return json.loads((Path(path) / MANIFEST).read_text())


def _is_complete(out: Path, fp: str) -> bool:
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError):
        return False
    return manifest.get("complete") is True and manifest.get("fingerprint") == fp


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """The cache entry's exclusive lock (:func:`lexp.locks.entry_lock`, ``<out>.lock``; released by
    the kernel if the process dies). DDP ranks > 0 of a re-executed script skip it: rank 0 holds it."""
    if not _is_rank_zero():
        yield
        return
    with entry_lock(out):
        yield


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


def _check_length(model: torch.nn.Module, max_seq_length: int, name_or_path: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < max_seq_length:
        raise LexpInputError(
            f"{CONFIG_FILE}: finetune.max_seq_length={max_seq_length} exceeds the {limit} positions of "
            f"{name_or_path}; set finetune.max_seq_length <= {limit}"
        )


def _model_source(model: Mapping[str, Any] | str | Path) -> tuple[str, str, dict[str, Any]]:
    """(slug, name_or_path, settings) of a model config (``conf/model/*.yaml``) or a model folder."""
    from lexp.encoders.loading import resolve_name_or_path

    cfg = {"name_or_path": str(model)} if isinstance(model, (str, Path)) else dict(model)
    raw = cfg.get("name_or_path")
    path = resolve_name_or_path(None if raw is None else str(raw))
    if Path(path).expanduser().exists():  # absolute, so checkpoints survive a change of directory
        path = str(Path(path).expanduser().resolve())
    slug = str(cfg.get("name") or Path(path).name or path)
    return slug, path, cfg


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 over the texts and labels of a split, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.text_a}\0{e.text_b}\0{e.label}\n".encode())
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
