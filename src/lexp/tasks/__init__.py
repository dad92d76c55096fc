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
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lexp.errors import LexpInputError
from lexp.tasks.base import Example, Sentence, TaskData, label_vocabulary
from lexp.tasks.glue import FORMATS, glue_format, read_glue
from lexp.tasks.readers import comment_prefix_value, read_columns, separator_value

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

_COMMON_KEYS = {"name", "kind", "reader", "data_dir", "files", "control"}
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
    "pmb_layer": None,
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
    control = cfg.get("control", False)
    if control is not None and not isinstance(control, bool):
        raise LexpInputError(f"task {name}: `control` must be true or false, got {control!r}")
    if control and reader not in ("columns", "table_tokens"):
        raise LexpInputError(
            f"task {name}: task.control=true (Hewitt & Liang's control task) relabels word types, so it "
            "is defined for word-level tasks (reader: columns) only. Fix: task.control=false"
        )
    if reader == "columns":
        return _load_labelling(_settings(cfg, _COLUMN_DEFAULTS))
    if reader == "glue":
        return _load_glue(_settings(cfg, _GLUE_DEFAULTS))
    if reader in ("table_sentences", "table_tokens"):  # CSV/TSV/JSONL/Parquet/datasets (tabular.py)
        from lexp.tasks import tabular

        if reader == "table_sentences":
            return tabular.load_table_sentences(_settings(cfg, tabular.SENTENCE_DEFAULTS))
        return tabular.load_table_tokens(_settings(cfg, tabular.TOKEN_DEFAULTS))
    raise LexpInputError(
        f"task {name}: `reader` must be 'columns', 'glue', 'table_sentences' or 'table_tokens', got {reader!r}"
    )


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
    from lexp.fs import file_problem

    problem = file_problem(path)
    if problem is not None:
        raise LexpInputError(
            f"task {cfg['name']}: {key} = {str(path)!r} {problem}. Set LEXP_DATA (or "
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
    cfg["separator"] = separator_value(cfg["separator"])
    cfg["comment_prefix"] = comment_prefix_value(cfg["comment_prefix"])
    paths = {split: _file(cfg, split) for split in ("train", "dev", "test")}
    if paths["train"] is None:
        raise LexpInputError(f"task {name}: files.train is required")
    layout_note = _pmb_columns(cfg, paths) if cfg["pmb_layer"] is not None else None
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
    if cfg["pmb_layer"] is not None:
        _check_pmb_labels(cfg, paths["train"], train)
        notes["pmb_layout"] = layout_note
    notes["train"] = {
        "file": str(paths["train"]),
        "sentences_read": len(train),
        "tokens_read": _n_tokens(train),
    }
    train = carve_and_cap(
        name, train, dev_fraction, max_train_tokens, {"file": str(paths["train"])}, splits, notes
    )
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


# ------------------------------------------------------------------------------------ PMB layouts
#: Column layouts of the PMB gold CoNLL exports, by column count (the files' header comment, when
#: present, names the columns and wins). 4.0.0 repeats `tok`; 3.0.0 has it once.
PMB_LAYOUTS: dict[int, tuple[str, tuple[str, ...]]] = {
    7: ("PMB 4.0.0", ("tok", "tok", "sym", "sem", "cat", "sns", "rol")),
    6: ("PMB 3.0.0", ("tok", "sym", "sem", "cat", "sns", "rol")),
}
#: What each layer's labels look like, checked on the train labels: a column read by mistake
#: (lemmas, senses, roles, the other layer) fails it. Sem tags are three capital letters (CON,
#: NIL ...); CCG categories are mostly slashed ((s:dcl\np)/np), the rest atomic (n, np, conj, .).
PMB_LABEL_CHECKS = {
    "sem": (
        "sem tags: three capital letters such as CON, DIS, NIL",
        lambda t: bool(_SEM_TAG.fullmatch(t)),
        0.9,
    ),
    "cat": (
        "CCG categories, mostly with slashes such as (s:dcl\\np)/np",
        lambda t: "/" in t or "\\" in t,
        0.5,
    ),
}
_SEM_TAG = re.compile(r"[A-Z]{3}")


def _layout_names(text: str) -> str:
    return ", ".join(f"{i}={n}" for i, n in enumerate(text.split(", ")))


def _pmb_columns(cfg: dict[str, Any], paths: Mapping[str, Path | None]) -> str:
    """Find the ``pmb_layer`` column of every file from its layout; fill in label/min columns.

    ``label_column``/``min_columns`` null: taken from the layout. Set: checked against it, so a
    number that points at another layer is refused, never read silently.
    """
    from lexp.tasks.readers import column_layout

    name, layer = cfg["name"], cfg["pmb_layer"]
    if layer not in PMB_LABEL_CHECKS:
        raise LexpInputError(
            f"task {name}: pmb_layer must be one of {sorted(PMB_LABEL_CHECKS)} or null, got {layer!r}"
        )
    known = "; ".join(f"{v}: {len(cols)} columns {', '.join(cols)}" for v, cols in PMB_LAYOUTS.values())
    found: dict[str, tuple[str, tuple[str, ...], int]] = {}
    for split, path in paths.items():
        if path is None:
            continue
        layout = column_layout(path, cfg["separator"], cfg["comment_prefix"])
        if layout.header is not None:
            names = layout.header
            how = f"{PMB_LAYOUTS.get(len(names), ('PMB',))[0]} column header at line {layout.header_line}"
        elif layout.n_columns in PMB_LAYOUTS:
            how, names = PMB_LAYOUTS[layout.n_columns]
            how += f" ({layout.n_columns} columns, no column header)"
        elif cfg["label_column"] is not None:  # described by hand: only the label check applies
            return (
                f"unknown layout ({layout.n_columns} columns, no column header): label_column="
                f"{cfg['label_column']} as set, its labels checked to look like {layer}"
            )
        else:
            raise LexpInputError(
                f"task {name}: {path}:{layout.first_line}: cannot tell which column holds the PMB "
                f"{layer} layer: the token lines have {layout.n_columns} columns and no column header "
                f"comment ('# tok:gold<TAB>sym:gold ...') precedes them. Known layouts: {known}. Fix: "
                f"describe this file's layout, all of task.word_column=<column of the token> "
                f"task.label_column=<column of {layer}> task.min_columns={layout.n_columns} (0-based "
                f"columns; task.pmb_layer={layer} then still checks that the labels look like {layer}), "
                "or point task.files at a PMB 3.0.0/4.0.0 export."
            )
        if layer not in names or "tok" not in names:
            raise LexpInputError(
                f"task {name}: {path}: the columns ({how}: {', '.join(names)}) have no {layer!r} and "
                f"'tok' column. Fix: export the {layer} layer, or set task.pmb_layer=null and "
                "task.word_column / task.label_column / task.min_columns by hand."
            )
        found[split] = (how, names, names.index(layer))
    how, names, column = found["train"]
    for split, (other_how, other_names, _) in found.items():
        if other_names != names:
            raise LexpInputError(
                f"task {name}: files.{split} has another column layout ({other_how}: "
                f"{', '.join(other_names)}) than files.train ({how}: {', '.join(names)}). Fix: use files "
                "of one PMB release."
            )
    settings = {"word_column": names.index("tok"), "label_column": column, "min_columns": len(names)}
    for key, value in settings.items():
        if cfg[key] is None:
            cfg[key] = value
        elif cfg[key] != value and not (key == "min_columns" and cfg[key] <= value):
            raise LexpInputError(
                f"task {name}: {key}={cfg[key]} does not match the {layer} layer of {paths['train']} "
                f"({how}: columns {_layout_names(', '.join(names))}), where {key} is {value}. Fix: "
                f"task.{key}=null (taken from the layout) or task.{key}={value}"
            )
    return f"{how}: columns {', '.join(names)}; {layer} = column {column} (0-based)"


def _check_pmb_labels(cfg: dict[str, Any], path: Path, sentences: Sequence[Sentence]) -> None:
    """Refuse labels that do not look like the layer (a wrong column is never read silently)."""
    layer = cfg["pmb_layer"]
    what, looks_right, share = PMB_LABEL_CHECKS[layer]
    vocab = sorted({label for s in sentences for label in s.labels})
    good = sum(map(looks_right, vocab))
    if vocab and good >= share * len(vocab):
        return
    odd = [t for t in vocab if not looks_right(t)][:6]
    raise LexpInputError(
        f"task {cfg['name']}: column {cfg['label_column']} of {path} does not hold the PMB {layer} layer: "
        f"only {good} of its {len(vocab)} distinct labels look like {what} (others: "
        f"{', '.join(map(repr, odd))}). Fix: task.label_column=null to take the {layer} column from the "
        "file's layout, or point task.label_column (0-based) at the right column."
    )


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
    reader = _GlueFiles(cfg, glue_task)
    splits, notes = protocol_splits(cfg, reader)
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


def carve_and_cap(
    name: str,
    train: list[Sentence],
    dev_fraction: Any,
    max_train_tokens: int | None,
    where: dict[str, str],
    splits: dict[str, list[Sentence]],
    notes: dict[str, Any],
) -> list[Sentence]:
    """The word-task protocol on the train sentences read: ``dev_from_train`` carves the last
    sentences into ``splits["dev"]`` (before the cap), then ``max_train_tokens`` keeps the first
    whole sentences within the cap. Returns the train split; ``notes`` says what was done, with
    ``where`` (``{"file": ...}`` or ``{"source": ...}``) naming the input. Shared by the column
    reader and ``lexp.tasks.tabular``'s custom_tokens."""
    if dev_fraction is not None:
        fraction = _fraction(name, "dev_from_train", dev_fraction)
        n_dev = _round(len(train) * fraction)
        if not 0 < n_dev < len(train):
            raise LexpInputError(
                f"task {name}: dev_from_train={fraction} of {len(train)} train sentences leaves an empty split"
            )
        train, splits["dev"] = train[:-n_dev], train[-n_dev:]
        notes["dev"] = {
            **where,
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
    return train


def protocol_splits(cfg: dict[str, Any], reader: Any) -> tuple[dict[str, list], dict[str, Any]]:
    """The GLUE protocols (``as_is`` | ``split_train`` | ``pool``) and the example caps over any
    sentence-level ``reader`` with ``.read(key, value) -> list[Example]`` and ``.files``: shared by
    the GLUE TSV loader and ``lexp.tasks.tabular`` so both carve and cap splits the same way."""
    name = cfg["name"]
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
    return splits, notes


def _split_train(cfg: dict[str, Any], reader: Any, seed: int) -> tuple[dict, dict]:
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


def _split_pool(cfg: dict[str, Any], reader: Any, seed: int) -> tuple[dict, dict]:
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
