"""Task registry: turn a task config (``conf/task/*.yaml``) into a :class:`TaskData`.

``load_task`` is driven entirely by the config, so a new dataset in a known format needs only a
yaml file or command-line overrides. Two readers exist:

* ``reader: columns`` — sequence labelling from CoNLL-style column files (:func:`read_columns`).
  The paper's protocol: train on the *first whole sentences* of train whose cumulative token count
  stays within ``max_train_tokens`` (150,000); standard dev and test. A task without a dev file
  (CoNLL-2000 chunking) carves one off the end of train with ``dev_from_train`` *before* the cap.
* ``reader: glue`` — sentence(-pair) classification and regression from GLUE TSVs
  (:func:`read_glue`), with one of three ``protocol`` values:

  - ``split_train`` (the paper): the official train is split by a seeded permutation into
    train/dev (``dev_fraction`` = 0.1, ``split_seed``); the official dev file is the test set.
  - ``pool``: the listed labelled files are concatenated and split by a seeded permutation into
    train/dev/test by ``pool_fractions`` — for tasks whose train is missing here (QNLI, QQP, MNLI).
  - ``as_is``: ``files.train``/``files.dev``/``files.test`` are used as they are.

Every derivation (carved dev, caps, seeds, repaired rows) is recorded in ``TaskData.notes``, which
the run writes to ``results.json``. This module imports neither Hydra nor OmegaConf: ``task_cfg``
is any mapping (a resolved ``DictConfig`` works too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lexp.errors import LexpInputError
from lexp.tasks.base import Example, Sentence, TaskData, label_vocabulary
from lexp.tasks.glue import FORMATS, glue_format, read_glue
from lexp.tasks.readers import read_columns

__all__ = [
    "Example",
    "Sentence",
    "TaskData",
    "cap_tokens",
    "load_task",
    "read_columns",
    "read_glue",
    "seeded_split",
]

_COMMON_KEYS = {"name", "kind", "reader", "data_dir", "files"}
_COLUMN_DEFAULTS: dict[str, Any] = {
    "word_column": None,
    "label_column": None,
    "separator": None,
    "comment_prefix": "#",
    "skip_token_ids": True,
    "min_columns": None,
    "multiword_joiner": None,
    "max_train_tokens": None,
    "dev_from_train": None,
}
_GLUE_DEFAULTS: dict[str, Any] = {
    "glue_task": None,
    "protocol": "split_train",
    "dev_fraction": 0.1,
    "split_seed": 42,
    "pool_fractions": None,
    "max_train_examples": None,
    "max_test_examples": None,
}


def load_task(task_cfg: Mapping) -> TaskData:
    """Read the task described by ``task_cfg`` (see ``conf/task/*.yaml`` for every field)."""
    cfg = _plain(task_cfg)
    name = cfg.get("name")
    if not name or not isinstance(name, str):
        raise LexpInputError(f"task config: `name` must be a non-empty string, got {name!r}")
    reader = cfg.get("reader")
    if reader == "columns":
        return _load_labelling(_settings(cfg, _COLUMN_DEFAULTS))
    if reader == "glue":
        return _load_glue(_settings(cfg, _GLUE_DEFAULTS))
    raise LexpInputError(f"task {name}: `reader` must be 'columns' or 'glue', got {reader!r}")


# ------------------------------------------------------------------------------------ shared helpers
def _plain(value: Any) -> Any:
    """A plain-Python copy (dicts, lists, scalars) of a mapping such as a resolved DictConfig."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _settings(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults and reject unknown keys, so a typo such as `label_colum` is never ignored."""
    name = cfg["name"]
    unknown = sorted(set(cfg) - _COMMON_KEYS - set(defaults))
    if unknown:
        raise LexpInputError(
            f"task {name}: unknown config key(s) {unknown} for reader {cfg['reader']!r}; "
            f"known: {sorted(_COMMON_KEYS | set(defaults))}"
        )
    for key, value in cfg.items():
        if isinstance(value, str) and "${" in value:
            raise LexpInputError(
                f"task {name}: `{key}` = {value!r} is an unresolved interpolation; pass the composed "
                "config (cfg.task) or OmegaConf.to_container(cfg.task, resolve=True)"
            )
    merged = {**defaults, **cfg}
    if not isinstance(merged.get("files"), Mapping):
        raise LexpInputError(
            f"task {name}: `files` must be a mapping such as {{train: ..., dev: ..., test: ...}}"
        )
    return merged


def _file(cfg: dict[str, Any], split: str) -> Path | None:
    """The path of ``files.<split>`` (relative to ``data_dir`` unless absolute), or None."""
    return _path(cfg, f"files.{split}", cfg["files"].get(split))


def _path(cfg: dict[str, Any], key: str, value: Any) -> Path | None:
    """Resolve one configured file against ``data_dir``; a missing file is a clear error."""
    if value is None:
        return None
    if value == "???":
        raise LexpInputError(
            f"task {cfg['name']}: {key} is not set; override it, e.g. task.{key}=/path/to/file"
        )
    if not isinstance(value, str) or not value:
        raise LexpInputError(f"task {cfg['name']}: {key} must be a path or null, got {value!r}")
    data_dir = cfg.get("data_dir")
    path = Path(value).expanduser()
    if not path.is_absolute():
        if not data_dir:
            raise LexpInputError(
                f"task {cfg['name']}: {key} = {value!r} is relative but task.data_dir is not set"
            )
        path = Path(str(data_dir)).expanduser() / path
    if not path.is_file():
        raise LexpInputError(
            f"task {cfg['name']}: {key} = {str(path)!r} does not exist. Set LEXP_DATA (or "
            "data_root=...) to the data folder, or override task.data_dir / task.files."
        )
    return path.resolve()


def _check_files_keys(cfg: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(cfg["files"]) - set(allowed))
    if unknown:
        raise LexpInputError(f"task {cfg['name']}: unknown files key(s) {unknown}; known: {list(allowed)}")


def _optional_int(cfg: dict[str, Any], key: str, minimum: int = 1) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LexpInputError(
            f"task {cfg['name']}: `{key}` must be an integer >= {minimum} or null, got {value!r}"
        )
    return value


def _fraction(cfg_name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise LexpInputError(f"task {cfg_name}: `{key}` must be a fraction in (0, 1), got {value!r}")
    return float(value)


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even, which surprises in split sizes)."""
    return int(math.floor(x + 0.5))


def cap_tokens(sentences: Sequence[Sentence], max_tokens: int) -> list[Sentence]:
    """The first whole sentences whose cumulative token count stays ``<= max_tokens``.

    The sentence that would cross the cap is left out, and so is everything after it (the paper
    takes the *first* 150K tokens at sentence boundaries: 149,973 tokens for its POS data).
    """
    total = 0
    for i, sentence in enumerate(sentences):
        total += len(sentence.words)
        if total > max_tokens:
            return list(sentences[:i])
    return list(sentences)


def seeded_split(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` by one seeded permutation into consecutive parts of the given sizes.

    The parts are disjoint, in permutation order, and the same for the same ``(n, sizes, seed)``.
    The last part takes whatever the others leave (``sum(sizes[:-1]) <= n`` is required).
    """
    head = [int(s) for s in sizes[:-1]]
    if any(s < 0 for s in head) or sum(head) > n:
        raise ValueError(f"cannot split {n} items into parts of sizes {list(sizes)}")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *head])
    parts = [order[bounds[i] : bounds[i + 1]] for i in range(len(head))]
    parts.append(order[bounds[-1] :])
    return parts


def _n_tokens(sentences: Sequence[Sentence]) -> int:
    return sum(len(s.words) for s in sentences)


# ---------------------------------------------------------------------------------- sequence labelling
def _load_labelling(cfg: dict[str, Any]) -> TaskData:
    name = cfg["name"]
    if cfg.get("kind", "labelling") != "labelling":
        raise LexpInputError(f"task {name}: reader 'columns' reads labelling tasks; set kind: labelling")
    _check_files_keys(cfg, ("train", "dev", "test"))
    for key in ("word_column", "label_column"):
        if cfg[key] is None:
            raise LexpInputError(f"task {name}: set `{key}` (0-based column index)")
    read_kw = {
        key: cfg[key]
        for key in (
            "word_column",
            "label_column",
            "separator",
            "comment_prefix",
            "skip_token_ids",
            "min_columns",
        )
    }
    max_train_tokens = _optional_int(cfg, "max_train_tokens")
    dev_fraction = cfg["dev_from_train"]
    paths = {split: _file(cfg, split) for split in ("train", "dev", "test")}
    if paths["train"] is None:
        raise LexpInputError(f"task {name}: files.train is required")
    if paths["dev"] is not None and dev_fraction is not None:
        raise LexpInputError(
            f"task {name}: both files.dev and dev_from_train are set; keep one (dev_from_train=null "
            "uses the dev file)"
        )
    if paths["dev"] is None and dev_fraction is None:
        raise LexpInputError(
            f"task {name}: no dev split. Every selection decision is made on dev: set files.dev, or "
            "dev_from_train (a fraction of train sentences carved off the end of train)"
        )

    splits: dict[str, list[Sentence]] = {}
    notes: dict[str, Any] = {"reader": "columns", "columns": read_kw}
    train = read_columns(paths["train"], **read_kw)  # type: ignore[arg-type]
    notes["train"] = {
        "file": str(paths["train"]),
        "sentences_read": len(train),
        "tokens_read": _n_tokens(train),
    }
    if dev_fraction is not None:
        fraction = _fraction(name, "dev_from_train", dev_fraction)
        n_dev = _round(len(train) * fraction)
        if not 0 < n_dev < len(train):
            raise LexpInputError(
                f"task {name}: dev_from_train={fraction} of {len(train)} train sentences leaves an empty split"
            )
        train, splits["dev"] = train[:-n_dev], train[-n_dev:]
        notes["dev"] = {
            "file": str(paths["train"]),
            "carved_from_train": (
                f"the last {fraction:.0%} of train sentences in file order ({n_dev} sentences, from "
                f"{splits['dev'][0].source}), carved before the token cap; disjoint from train"
            ),
            "sentences": n_dev,
            "tokens": _n_tokens(splits["dev"]),
        }
    if max_train_tokens is not None:
        kept = cap_tokens(train, max_train_tokens)
        if not kept:
            raise LexpInputError(
                f"task {name}: max_train_tokens={max_train_tokens} is smaller than the first train "
                f"sentence ({train[0].source}); raise it or set it to null"
            )
        notes["train"]["max_train_tokens"] = max_train_tokens
        notes["train"]["cap"] = (
            "first whole sentences whose cumulative token count stays <= max_train_tokens; the "
            "sentence that would cross the cap and all later ones are left out"
        )
        train = kept
    splits["train"] = train
    notes["train"].update(sentences=len(train), tokens=_n_tokens(train))
    for split in ("dev", "test"):
        if split in splits:
            continue
        if paths[split] is None:
            notes[split] = "no file configured: the split is absent"
            continue
        splits[split] = read_columns(paths[split], **read_kw)  # type: ignore[arg-type]
        notes[split] = {
            "file": str(paths[split]),
            "sentences": len(splits[split]),
            "tokens": _n_tokens(splits[split]),
        }
    joiner = cfg["multiword_joiner"]
    if joiner is not None:
        if not isinstance(joiner, str) or not joiner:
            raise LexpInputError(f"task {name}: multiword_joiner must be a non-empty string or null")
        counts = {}
        for split, sentences in splits.items():
            splits[split], counts[split] = _split_multiwords(sentences, joiner)
        notes["multiword_joiner"] = (
            f"{joiner!r} inside a word was replaced by a space (a multi-token expression such as "
            f"New{joiner}York stays one word with one label); words changed per split: {counts}"
        )
    files = list(dict.fromkeys(p for p in paths.values() if p is not None))
    ordered = {s: splits[s] for s in ("train", "dev", "test") if s in splits}
    labels = label_vocabulary(label for sentence in splits["train"] for label in sentence.labels)
    return TaskData(name=name, kind="labelling", splits=ordered, labels=labels, files=files, notes=notes)


def _split_multiwords(sentences: list[Sentence], joiner: str) -> tuple[list[Sentence], int]:
    changed = 0
    out = []
    for sentence in sentences:
        if any(joiner in word for word in sentence.words):
            words = tuple(word.replace(joiner, " ") if joiner in word else word for word in sentence.words)
            changed += sum(joiner in word for word in sentence.words)
            sentence = Sentence(words=words, labels=sentence.labels, source=sentence.source)
        out.append(sentence)
    return out, changed


# ------------------------------------------------------------------------------------------------ GLUE
#: The `files` entries each protocol reads; the others must be null so that nothing is ignored.
_PROTOCOL_FILES = {"split_train": ("train", "test"), "pool": ("pool",), "as_is": ("train", "dev", "test")}


class _GlueFiles:
    """Reads the configured GLUE files, remembering every file read and every repaired row."""

    def __init__(self, cfg: dict[str, Any], glue_task: str) -> None:
        self.cfg, self.glue_task = cfg, glue_task
        self.files: list[Path] = []
        self.repairs: list[str] = []

    def read(self, key: str, value: Any) -> list[Example]:
        path = _path(self.cfg, key, value)
        if path is None:
            raise LexpInputError(f"task {self.cfg['name']}: protocol {self.cfg['protocol']!r} needs {key}")
        self.files.append(path)
        return read_glue(self.glue_task, path, repairs=self.repairs)


def _load_glue(cfg: dict[str, Any]) -> TaskData:
    name = cfg["name"]
    glue_task = cfg["glue_task"] or name
    if glue_task not in FORMATS:
        raise LexpInputError(
            f"task {name}: set task.glue_task to the file format, one of {sorted(FORMATS)} (got {glue_task!r})"
        )
    fmt = glue_format(glue_task)
    if (cfg.get("kind") or fmt.kind) != fmt.kind:
        raise LexpInputError(f"task {name}: GLUE {glue_task} is a {fmt.kind} task; set kind: {fmt.kind}")
    protocol = cfg["protocol"]
    if protocol not in _PROTOCOL_FILES:
        raise LexpInputError(
            f"task {name}: protocol must be one of {list(_PROTOCOL_FILES)}, got {protocol!r}"
        )
    seed = cfg["split_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LexpInputError(f"task {name}: split_seed must be an integer, got {seed!r}")
    _check_files_keys(cfg, ("train", "dev", "test", "pool"))
    for key, value in cfg["files"].items():
        if value is not None and key not in _PROTOCOL_FILES[protocol]:
            why = " (it carves dev from train; protocol: as_is uses a dev file)" if key == "dev" else ""
            raise LexpInputError(
                f"task {name}: protocol {protocol!r} does not read files.{key}{why}; set files.{key}: null"
            )

    reader = _GlueFiles(cfg, glue_task)
    if protocol == "split_train":
        splits, notes = _split_train(cfg, reader, seed)
    elif protocol == "pool":
        splits, notes = _split_pool(cfg, reader, seed)
    else:
        splits, notes = {}, {}
        for split in ("train", "dev", "test"):
            if split == "test" and cfg["files"].get("test") is None:
                notes["test"] = "no file configured: the split is absent"
                continue
            splits[split] = reader.read(f"files.{split}", cfg["files"].get(split))
            notes[split] = {"source": f"{reader.files[-1].name} as is, in file order"}
    for split, key in (("train", "max_train_examples"), ("test", "max_test_examples")):
        cap = _optional_int(cfg, key)
        if split in splits:
            notes[split]["examples_before_cap"] = len(splits[split])
            if cap is not None and cap < len(splits[split]):
                splits[split] = splits[split][:cap]
                notes[split]["cap"] = f"{key}={cap}: the first {cap} examples in split order"
    for split, items in splits.items():
        notes[split]["examples"] = len(items)
    notes = {"reader": "glue", "glue_task": glue_task, "protocol": protocol, **notes}
    if reader.repairs:
        notes["repaired_rows"] = reader.repairs
    labels = [] if fmt.kind == "regression" else label_vocabulary(str(e.label) for e in splits["train"])
    return TaskData(
        name=name,
        kind=fmt.kind,
        splits=splits,
        labels=labels,
        files=list(dict.fromkeys(reader.files)),
        notes=notes,
    )


def _split_train(cfg: dict[str, Any], reader: _GlueFiles, seed: int) -> tuple[dict, dict]:
    """The paper's protocol: official train -> train/dev by a seeded permutation; official dev = test."""
    fraction = _fraction(cfg["name"], "dev_fraction", cfg["dev_fraction"])
    official = reader.read("files.train", cfg["files"].get("train"))
    train_file = reader.files[-1].name
    n_dev = _round(len(official) * fraction)
    dev_idx, train_idx = seeded_split(len(official), [n_dev, len(official) - n_dev], seed)
    test = reader.read("files.test", cfg["files"].get("test"))
    rule = f"seeded permutation (numpy default_rng, split_seed={seed}) of its {len(official)} rows"
    splits = {
        "train": [official[i] for i in train_idx],
        "dev": [official[i] for i in dev_idx],
        "test": test,
    }
    notes = {
        "train": {"source": f"{1 - fraction:.0%} of {train_file} (files.train), {rule}"},
        "dev": {"source": f"the other {fraction:.0%} of {train_file}; disjoint from train"},
        "test": {"source": f"{reader.files[-1].name} (files.test; GLUE's official dev) in file order"},
    }
    return splits, notes


def _split_pool(cfg: dict[str, Any], reader: _GlueFiles, seed: int) -> tuple[dict, dict]:
    """Tasks without a train file here: one seeded permutation of all labelled rows -> train/dev/test."""
    name = cfg["name"]
    pool_files = cfg["files"].get("pool")
    if not isinstance(pool_files, list) or not pool_files:
        raise LexpInputError(f"task {name}: protocol 'pool' needs files.pool, a list of labelled files")
    fractions = cfg["pool_fractions"] or {}
    if set(fractions) != {"train", "dev", "test"}:
        raise LexpInputError(f"task {name}: pool_fractions must give train, dev and test, got {fractions!r}")
    f = {split: _fraction(name, f"pool_fractions.{split}", fractions[split]) for split in fractions}
    if not math.isclose(sum(f.values()), 1.0, abs_tol=1e-9):
        raise LexpInputError(f"task {name}: pool_fractions must sum to 1, got {fractions!r}")
    pool: list[Example] = []
    for i, value in enumerate(pool_files):
        pool += reader.read(f"files.pool[{i}]", value)
    n_dev, n_test = _round(len(pool) * f["dev"]), _round(len(pool) * f["test"])
    dev_idx, test_idx, train_idx = seeded_split(len(pool), [n_dev, n_test, len(pool) - n_dev - n_test], seed)
    splits = {
        "train": [pool[i] for i in train_idx],
        "dev": [pool[i] for i in dev_idx],
        "test": [pool[i] for i in test_idx],
    }
    rule = (
        f"one seeded permutation (numpy default_rng, split_seed={seed}) of the {len(pool)} labelled rows "
        f"of {' + '.join(p.name for p in reader.files)}; dev = its first {n_dev}, test = the next "
        f"{n_test}, train = the rest"
    )
    notes = {split: {"source": f"{f[split]:.0%} of the pool: {rule}"} for split in ("train", "dev", "test")}
    return splits, notes
