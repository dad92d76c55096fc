"""The config schema: every setting lexp reads, its type and its allowed range, checked at start-up.

:func:`check_config` runs first in ``python -m lexp.run`` (before torch is even imported) and again
at the top of :func:`lexp.experiment.run`, so a bad value costs seconds, never an extraction or an
oracle: it raises one :class:`~lexp.errors.LexpInputError` naming the key, the value, the allowed
range and the fix (``lexp: error: ...``, exit code 2). ``python -m lexp.schema`` prints the table.

Why a table and not Hydra structured configs: a structured config makes Hydra reject a bad type
while composing, with its own message and exit code 1, and it cannot express ranges (``lr > 0``,
``0 <= delta < 1``) anyway; the table gives every problem the same one-line form, including
Hydra's untyped overrides (``probe.epochs=abc`` arrives as the string ``'abc'``).

Keys are validated where they are known and tolerated where they are not (a warning names them),
so a key added to ``conf/`` works before it is added here; ``tests/test_config.py`` fails until it
is. Adding a key is one line in :data:`SCHEMA` (or in :data:`ANALYSIS_KEYS` / :data:`TASK_KEYS`).
Named values are made canonical in place: ``task.separator=tab`` (or ``\\t``, as a shell hands it
over) becomes a tab, ``task.comment_prefix=hash`` becomes ``#``.

No torch, no numpy at import: only the device check imports torch, and it runs last.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lexp.errors import LexpInputError

__all__ = [
    "ANALYSIS_KEYS",
    "SCHEMA",
    "TASK_KEYS",
    "Rule",
    "check_config",
    "command_line",
    "comment_prefix_value",
    "describe",
    "known_keys",
    "separator_value",
]

log = logging.getLogger("lexp")

_MISSING = object()
_WARNED: set[tuple[str, ...]] = set()


# ------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """One setting: what it must be (``allowed``, shown in errors) and an example for the fix.

    ``check(value)`` returns None when the value is fine, else a short reason; ``normalise`` (if
    any) maps an accepted spelling to the canonical value written back into the config.
    """

    allowed: str
    check: Callable[[Any], str | None]
    doc: str = ""
    example: Any = _MISSING
    normalise: Callable[[Any], Any] | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _in_range(x: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (x < lo or (lo_open and x == lo)):
        return False
    return not (hi is not None and (x > hi or (hi_open and x == hi)))


def Int(
    lo: int | None = None,
    hi: int | None = None,
    *,
    null: bool = False,
    doc: str = "",
    example: Any = _MISSING,
) -> Rule:
    """An integer (never a bool or a float such as 3.0), optionally bounded, optionally null."""
    rng = _range_text(lo, hi, False, False)
    allowed = f"an integer{' ' + rng if rng else ''}{' or null' if null else ''}"

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else "null is not allowed"
        if not _is_int(v) or not _in_range(v, lo, hi, False, False):
            return "out of range" if _is_int(v) else "not an integer"
        return None

    return Rule(allowed, check, doc, example)


def Float(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    null: bool = False,
    doc: str = "",
    example: Any = _MISSING,
) -> Rule:
    """A finite number (an int is fine), optionally in a (half-)open or closed range."""
    rng = _range_text(lo, hi, lo_open, hi_open)
    allowed = f"a number{' ' + rng if rng else ''}{' or null' if null else ''}"

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else "null is not allowed"
        if not _is_number(v):
            return "not a finite number"
        return None if _in_range(float(v), lo, hi, lo_open, hi_open) else "out of range"

    return Rule(allowed, check, doc, example)


def FloatOrList(lo: float, hi: float, *, doc: str = "", example: Any = _MISSING) -> Rule:
    """A number in [lo, hi] or a non-empty list of them (``analysis.ct``)."""
    allowed = f"a number in [{lo:g}, {hi:g}] or a non-empty list of them, e.g. [0.1,0.3]"

    def check(v: Any) -> str | None:
        values = list(v) if isinstance(v, list | tuple) else [v]
        if not values:
            return "an empty list"
        if not all(_is_number(x) and lo <= float(x) <= hi for x in values):
            return "out of range"
        return None

    return Rule(allowed, check, doc, example)


def List(
    item: Rule,
    *,
    null: bool = False,
    nonempty: bool = True,
    unique: bool = False,
    doc: str = "",
    example: Any = _MISSING,
) -> Rule:
    """A list whose every item passes ``item`` (``unique``: no item twice)."""
    allowed = (
        f"a{' non-empty' if nonempty else ''} list of {'distinct ' if unique else ''}"
        f"{item.allowed.removeprefix('a ').removeprefix('an ')}"
    )
    allowed += " or null" if null else ""

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else "null is not allowed"
        if not isinstance(v, list | tuple):
            return "not a list"
        if nonempty and not v:
            return "an empty list"
        bad = [x for x in v if item.check(x) is not None]
        if bad:
            return f"holds {bad[0]!r}"
        if unique:
            seen: set[Any] = set()
            twice = [x for x in v if x in seen or seen.add(x)]  # type: ignore[func-returns-value]
            return f"holds {twice[0]!r} twice" if twice else None
        return None

    return Rule(allowed, check, doc, example)


def Bool(*, null: bool = False, doc: str = "", example: Any = _MISSING) -> Rule:
    allowed = "true or false" + (" or null" if null else "")

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else "null is not allowed"
        return None if isinstance(v, bool) else "not true/false"

    return Rule(allowed, check, doc, example)


def Str(*, null: bool = False, nonempty: bool = True, doc: str = "", example: Any = _MISSING) -> Rule:
    allowed = ("a non-empty string" if nonempty else "a string") + (" or null" if null else "")

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else "null is not allowed"
        if not isinstance(v, str):
            return "not a string"
        return "empty" if nonempty and not v.strip() else None

    return Rule(allowed, check, doc, example)


def Choice(
    *values: Any,
    null: bool = False,
    doc: str = "",
    example: Any = _MISSING,
    aliases: Mapping[str, Any] | None = None,
) -> Rule:
    """One of ``values`` (compared as given; strings case-sensitively, as the code compares them)."""
    names = [("null" if x is None else str(x)) for x in values]
    allowed = "one of " + "|".join(names) + (" or null" if null else "")
    accepted = set(values) | set(aliases or {})

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else "null is not allowed"
        try:
            return None if v in accepted and not isinstance(v, bool) else "not a choice"
        except TypeError:  # unhashable (a list)
            return "not a choice"

    normalise = (lambda v: (aliases or {}).get(v, v)) if aliases else None
    return Rule(allowed, check, doc, example, normalise)


# ------------------------------------------------------------------------------ named values (task)
def separator_value(value: Any) -> str | None:
    """``task.separator`` as the reader uses it (:func:`lexp.tasks.readers.separator_value`)."""
    from lexp.tasks.readers import separator_value as canonical

    return canonical(value)


def comment_prefix_value(value: Any) -> str | None:
    """``task.comment_prefix`` as the reader uses it (:func:`lexp.tasks.readers.comment_prefix_value`)."""
    from lexp.tasks.readers import comment_prefix_value as canonical

    return canonical(value)


def _wraps(fn: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        try:
            fn(v)
        except LexpInputError as exc:
            return str(exc)
        return None

    return check


_SEPARATOR = Rule(
    "tab, space, whitespace (any run of whitespace; also null), \\t, or a literal string such as '|'",
    _wraps(separator_value),
    "column separator",
    "tab",
    separator_value,
)
_COMMENT_PREFIX = Rule(
    "a non-empty string, hash (#) or null (no comments)",
    _wraps(comment_prefix_value),
    "lines starting with it before a sentence are comments",
    "hash",
    comment_prefix_value,
)


# ----------------------------------------------------------------------------- machine bounds
def cores() -> int:
    """CPU cores this process may run on (its affinity mask, as torch's default thread count sees)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS/Windows
        return max(1, os.cpu_count() or 1)


#: threads.* beyond cores × this factor only oversubscribe (OpenMP with 100,000 threads segfaults).
THREADS_FACTOR = 4
MAX_THREADS = cores() * THREADS_FACTOR
#: Upper bounds of batch sizes and budgets: far beyond any useful value, below sizes whose buffers
#: no machine can allocate (a typo such as an extra zero is an error, not a crash an hour later).
MAX_SENTENCES = 1 << 16  # sentences/examples per forward pass
MAX_TOKENS = 1 << 24  # padded tokens per forward pass
MAX_ROWS = 1 << 26  # rows per probe step / per streaming chunk (64 M)


def _threads(doc: str, example: Any) -> Rule:
    return Int(
        1,
        MAX_THREADS,
        null=True,
        doc=doc + f"; at most {THREADS_FACTOR} x the {cores()} cores",
        example=example,
    )


# ------------------------------------------------------------------------------------- the table
_DEVICE = re.compile(r"auto|cpu|cuda|gpu|cuda:[0-9]+")
_STRING_PATH = Str(doc="a path")
_GRID = {
    "grid.step": Int(1, MAX_ROWS, doc="candidate sizes every `step` neurons", example=10),
    "grid.start": Int(1, null=True, doc="first candidate size; null: step", example="null"),
    "grid.stop": Int(1, null=True, doc="last candidate size; null: all neurons", example="null"),
    "grid.counts": List(Int(1), null=True, doc="explicit candidate sizes", example="[10,20,50]"),
    "grid.fractions": List(
        Float(0, 1, lo_open=True), null=True, doc="fractions of all neurons", example="[0.001,0.01]"
    ),
    "batch": Int(1, 4096, doc="candidates trained together in one pass", example=16),
    "ranking_steps": Int(1, 1 << 20, doc="LCA ranking sweep steps", example=1000),
}
_CLUSTERING = {
    "signed": Bool(doc="false: distance 1-|corr| (the paper)", example="false"),
    "representative": Choice("random", "medoid", doc="one neuron per cluster", example="random"),
    "compute": Choice("float32", "bfloat16", doc="covariance products", example="float32"),
    "chunk_rows": Int(1, MAX_ROWS, doc="rows per streaming chunk", example=16384),
    "max_rows": Int(1, null=True, doc="use only the first N rows of the store; null: all", example="null"),
    "method": Choice(
        "auto",
        "exact",
        "blocked",
        doc="exact: dense N×N; blocked: bounded memory (auto: exact when it fits)",
        example="auto",
    ),
}
_MEMORY = Float(
    0, lo_open=True, null=True, doc="memory budget in GB (null: 85% of the RAM available at start)", example=8
)

#: Keys of every run, whatever the task and analysis. ``path: Rule``.
SCHEMA: dict[str, Rule] = {
    "data_root": _STRING_PATH,
    "cache_dir": _STRING_PATH,
    "seed": Int(doc="every random choice derives from it", example=42),
    "device": Rule(
        "auto, cpu, cuda or cuda:N",
        lambda v: (
            None
            if v is None or (isinstance(v, str) and _DEVICE.fullmatch(v.strip().lower()))
            else "not a device"
        ),
        "the run's one compute device; a GPU that is not there is an error",
        "cpu",
    ),
    "progress": Bool(doc="progress bars", example="true"),
    # extract
    "extract.batch_size": Int(1, MAX_SENTENCES, doc="sentences per forward pass", example=32),
    "extract.subword": Choice(
        "last", "first", "average", doc="the subword that stands for a word", example="last"
    ),
    "extract.sentence": Choice(
        "auto",
        "cls",
        "last",
        "mean",
        doc="sentence tasks: the vector of an example (auto: [CLS]/<cls> where the tokenizer has one, "
        "else the last token)",
        example="last",
    ),
    "extract.long_sentences": Choice(
        "error", "window", doc="sentences longer than the model maximum", example="window"
    ),
    "extract.splits": List(
        Choice("train", "dev", "test"),
        doc="splits to extract (train and dev are needed)",
        example="[train,dev,test]",
    ),
    "extract.max_tokens": Rule(
        f"auto, an integer in [1, {MAX_TOKENS}] or null",
        lambda v: (
            None
            if v is None or v == "auto" or (_is_int(v) and 1 <= v <= MAX_TOKENS)
            else "not a token budget"
        ),
        "padded tokens per forward; auto: a budget on GPUs, sentence batches on CPUs",
        "auto",
    ),
    "extract.precision": Choice("32", "bf16-mixed", doc="extraction arithmetic", example="32"),
    # limit / threads / store
    "limit.train": Int(1, null=True, doc="keep the first N train sentences; null: all", example="null"),
    "limit.dev": Int(1, null=True, doc="keep the first N dev sentences; null: all", example="null"),
    "limit.test": Int(1, null=True, doc="keep the first N test sentences; null: all", example="null"),
    "threads.extract": _threads("torch threads; null: torch's default", "null"),
    "threads.finetune": _threads("torch threads; null: torch's default", "null"),
    "threads.probes": _threads("torch threads; null: torch's default", 1),
    "threads.clustering": _threads("torch threads; null: torch's default", "null"),
    "store.dtype": Choice("float16", "float32", doc="activation store dtype", example="float16"),
    # model
    "model.name": Str(doc="slug used in cache paths and results", example="minilm"),
    "model.name_or_path": Str(null=True, doc="local dir, hub id, or minilm", example="minilm"),
    "model.revision": Str(null=True, doc="hub revision", example="null"),
    "model.dtype": Choice(
        "float32",
        "bfloat16",
        "float16",
        "fp32",
        "bf16",
        "fp16",
        doc="encoder weights; float16 on a GPU only",
        example="float32",
    ),
    "model.layers": Rule(
        "null (all), 'all', a list of distinct layer numbers >= 0 or 'every:N'",
        lambda v: _layers_problem(v),
        "hidden states kept in the stores (0 = embeddings; every:N adds the last layer); checked "
        "against the model's depth before any data is read",
        "[0,4,8]",
    ),
    "model.random_init": Bool(doc="same architecture, seeded random weights (baseline)", example="false"),
    "model.init_seed": Int(doc="seed of random_init's weights; conf: the run seed", example=42),
    # probe
    "probe.name": Str(example="elasticnet"),
    "probe.epochs": Int(1, doc="passes over the training data", example=10),
    "probe.lr": Float(0, lo_open=True, doc="Adam learning rate", example=0.001),
    "probe.batch_size": Int(1, MAX_ROWS, doc="rows per Adam step", example=128),
    "probe.read_steps": Int(1, 1 << 16, doc="minibatches read per training batch; speed only", example=16),
    "probe.l1": Float(0, doc="ElasticNet L1 weight", example=1e-5),
    "probe.l2": Float(0, doc="ElasticNet L2 weight", example=1e-5),
    "probe.seed": Int(doc="batch order", example=42),
    "probe.init_seed": Int(null=True, doc="weight init; null: probe.seed", example="null"),
    "probe.seeds": List(
        Int(),
        null=True,
        unique=True,
        doc="init seeds trained as extra heads of one pass; mean ± std",
        example="[1,2,3]",
    ),
    "probe.select_on_dev": Bool(doc="keep the epoch with the best dev score", example="true"),
    "probe.regression": Bool(null=True, doc="null: from the task", example="null"),
    "probe.resident": Rule(
        "auto, true, false or null (= auto)",
        lambda v: None if v is None or isinstance(v, bool) or v == "auto" else "not auto/true/false",
        "hold the splits in the device's memory and cut batches there",
        "auto",
    ),
    # finetune (sentence tasks; FineTuneConfig checks the same again)
    "finetune.learning_rate": Float(0, lo_open=True, example=5e-5),
    "finetune.epochs": Int(1, example=3),
    "finetune.batch_size": Int(1, MAX_SENTENCES, example=8),
    "finetune.max_seq_length": Int(4, 1 << 20, example=128),
    "finetune.weight_decay": Float(0, example=0.0),
    "finetune.adam_epsilon": Float(0, lo_open=True, example=1e-8),
    "finetune.adam_betas": Rule(
        "two numbers in [0, 1), e.g. [0.9,0.999]",
        lambda v: (
            None
            if isinstance(v, list | tuple) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
            else "not two numbers in [0, 1)"
        ),
        example="[0.9,0.999]",
    ),
    "finetune.warmup_steps": Int(0, example=0),
    "finetune.max_grad_norm": Float(0, lo_open=True, null=True, example=1.0),
    "finetune.seed": Int(example=42),
    "finetune.metrics": List(Choice("accuracy", "f1", "pearson", "spearman"), null=True, example="null"),
    "finetune.positive_label": Rule(
        "a string or number",
        lambda v: None if isinstance(v, str | int) and not isinstance(v, bool) else "not a label",
        example='"1"',
    ),
    "finetune.eval_batch_size": Int(1, MAX_SENTENCES, example=32),
    "finetune.num_workers": Int(0, MAX_THREADS, example=0),
    "finetune.resume": Bool(example="true"),
    "finetune.keep_checkpoints": Bool(example="false"),
    "finetune.checkpoint_every_n_steps": Int(1, null=True, example="null"),
    # trainer (other keys go to Lightning's Trainer as they are)
    "trainer.accelerator": Choice("auto", "cpu", "gpu", "cuda", doc="prefer device=", example="auto"),
    "trainer.devices": Rule(
        "an integer >= 1, a list of GPU indices or auto",
        lambda v: (
            None
            if (_is_int(v) and v >= 1)
            or v == "auto"
            or (isinstance(v, list | tuple) and v and all(_is_int(x) and x >= 0 for x in v))
            else "not a device count"
        ),
        example=1,
    ),
    "trainer.strategy": Str(example="auto"),
    "trainer.precision": Choice(
        "32-true",
        "32",
        32,
        "bf16-mixed",
        "16-mixed",
        "bf16-true",
        "16-true",
        "64-true",
        doc="Lightning precision",
        example="32-true",
    ),
    "trainer.enable_progress_bar": Bool(example="true"),
    "trainer.enable_model_summary": Bool(example="false"),
    # logger
    "logger.kind": Choice("wandb", "csv", "none", example="none"),
    "logger.project": Str(example="lexp"),
    "logger.entity": Str(null=True, example="null"),
    "logger.mode": Choice("offline", "online", "disabled", example="offline"),
    "logger.group": Str(null=True, example="null"),
    "logger.tags": List(Str(), nonempty=False, example="[]"),
    # analysis (every analysis)
    "analysis.name": Choice(
        "oracle", "general", "layers", "neurons", "pipeline", "compare", "layerdrop", example="oracle"
    ),
    "analysis.max_memory_gb": _MEMORY,
}

#: ``analysis.<key>`` per analysis (``analysis.name``).
ANALYSIS_KEYS: dict[str, dict[str, Rule]] = {
    "oracle": {},
    "general": {
        "ct": FloatOrList(0, 1, doc="clustering threshold(s) on 1-|corr|", example=0.3),
        "split": Choice("train", "dev", "test", doc="the store the clustering runs on", example="train"),
        "evaluate": Bool(doc="train a probe on the representatives at every ct", example="true"),
        **_CLUSTERING,
    },
    "layers": {
        "redundancy_threshold": Float(
            0, 1, lo_open=True, doc="share of the oracle a redundant layer keeps", example=0.99
        ),
        "incremental": Bool(example="true"),
    },
    "neurons": {
        "target_fraction": Float(
            0, 1, lo_open=True, doc="share of the oracle the minimal set must reach", example=0.97
        ),
        **_GRID,
    },
    "pipeline": {
        "delta": Float(0, 1, hi_open=True, doc="relative tolerance of LS and CCFS", example=0.01),
        "ls_delta": Float(0, 1, hi_open=True, doc="LayerSelector tolerance", example=0.01),
        "fs_delta": Float(0, 1, hi_open=True, doc="feature-selection tolerance", example=0.01),
        "ct": Float(0, 1, doc="clustering threshold (one number)", example=0.3),
        "save_extractor": Bool(example="true"),
        "verify_extractor": Bool(example="true"),
        "timing.enabled": Bool(example="true"),
        "timing.sentences": Int(1, 1 << 20, example=256),
        "timing.batch_size": Int(1, MAX_SENTENCES, example=32),
        "timing.repeats": Int(1, example=3),
        "timing.classifier_rows": Int(1, MAX_ROWS, example=100000),
        "timing.classifier_features": List(Int(1), example="[100,300,1000,2688]"),
        "timing.classifier_epochs": Int(1, example=10),
        "timing.classifier_steps": Int(1, null=True, example=300),
        **_CLUSTERING,
        **_GRID,
    },
}


ANALYSIS_KEYS["layerdrop"] = {
    "split": Choice(
        "train", "dev", "test", doc="the store the layer measures are computed on", example="train"
    ),
    "max_gap": Int(1, doc="angular distance d(l, l+n) for n = 1..max_gap", example=4),
    "drop": List(Int(1), nonempty=False, doc="drop test: n blocks removed per entry", example="[1,2]"),
    "ppl_split": Choice("train", "dev", "test", doc="causal LMs: perplexity sentences", example="dev"),
    "ppl_sentences": Int(1, doc="causal LMs: sentences for the perplexity", example=200),
    "chunk_rows": Int(1, doc="rows per streaming chunk", example=8192),
}


def _layers_problem(value: Any) -> str | None:
    from lexp.layers import spec_problem

    return spec_problem(value)


def _inherit(rule: Rule, key: str) -> Rule:
    """``analysis.other.<key>`` of analysis=compare: null (= ``model.<key>``) or what model.<key> takes."""
    return Rule(
        f"null (= model.{key}) or {rule.allowed}",
        lambda v: None if v is None else rule.check(v),
        f"model B's {key}; null: model A's",
        "null",
    )


ANALYSIS_KEYS["compare"] = {
    "split": Choice("train", "dev", "test", doc="the split whose words both models see", example="train"),
    **{k: v for k, v in _CLUSTERING.items() if k in ("compute", "chunk_rows", "max_rows")},
    **{f"other.{k[6:]}": _inherit(r, k[6:]) for k, r in SCHEMA.items() if k.startswith("model.")},
}

#: ``task.<key>`` per reader (``task.reader``); the task loader checks files and combinations.
TASK_KEYS: dict[str, dict[str, Rule]] = {
    "": {
        "name": Rule(
            "a non-empty name without / (used in store paths)",
            lambda v: (
                None
                if isinstance(v, str) and v.strip() and "/" not in v and v not in (".", "..")
                else "not a name"
            ),
            example="my_task",
        ),
        "reader": Choice("columns", "glue", "table_sentences", "table_tokens", example="columns"),
        "kind": Choice("labelling", "classification", "regression", null=True, example="labelling"),
        "data_dir": Str(null=True, example="/path/to/data"),
        "control": Bool(doc="also train control-task heads (word-level tasks); selectivity", example="false"),
    },
    "columns": {
        "word_column": Int(0, doc="0-based", example=0),
        "label_column": Int(0, null=True, doc="0-based; null: from pmb_layer", example=1),
        "separator": _SEPARATOR,
        "comment_prefix": _COMMENT_PREFIX,
        "skip_token_ids": Bool(example="false"),
        "min_columns": Int(1, null=True, example="null"),
        "multiword_joiner": Str(null=True, example="null"),
        "max_train_tokens": Int(1, null=True, example=150000),
        "dev_from_train": Float(0, 1, lo_open=True, hi_open=True, null=True, example=0.1),
        "pmb_layer": Choice("sem", "cat", null=True, example="sem"),
    },
    "glue": {
        "glue_task": Choice("sst2", "mrpc", "mnli", "qnli", "qqp", "rte", "stsb", null=True, example="sst2"),
        "protocol": Choice("split_train", "pool", "as_is", example="split_train"),
        "dev_fraction": Float(0, 1, lo_open=True, hi_open=True, example=0.1),
        "split_seed": Int(example=42),
        "pool_fractions": Rule(
            "null or fractions of train, dev and test that sum to 1, e.g. {train:0.8,dev:0.1,test:0.1}",
            lambda v: (
                None
                if v is None
                or (
                    isinstance(v, Mapping)
                    and set(v) == {"train", "dev", "test"}
                    and all(_is_number(x) and 0 < x < 1 for x in v.values())
                    and math.isclose(sum(v.values()), 1.0, abs_tol=1e-9)
                )
                else "not fractions"
            ),
            example="{train:0.8,dev:0.1,test:0.1}",
        ),
        "max_train_examples": Int(1, null=True, example="null"),
        "max_test_examples": Int(1, null=True, example="null"),
    },
}

#: Tables (CSV/TSV/JSONL/Parquet/datasets folders or the HF cache; lexp.tasks.tabular).
_TABLE_SOURCE: dict[str, Rule] = {
    "format": Choice("auto", "csv", "tsv", "jsonl", "parquet", "arrow", "disk", example="auto"),
    "hf_name": Str(null=True, doc="a dataset in the local HF datasets cache", example="conll2003"),
    "hf_config": Str(null=True, example="null"),
    "hf_cache_dir": Str(null=True, doc="null: HF_DATASETS_CACHE", example="null"),
}
TASK_KEYS["table_sentences"] = {
    **_TABLE_SOURCE,
    "text_column": Str(example="text"),
    "text_pair_column": Str(null=True, example="null"),
    "label_column": Str(example="label"),
    **{k: TASK_KEYS["glue"][k] for k in ("protocol", "dev_fraction", "split_seed", "pool_fractions")},
    **{k: TASK_KEYS["glue"][k] for k in ("max_train_examples", "max_test_examples")},
    "long_texts": Choice("error", "truncate", doc="texts over finetune.max_seq_length", example="error"),
}
TASK_KEYS["table_tokens"] = {
    **_TABLE_SOURCE,
    "tokens_column": Str(example="tokens"),
    "tags_column": Str(example="ner_tags"),
    **{k: TASK_KEYS["columns"][k] for k in ("max_train_tokens", "dev_from_train")},
}

#: Groups whose unknown keys are expected (Lightning Trainer options, task files, W&B options).
_OPEN_GROUPS = ("trainer.", "task.files", "logger.", "hydra.")
#: Groups lexp owns: an unknown key there is a misspelling (``+probe.lrr=0.5``), refused at start.
OWNED_GROUPS = ("probe.", "analysis.", "task.", "extract.", "store.")


def known_keys(cfg: Mapping[str, Any]) -> dict[str, Rule]:
    """The rules that apply to this config (its analysis and task reader decide some)."""
    rules = dict(SCHEMA)
    analysis = (cfg.get("analysis") or {}).get("name")
    for key, rule in ANALYSIS_KEYS.get(str(analysis), {}).items():
        rules[f"analysis.{key}"] = rule
    task = cfg.get("task") or {}
    for reader in ("", str(task.get("reader"))):
        for key, rule in TASK_KEYS.get(reader, {}).items():
            rules[f"task.{key}"] = rule
    return rules


# ------------------------------------------------------------------------------------------- check
def _show(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_show(v).strip("'") for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_show(v).strip(chr(39))}" for k, v in value.items()) + "}"
    return repr(value)


def _flatten(node: Any, prefix: str = "", leaves: Container[str] = ()) -> dict[str, Any]:
    """``{"probe.epochs": 10, ...}``; a mapping whose path is in ``leaves`` stays one value."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping) and value and path not in leaves:
                out.update(_flatten(value, path + ".", leaves))
            else:
                out[path] = value
    return out


def _message(key: str, value: Any, rule: Rule, reason: str | None = None) -> str:
    if reason and reason.startswith(f"{key}="):  # a check that words its own message (separator ...)
        return reason
    doc = f" ({rule.doc})" if rule.doc else ""
    fix = f"e.g. {key}={rule.example}" if rule.example is not _MISSING else f"set {key} to {rule.allowed}"
    return f"{key}={_show(value)} is invalid: {key} must be {rule.allowed}{doc}. Fix: {fix}"


def _unknown_key_message(keys: Sequence[str], rules: Mapping[str, Rule]) -> str:
    """``probe.lrr is not a setting ...; did you mean probe.lr?`` for the first unknown key."""
    key = keys[0]
    group = key.split(".", 1)[0] + "."
    names = {k[len(group) :]: k for k in rules if k.startswith(group)}  # compared without the group
    near = [names[n] for n in difflib.get_close_matches(key[len(group) :], list(names), n=1, cutoff=0.6)]
    hint = f"Did you mean {near[0]}? " if near else ""
    others = f" (also unknown: {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return (
        f"{key} is not a setting lexp knows{others}; a misspelt key would be ignored. {hint}"
        f"Fix: {'spell it ' + near[0] if near else 'remove it'} (the keys: python -m lexp.schema)"
    )


def _cross_checks(flat: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Rules between keys (each value is already of the right type): (key, message) pairs."""
    problems: list[tuple[str, str]] = []
    splits = flat.get("extract.splits")
    if isinstance(splits, list) and not {"train", "dev"} <= set(splits):
        problems.append(
            (
                "extract.splits",
                f"extract.splits={_show(splits)} is invalid: every analysis needs the train and dev "
                "stores. Fix: e.g. extract.splits=[train,dev,test]",
            )
        )
    split = flat.get("analysis.split")
    if isinstance(splits, list) and isinstance(split, str) and split not in splits:
        problems.append(
            (
                "analysis.split",
                f"analysis.split={split!r} is not among extract.splits={_show(splits)}. Fix: "
                f"analysis.split=train, or add {split} to extract.splits",
            )
        )
    grid = "analysis.grid."
    if flat.get(grid + "counts") is not None and flat.get(grid + "fractions") is not None:
        problems.append(
            (
                grid + "counts",
                f"{grid}counts and {grid}fractions are both set; give one. Fix: {grid}fractions=null",
            )
        )
    start, stop = flat.get(grid + "start"), flat.get(grid + "stop")
    if _is_int(start) and _is_int(stop) and stop < start:
        problems.append(
            (
                grid + "stop",
                f"{grid}stop={stop} is below {grid}start={start}. Fix: {grid}stop=null (all neurons)",
            )
        )
    word, label = flat.get("task.word_column"), flat.get("task.label_column")
    if _is_int(word) and word == label:
        problems.append(
            (
                "task.label_column",
                f"task.word_column and task.label_column are both {word}; they must differ. Fix: e.g. "
                f"task.label_column={word + 1}",
            )
        )
    return problems


def check_config(cfg: DictConfig, *, device: bool = True) -> None:
    """Check every known setting of a composed config; raise one LexpInputError for the first bad one.

    Named values are written back in canonical form (``task.separator=tab`` → a tab). Unknown keys
    inside the groups are allowed (they may be new) and named in one warning. ``device=False``
    skips the device check (the only part that imports torch).
    """
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as exc:  # an interpolation that does not resolve (${oops}, ${oc.env:...})
        raise LexpInputError(
            f"the config does not resolve: {type(exc).__name__}: {str(exc).splitlines()[0]}. Fix the "
            "${...} reference in that key (or the override that set it)."
        ) from None
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    rules = known_keys(plain)
    flat = _flatten(plain, leaves=rules)
    problems: list[tuple[str, str]] = []  # (key, message)
    for key, value in flat.items():
        if value == "???":
            problems.append(
                (key, f"{key} is not set (??? in the config). Fix: give it on the command line, {key}=...")
            )
    for key, rule in rules.items():
        if key not in flat:
            continue  # validate what is there: another config may not have the key
        value = flat[key]
        if value == "???":
            continue
        reason = rule.check(value)
        if reason is not None:
            problems.append((key, _message(key, value, rule, reason)))
        elif rule.normalise is not None:
            canonical = rule.normalise(value)
            if canonical != value:
                OmegaConf.update(cfg, key, canonical, merge=False)
                flat[key] = canonical
    if not problems:
        problems = _cross_checks(flat)
    if problems:
        others = list(dict.fromkeys(key for key, _ in problems[1:]))
        more = f" (also invalid: {', '.join(others)})" if others else ""
        raise LexpInputError(problems[0][1] + more)
    unknown = sorted(
        k
        for k in flat
        if k not in rules and not k.startswith(_OPEN_GROUPS) and not any(k.startswith(r + ".") for r in rules)
    )
    misspelt = [k for k in unknown if k.startswith(OWNED_GROUPS)]
    if misspelt:
        raise LexpInputError(_unknown_key_message(misspelt, rules))
    if unknown and tuple(unknown) not in _WARNED:
        _WARNED.add(tuple(unknown))  # once per process (lexp.run checks before run() checks again)
        log.warning("config keys lexp does not check (typo? new key?): %s", ", ".join(unknown))
    if device:
        _check_device(plain, str(flat.get("model.dtype") or "float32").lower())


def _torch_gpu_build() -> bool | None:
    """Whether the installed torch is built for GPUs, read from ``torch/version.py`` without
    importing torch (seconds on a busy machine): False only when it is certainly CPU-only."""
    if "torch" in sys.modules:
        version = sys.modules["torch"].version
        return bool(version.cuda or getattr(version, "hip", None))
    try:
        import importlib.util

        spec = importlib.util.find_spec("torch")
        text = (Path(spec.origin).parent / "version.py").read_text() if spec and spec.origin else ""
    except (ImportError, OSError, ValueError):
        return None
    values = dict(re.findall(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", text, flags=re.M))
    if set(values) != {"cuda", "hip"}:
        return None
    return not (values["cuda"] == "None" and values["hip"] == "None")


def _check_device(plain: Mapping[str, Any], dtype: str) -> None:
    """The run's device exists (lexp.device.resolve_run_device), and float16 weights are not on the CPU.

    A GPU asked of a CPU-only torch build is refused before torch is imported.
    """
    spec = plain.get("device", "auto")
    wanted = "auto" if spec is None else str(spec).strip().lower()
    accelerator = str(((plain.get("trainer") or {}).get("accelerator")) or "auto").strip().lower()
    wants_gpu = wanted.startswith(("cuda", "gpu")) or (wanted == "auto" and accelerator in ("gpu", "cuda"))
    gpu_build = _torch_gpu_build()
    if gpu_build is False and wants_gpu:
        asked = f"device={spec!r}" + (f" (trainer.accelerator={accelerator})" if wanted == "auto" else "")
        raise LexpInputError(
            f"{asked} asks for a GPU, but this torch has no CUDA support. Fix: run on a machine with "
            "a CUDA GPU and a CUDA build of torch, or use device=cpu (device=auto picks the GPU when "
            "there is one)."
        )
    if gpu_build is False and wanted in ("auto", "cpu") and accelerator in ("auto", "cpu"):
        on_cpu = True  # certain without importing torch
    else:
        from lexp.device import resolve_run_device

        on_cpu = resolve_run_device(spec, plain.get("trainer")).type == "cpu"
    if on_cpu and dtype in ("float16", "fp16"):
        raise LexpInputError(
            f"model.dtype={dtype!r} on the CPU (device={spec!r}): CPUs have no float16 matrix kernels "
            "(~50x slower than float32). Fix: model.dtype=float32, or device=cuda on a machine with a GPU"
        )


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user can paste it back into a shell: each argument quoted (shlex.quote).

    ``python -m lexp.run`` puts the module's file path in ``argv[0]``; it is written back as
    ``python -m lexp.run``.
    """
    argv = list(sys.argv if argv is None else argv)
    head = argv[:1]
    if head and Path(head[0]).name == "run.py" and Path(head[0]).parent.name == "lexp":
        head = ["python", "-m", "lexp.run"]
    return shlex.join([*head, *argv[1:]])


def describe() -> str:
    """Every key, what it must be and what it does (``python -m lexp.schema``)."""
    lines = ["| key | allowed | meaning |", "|---|---|---|"]
    sections: list[tuple[str, Mapping[str, Rule]]] = [("", SCHEMA)]
    sections += [(f"analysis.{name}: analysis.", keys) for name, keys in ANALYSIS_KEYS.items()]
    sections += [(f"task reader {name or 'any'}: task.", keys) for name, keys in TASK_KEYS.items()]
    for title, keys in sections:
        label, _, prefix = title.rpartition(": ")
        for key, rule in keys.items():
            where = f" ({label})" if label else ""
            lines.append(f"| `{prefix}{key}` | {rule.allowed} | {rule.doc}{where} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
