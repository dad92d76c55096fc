"""Your own sentence and token datasets, stored the way the field stores them.

Two readers, both through ``pyarrow`` / ``datasets`` (never the network):

* ``reader: table_sentences`` (``task=custom_sentences``) — sentence(-pair) classification or
  regression: a text column, an optional second text column, a label column. Splits follow the
  GLUE protocols (``as_is``, ``split_train``: carve dev from train, ``pool``) of
  :mod:`lexp.tasks`, so fine-tuning, the [CLS] store and every analysis work as for GLUE.
* ``reader: table_tokens`` (``task=custom_tokens``) — word-level tasks: a list-of-words column and
  a list-of-tags column (the Hub's CoNLL-2003 / WikiANN / UD layout). Integer tags take their names
  from the dataset's ``ClassLabel`` feature when it has one, else stay integers. Splits follow the
  column reader (``dev_from_train``, ``max_train_tokens``).

Sources (``files.<split>``): ``.csv``, ``.tsv``, ``.jsonl`` (``.json`` holding JSON Lines),
``.parquet``, ``.arrow`` (one Arrow stream file, as ``datasets`` caches it) or a folder written by
``datasets.Dataset.save_to_disk``. With ``hf_name`` set, ``files.<split>`` are instead split names
of a dataset already in the local Hugging Face datasets cache (``hf_config`` picks the config).

Every bad row is one :class:`LexpInputError` naming the source, the 1-based data row (CSV/TSV:
counted after the header) and the fix, raised while reading — before any extraction. Labels in
dev/test unseen in train are kept and scored as errors (:meth:`TaskData.encode_labels`).
``TaskData.files`` lists every data file read (a folder's Arrow files and its metadata), so the
store fingerprint covers the data; the column choices are task settings, so it covers them too.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lexp.errors import LexpInputError
from lexp.tasks.base import Example, Sentence, TaskData, label_vocabulary

__all__ = [
    "SENTENCE_DEFAULTS",
    "TABLE_READERS",
    "TOKEN_DEFAULTS",
    "check_lengths",
    "load_table_sentences",
    "load_table_tokens",
    "read_table",
]

TABLE_READERS = ("table_sentences", "table_tokens")
_SOURCE_DEFAULTS: dict[str, Any] = {
    "format": "auto",
    "hf_name": None,
    "hf_config": None,
    "hf_cache_dir": None,
}
SENTENCE_DEFAULTS: dict[str, Any] = {
    **_SOURCE_DEFAULTS,
    "text_column": "text",
    "text_pair_column": None,
    "label_column": "label",
    "protocol": "as_is",
    "dev_fraction": 0.1,
    "split_seed": 42,
    "pool_fractions": None,
    "max_train_examples": None,
    "max_test_examples": None,
    "long_texts": "error",
}
TOKEN_DEFAULTS: dict[str, Any] = {
    **_SOURCE_DEFAULTS,
    "tokens_column": "tokens",
    "tags_column": "tags",
    "max_train_tokens": None,
    "dev_from_train": None,
}
FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "arrow", "disk")
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Table:
    """One split's rows as read: the Arrow table, its ``datasets`` features, the files behind it."""

    name: str  # what messages call it: a path, or "hf cache <name>/<config> split <split>"
    path: Path  # the file or folder (for notes: ``path.name``)
    fmt: str
    table: Any  # pyarrow.Table
    features: Any  # datasets.Features (ClassLabel names live here)
    files: list[Path]  # every file read, for the fingerprint

    def row(self, i: int) -> str:
        """``<name>: row <i+1>`` (1-based data row)."""
        return f"{self.name}: row {i + 1}"

    def column_names(self) -> list[str]:
        return list(self.table.column_names)


def _format_of(path: Path, fmt: str, task: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "disk"
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise LexpInputError(
            f"task {task}: {key} = {str(path)!r}: cannot tell the format from the suffix "
            f"{path.suffix!r}. Fix: task.format=csv|tsv|jsonl|parquet|arrow|disk, or use one of the "
            f"suffixes {sorted(_SUFFIXES)} (a folder is read as a datasets.save_to_disk folder)"
        )
    return found


def read_table(path: Path, fmt: str = "auto", *, task: str = "custom", key: str = "files.train") -> Table:
    """Read one file or ``save_to_disk`` folder into a :class:`Table` (nothing converted yet)."""
    import datasets
    import pyarrow as pa

    fmt = _format_of(path, fmt, task, key)
    if fmt not in FORMATS:
        raise LexpInputError(f"task {task}: format must be one of {list(FORMATS)}, got {fmt!r}")
    files = [path]
    try:
        if fmt in ("csv", "tsv"):
            from pyarrow import csv

            parse = csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", quote_char=fmt == "csv" and '"')
            # strings stay strings: "NA" or "" in a text column is text, not a missing value
            convert = csv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False)
            table = csv.read_csv(path, parse_options=parse, convert_options=convert)
        elif fmt == "jsonl":
            from pyarrow import json as pa_json

            table = pa_json.read_json(path)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif fmt == "arrow":
            table = datasets.Dataset.from_file(str(path)).data.table
        else:  # disk
            return _read_disk(path, task, key)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = {
            "jsonl": " A .json file must hold JSON Lines (one object per line), not one JSON array.",
            "csv": " CSV needs a header row naming the columns; quote fields that hold commas.",
            "tsv": " TSV needs a header row; every row needs as many tab-separated fields.",
        }.get(fmt, "")
        raise LexpInputError(
            f"task {task}: {key} = {path}: cannot read it as {fmt}: {first}.{hint} Fix: repair the file, "
            "or set task.format to its real format"
        ) from None
    features = _features(table)
    return Table(str(path), path, fmt, table, features, files)


def _features(table: Any) -> Any:
    """The ``datasets`` features of an Arrow table: ClassLabel names when the table carries
    ``datasets``' schema metadata (Parquet/Arrow written by ``datasets``), else inferred types."""
    import datasets

    try:
        return datasets.Features.from_arrow_schema(table.schema)
    except (TypeError, ValueError, KeyError):  # a type datasets cannot map: plain Arrow types suffice
        return None


def _read_disk(path: Path, task: str, key: str) -> Table:
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise LexpInputError(
            f"task {task}: {key} = {path} is a DatasetDict folder with splits {splits}; point it at one "
            f"split's folder, e.g. {key}={path / (splits[0] if splits else 'train')}"
        )
    if not (path / "state.json").is_file():
        raise LexpInputError(
            f"task {task}: {key} = {path} is a folder but not one written by datasets' save_to_disk "
            "(no state.json). Fix: point it at a save_to_disk folder or at a CSV/TSV/JSONL/Parquet file"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise LexpInputError(
            f"task {task}: {key} = {path}: cannot load this save_to_disk folder: {exc}"
        ) from None
    ds = ds.flatten_indices() if ds._indices is not None else ds
    files = sorted(Path(f["filename"]) for f in ds.cache_files)
    # dataset_info.json holds the features (ClassLabel names); state.json only bookkeeping
    files += [p for p in (path / "dataset_info.json",) if p.is_file()]
    return Table(str(path), path, "disk", ds.data.table, ds.features, files)


def hf_cache_table(
    name: str, config: str | None, split: str, *, cache_dir: str | None, task: str, key: str
) -> Table:
    """One split of a dataset already in the local Hugging Face datasets cache, never the network.

    The cache layout of ``datasets``: ``<cache>/<namespace>___<name>/<config>/<version>/<hash>/``
    holding ``dataset_info.json`` and ``<dataset>-<split>[-NNNNN-of-NNNNN].arrow``. The newest
    matching folder wins (as ``datasets`` does offline).
    """
    import datasets
    from datasets.naming import camelcase_to_snakecase

    root = Path(os.path.expanduser(str(cache_dir or datasets.config.HF_DATASETS_CACHE)))
    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    base = root / "___".join(parts)
    pattern = base / (config or "*") / "*" / "*" / "dataset_info.json"
    found = sorted((Path(p).parent for p in glob.glob(str(pattern))), key=lambda p: p.stat().st_mtime)
    configs = sorted({p.parent.parent.name for p in found})
    if not found:
        have = sorted(
            {Path(p).parent.parent.parent.name for p in glob.glob(str(base / "*/*/*/dataset_info.json"))}
        )
        raise LexpInputError(
            f"task {task}: task.hf_name={name!r}"
            + (f" task.hf_config={config!r}" if config else "")
            + f" is not in the local Hugging Face datasets cache: looked for {pattern}"
            + (f" (configs cached there: {have})" if have else f" ({base} does not exist)")
            + ". lexp reads the cache offline and never downloads. Fix: load it once where the Hub is "
            "reachable (datasets.load_dataset) and copy the cache, set task.hf_cache_dir (or "
            "HF_DATASETS_CACHE) to the cache folder, or save it with save_to_disk / to_parquet and set "
            "task.files to those"
        )
    if config is None and len(configs) > 1:
        raise LexpInputError(
            f"task {task}: the cache holds several configs of {name!r}: {configs}. Fix: task.hf_config=<one of them>"
        )
    folder = found[-1]
    info = json.loads((folder / "dataset_info.json").read_text())
    splits = sorted((info.get("splits") or {}).keys())
    arrows = sorted(Path(p) for p in glob.glob(str(folder / f"*-{glob.escape(split)}.arrow")))
    arrows += sorted(Path(p) for p in glob.glob(str(folder / f"*-{glob.escape(split)}-*-of-*.arrow")))
    if not arrows:
        raise LexpInputError(
            f"task {task}: {key}={split!r}: the cached {name!r} ({folder}) has no split {split!r}; its "
            f"splits: {splits}. Fix: {key}=<one of them> (or null)"
        )
    dsets = [datasets.Dataset.from_file(str(p)) for p in arrows]
    ds = dsets[0] if len(dsets) == 1 else datasets.concatenate_datasets(dsets)
    label = f"hf cache {name}/{folder.parent.parent.name} split {split} ({folder})"
    return Table(
        label, arrows[0], "arrow", ds.data.table, ds.features, [*arrows, folder / "dataset_info.json"]
    )


# ---------------------------------------------------------------------------------------- columns
def _column(t: Table, column: Any, key: str, task: str) -> Any:
    if not isinstance(column, str) or not column:
        raise LexpInputError(f"task {task}: task.{key} must be a column name, got {column!r}")
    if column not in t.table.column_names:
        raise LexpInputError(
            f"task {task}: {t.name} has no column {column!r} (task.{key}); its columns: "
            f"{t.column_names()}. Fix: task.{key}=<one of them>"
        )
    return t.table.column(column)


def _first_null(values: Sequence[Any]) -> int | None:
    return next((i for i, v in enumerate(values) if v is None), None)


def _no_nulls(t: Table, values: Sequence[Any], column: str, task: str) -> None:
    i = _first_null(values)
    if i is not None:
        n = sum(v is None for v in values)
        raise LexpInputError(
            f"task {task}: {t.row(i)}: column {column!r} is empty (null); {n} row(s) of this split are. "
            "lexp never drops rows silently. Fix: fill or remove these rows in the file"
        )


def _class_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of the ClassLabel inside a list feature."""
    import datasets

    if isinstance(feature, list | tuple) and len(feature) == 1:
        feature = feature[0]
    inner = getattr(feature, "feature", None)
    if inner is not None and not isinstance(feature, datasets.ClassLabel):
        feature = inner
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _texts(t: Table, column: str, key: str, task: str) -> list[str]:
    import pyarrow as pa

    col = _column(t, column, key, task)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise LexpInputError(
            f"task {task}: column {column!r} of {t.name} holds {col.type} values, not text (task.{key}). "
            "Fix: point task.{key} at the text column".replace("{key}", key)
        )
    values = col.to_pylist()
    _no_nulls(t, values, column, task)
    _no_empty(t, values, column, task, "text", "remove the row or fill in its text")
    return values


def _no_empty(t: Table, values: Sequence[str], column: str, task: str, what: str, fix: str) -> None:
    """One error naming the first blank string of ``column`` (texts and labels alike)."""
    for i, v in enumerate(values):
        if not v.strip():
            raise LexpInputError(
                f"task {task}: {t.row(i)}: column {column!r} holds an empty {what}. Fix: {fix}"
            )


def _int_labels(
    values: Sequence[Any], names: list[str] | None, column: str, task: str, where: Callable[[int], str]
) -> list[str]:
    """Integer labels as strings: their ClassLabel names when there are some, else the integers."""
    if names is None:
        return [str(v) for v in values]
    out = []
    for i, v in enumerate(values):
        if not 0 <= v < len(names):
            why = " (-1 is datasets' 'no label', as in unlabelled test splits)" if v == -1 else ""
            raise LexpInputError(
                f"task {task}: {where(i)}: label {v} of column {column!r} is outside its ClassLabel names "
                f"(0..{len(names) - 1}: {names[:8]}{' ...' if len(names) > 8 else ''}){why}. Fix: use a "
                "labelled split, or correct the label"
            )
        out.append(names[v])
    return out


def _labels(t: Table, column: str, kind: str, task: str) -> list[str] | list[float]:
    """Classification: label strings (ClassLabel ids become names); regression: floats."""
    import pyarrow as pa

    col = _column(t, column, "label_column", task)
    values = col.to_pylist()
    _no_nulls(t, values, column, task)
    names = _class_names(t.features[column]) if t.features is not None and column in t.features else None
    typ = col.type
    if kind == "regression":
        if names is not None or not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            raise LexpInputError(
                f"task {task}: column {column!r} of {t.name} holds {'class labels' if names else typ} "
                "values, not numbers, but task.kind=regression. Fix: task.kind=classification, or point "
                "task.label_column at a numeric column"
            )
        for i, v in enumerate(values):
            if not math.isfinite(float(v)):
                raise LexpInputError(f"task {task}: {t.row(i)}: label {v} of column {column!r} is not finite")
        return [float(v) for v in values]
    if pa.types.is_floating(typ):
        raise LexpInputError(
            f"task {task}: column {column!r} of {t.name} holds floating-point labels ({values[0]!r} ...) "
            "but task.kind=classification. Fix: task.kind=regression for scores, or store the classes "
            "as integers or strings"
        )
    if pa.types.is_integer(typ):
        return _int_labels(values, names, column, task, t.row)
    if pa.types.is_boolean(typ):
        return [str(v).lower() for v in values]
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        _no_empty(t, values, column, task, "label", "fill it in or remove the row")
        return values
    raise LexpInputError(
        f"task {task}: column {column!r} of {t.name} holds {typ} values; a class label must be a string, "
        "an integer or a ClassLabel. Fix: point task.label_column at the label column"
    )


def _lists(t: Table, column: str, key: str, task: str) -> tuple[list[list[Any]], Any]:
    """A list column as Python lists (+ its element type); CSV/TSV cells may hold JSON arrays."""
    import pyarrow as pa

    col = _column(t, column, key, task)
    typ = col.type
    values = col.to_pylist()
    _no_nulls(t, values, column, task)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return values, typ.value_type
    if t.fmt in ("csv", "tsv") and (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        out = []
        for i, cell in enumerate(values):
            try:
                parsed = json.loads(cell)
            except json.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, list):
                raise LexpInputError(
                    f"task {task}: {t.row(i)}: column {column!r} must hold a JSON array such as "
                    f'["The","cat"] in a {t.fmt.upper()} cell, got {cell[:40]!r}. Fix: write the lists '
                    "as JSON arrays, or use JSON Lines / Parquet / save_to_disk"
                )
            out.append(parsed)
        kinds = {type(x) for row in out for x in row if x is not None}
        return out, pa.int64() if kinds and kinds <= {int} else pa.string()
    raise LexpInputError(
        f"task {task}: column {column!r} of {t.name} holds {typ} values, not lists (task.{key}): a token "
        "task needs one list of words and one list of tags per sentence. Fix: point "
        f"task.{key} at the list column (its columns: {t.column_names()})"
    )


def read_sentences(t: Table, cfg: Mapping[str, Any]) -> list[Sentence]:
    """The labelled sentences of one token-task table."""
    import pyarrow as pa

    task, tcol, gcol = cfg["name"], cfg["tokens_column"], cfg["tags_column"]
    words, wtype = _lists(t, tcol, "tokens_column", task)
    tags, gtype = _lists(t, gcol, "tags_column", task)
    if not (pa.types.is_string(wtype) or pa.types.is_large_string(wtype)):
        raise LexpInputError(
            f"task {task}: column {tcol!r} of {t.name} holds lists of {wtype}, not words. Fix: point "
            "task.tokens_column at the list-of-words column"
        )
    names = _class_names(t.features[gcol]) if t.features is not None and gcol in t.features else None
    integer = pa.types.is_integer(gtype)
    if not (
        integer or pa.types.is_string(gtype) or pa.types.is_large_string(gtype) or pa.types.is_null(gtype)
    ):
        raise LexpInputError(
            f"task {task}: column {gcol!r} of {t.name} holds lists of {gtype}; tags must be strings, integers "
            "or ClassLabel ids. Fix: point task.tags_column at the list-of-tags column"
        )
    out = []
    for i, (ws, gs) in enumerate(zip(words, tags, strict=True)):
        where = t.row(i)
        if not ws:
            raise LexpInputError(
                f"task {task}: {where}: the sentence has no words (column {tcol!r} is an empty list). "
                "Fix: remove the row"
            )
        if len(ws) != len(gs):
            raise LexpInputError(
                f"task {task}: {where}: {len(ws)} words in {tcol!r} but {len(gs)} tags in {gcol!r}; every "
                "word needs exactly one tag. Fix: correct this row"
            )
        for j, (w, g) in enumerate(zip(ws, gs, strict=True)):
            if w is None or g is None:
                raise LexpInputError(
                    f"task {task}: {where}: word {j + 1} has a null {'word' if w is None else 'tag'}. "
                    "Fix: fill it in or remove the row"
                )
            if not isinstance(w, str) or not w.strip():
                raise LexpInputError(
                    f"task {task}: {where}: word {j + 1} is {w!r}, not a word. Fix: remove empty words"
                )
        if integer:
            labels = _int_labels(gs, names, gcol, task, lambda j, where=where: f"{where}, word {j + 1}")
        else:
            if any(not isinstance(g, str) or not g.strip() for g in gs):
                raise LexpInputError(
                    f"task {task}: {where}: an empty or non-string tag in {gcol!r}. Fix: fill it in"
                )
            labels = list(gs)
        out.append(Sentence(words=tuple(ws), labels=tuple(labels), source=where))
    return out


def read_examples(t: Table, cfg: Mapping[str, Any]) -> list[Example]:
    """The examples of one sentence-task table."""
    task = cfg["name"]
    kind = cfg.get("kind") or "classification"
    text_a = _texts(t, cfg["text_column"], "text_column", task)
    pair = cfg["text_pair_column"]
    text_b: list[str | None] = _texts(t, pair, "text_pair_column", task) if pair else [None] * len(text_a)
    labels = _labels(t, cfg["label_column"], kind, task)
    return [
        Example(text_a=a, text_b=b, label=y, source=t.row(i))
        for i, (a, b, y) in enumerate(zip(text_a, text_b, labels, strict=True))
    ]


# ---------------------------------------------------------------------------------------- splits
class _Sources:
    """Reads the configured splits (files or cached HF splits), remembering every file read."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.files: list[Path] = []  # one path per split read (notes name them)
        self.data_files: list[Path] = []  # every file behind them (the fingerprint)
        self.repairs: list[str] = []  # the GLUE protocol helpers read it; tables are never repaired
        self.declared: set[str] = set()  # ClassLabel names of the training files' label column

    def declare(self, t: Table, column: str) -> None:
        """Remember the classes a training file declares (its ClassLabel names), if any."""
        names = _class_names(t.features[column]) if t.features is not None and column in t.features else None
        self.declared.update(names or ())

    def table(self, key: str, value: Any) -> Table:
        cfg, task = self.cfg, self.cfg["name"]
        if value is None:
            raise LexpInputError(f"task {task}: {key} is required here; set task.{key}")
        if cfg["hf_name"]:
            if not isinstance(value, str) or not value or value == "???":
                raise LexpInputError(
                    f"task {task}: with task.hf_name set, {key} is a split name of the cached dataset "
                    f"(train, validation, test ...), got {value!r}. Fix: task.{key}=train"
                )
            t = hf_cache_table(
                str(cfg["hf_name"]),
                cfg["hf_config"],
                value,
                cache_dir=cfg["hf_cache_dir"],
                task=task,
                key=key,
            )
        else:
            t = read_table(_source_path(cfg, key, value), str(cfg["format"]), task=task, key=key)
        if t.table.num_rows == 0:
            raise LexpInputError(
                f"task {task}: {key}: {t.name} has no rows (an empty split). Fix: point {key} at a split "
                "with data" + (", or set it to null" if not key.endswith("train") else "")
            )
        self.files.append(t.path)
        self.data_files += [f for f in t.files if f not in self.data_files]
        return t

    def read(self, key: str, value: Any) -> list[Example]:
        t = self.table(key, value)
        examples = read_examples(t, self.cfg)
        if key == "files.train" or key.startswith("files.pool"):
            self.declare(t, self.cfg["label_column"])
        return examples


def _source_path(cfg: dict[str, Any], key: str, value: Any) -> Path:
    """``files.<split>`` resolved against ``data_dir``: a file or a ``save_to_disk`` folder."""
    task = cfg["name"]
    if value == "???":
        raise LexpInputError(
            f"task {task}: {key} is not set; override it, e.g. task.{key}=/path/to/train.csv"
        )
    if not isinstance(value, str) or not value:
        raise LexpInputError(f"task {task}: {key} must be a path or null, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        if not cfg.get("data_dir"):
            raise LexpInputError(f"task {task}: {key} = {value!r} is relative but task.data_dir is not set")
        path = Path(str(cfg["data_dir"])).expanduser() / path
    if not path.exists():
        raise LexpInputError(
            f"task {task}: {key} = {str(path)!r} does not exist. Fix: task.{key}=<a CSV/TSV/JSONL/Parquet "
            "file or a save_to_disk folder>, or set task.data_dir"
        )
    return path.resolve()


def _check_source_keys(cfg: dict[str, Any]) -> None:
    task = cfg["name"]
    fmt = cfg["format"]
    if fmt not in FORMATS:
        raise LexpInputError(f"task {task}: format must be one of {list(FORMATS)}, got {fmt!r}")
    if cfg["hf_name"] is None and (cfg["hf_config"] is not None or cfg["hf_cache_dir"] is not None):
        raise LexpInputError(
            f"task {task}: hf_config / hf_cache_dir need task.hf_name (the cached dataset's name)"
        )
    if cfg["hf_name"] is not None and not isinstance(cfg["hf_name"], str):
        raise LexpInputError(
            f"task {task}: hf_name must be a dataset name such as conll2003, got {cfg['hf_name']!r}"
        )


def load_table_sentences(cfg: dict[str, Any]) -> TaskData:
    """``reader: table_sentences``: ``cfg`` merged with :data:`SENTENCE_DEFAULTS` by ``load_task``."""
    from lexp.tasks import protocol_splits

    name = cfg["name"]
    kind = cfg.get("kind") or "classification"
    if kind not in ("classification", "regression"):
        raise LexpInputError(
            f"task {name}: reader table_sentences reads classification or regression tasks, got kind "
            f"{kind!r}. Fix: task.kind=classification|regression (word-level tasks: task=custom_tokens)"
        )
    cfg["kind"] = kind
    _check_source_keys(cfg)
    if cfg["long_texts"] not in ("error", "truncate"):
        raise LexpInputError(f"task {name}: long_texts must be error or truncate, got {cfg['long_texts']!r}")
    protocol = cfg["protocol"]
    reader = _Sources(cfg)
    splits, notes = protocol_splits(cfg, reader)
    notes = {"reader": "table_sentences", "protocol": protocol, "columns": _column_notes(cfg), **notes}
    labels = [] if kind == "regression" else _vocabulary((str(e.label) for e in splits["train"]), reader)
    return TaskData(name=name, kind=kind, splits=splits, labels=labels, files=reader.data_files, notes=notes)


def _vocabulary(train_labels: Any, reader: _Sources) -> list[str]:
    """The train labels, widened to every class the training file's ClassLabel feature declares:
    such a dataset fixes its classes, so a class absent from a small train split is still one of
    them (as for a built-in task capped with ``limit.train``). Sorted; class id = index."""
    return label_vocabulary([*train_labels, *reader.declared])


def _column_notes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("text_column", "text_pair_column", "label_column", "tokens_column", "tags_column")
    source = {k: cfg[k] for k in ("hf_name", "hf_config") if cfg.get(k)}
    return {**source, **{k: cfg[k] for k in keys if k in cfg}}


def load_table_tokens(cfg: dict[str, Any]) -> TaskData:
    """``reader: table_tokens``: ``cfg`` merged with :data:`TOKEN_DEFAULTS` by ``load_task``.

    The splits follow the column reader: ``dev_from_train`` carves the last sentences of train
    (before the cap), ``max_train_tokens`` keeps the first whole sentences within the cap.
    """
    from lexp.tasks import _check_files_keys, _n_tokens, _optional_int, carve_and_cap

    name = cfg["name"]
    if (cfg.get("kind") or "labelling") != "labelling":
        raise LexpInputError(
            f"task {name}: reader table_tokens reads word-level (labelling) tasks; set task.kind=labelling "
            "(sentence tasks: task=custom_sentences)"
        )
    _check_source_keys(cfg)
    _check_files_keys(cfg, ("train", "dev", "test"))
    files = cfg["files"]
    dev_fraction = cfg["dev_from_train"]
    if files.get("dev") is not None and dev_fraction is not None:
        raise LexpInputError(f"task {name}: both files.dev and dev_from_train are set; keep one")
    if files.get("dev") is None and dev_fraction is None:
        raise LexpInputError(
            f"task {name}: no dev split. Every selection decision is made on dev: set files.dev, or "
            "dev_from_train (a fraction of train sentences carved off the end of train)"
        )
    reader = _Sources(cfg)
    splits: dict[str, list[Sentence]] = {}
    notes: dict[str, Any] = {"reader": "table_tokens", "columns": _column_notes(cfg)}
    t = reader.table("files.train", files.get("train"))
    train = read_sentences(t, cfg)
    reader.declare(t, cfg["tags_column"])
    notes["train"] = {"source": t.name, "sentences_read": len(train), "tokens_read": _n_tokens(train)}
    max_train_tokens = _optional_int(cfg, "max_train_tokens")
    train = carve_and_cap(name, train, dev_fraction, max_train_tokens, {"source": t.name}, splits, notes)
    splits["train"] = train
    notes["train"].update(sentences=len(train), tokens=_n_tokens(train))
    for split in ("dev", "test"):
        if split in splits:
            continue
        if files.get(split) is None:
            notes[split] = "no file configured: the split is absent"
            continue
        t = reader.table(f"files.{split}", files[split])
        splits[split] = read_sentences(t, cfg)
        notes[split] = {"source": t.name, "sentences": len(splits[split]), "tokens": _n_tokens(splits[split])}
    ordered = {s: splits[s] for s in ("train", "dev", "test") if s in splits}
    labels = _vocabulary((label for sentence in ordered["train"] for label in sentence.labels), reader)
    return TaskData(
        name=name, kind="labelling", splits=ordered, labels=labels, files=reader.data_files, notes=notes
    )


# ---------------------------------------------------------------------------------------- lengths
def check_lengths(task: TaskData, tokenizer: Any, limit: int | None, *, fix: str) -> None:
    """Refuse inputs longer than ``limit`` subword tokens (incl. special tokens) before any extraction
    or fine-tuning: one error naming the first such rows of every split and ``fix``."""
    if limit is None:
        return
    for split, items in task.splits.items():
        if not items:
            continue
        if task.kind == "labelling":
            enc = tokenizer(
                [list(s.words) for s in items], is_split_into_words=True, truncation=False, verbose=False
            )
        else:
            a = [e.text_a for e in items]
            b = [e.text_b for e in items]
            enc = tokenizer(a, b if b[0] is not None else None, truncation=False, verbose=False)
        lengths = [len(ids) for ids in enc["input_ids"]]
        long = [i for i, n in enumerate(lengths) if n > limit]
        if long:
            shown = "; ".join(f"{items[i].source} ({lengths[i]} tokens)" for i in long[:3])
            raise LexpInputError(
                f"task {task.name}: {len(long)} {split} {'sentences' if task.kind == 'labelling' else 'examples'} "
                f"are longer than the {limit} subword tokens the model takes (incl. special tokens): {shown}"
                f"{' ...' if len(long) > 3 else ''}. lexp never truncates silently. Fix: {fix}"
            )


def check_model_lengths(
    task: TaskData, model_dir: str | Path, *, max_seq_length: int, long_sentences: str, long_texts: str
) -> None:
    """:func:`check_lengths` with the model's tokenizer and limit, as the run will use them:
    sentence tasks ``finetune.max_seq_length`` (unless ``task.long_texts=truncate``), word tasks the
    model maximum (unless ``extract.long_sentences=window``)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from lexp.encoders.loading import model_max_tokens

    if task.kind == "labelling" and long_sentences != "error":
        return
    if task.kind != "labelling" and long_texts != "error":
        return
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if task.kind == "labelling":
        limit = model_max_tokens(
            SimpleNamespace(config=AutoConfig.from_pretrained(str(model_dir))), tokenizer
        )
        fix = (
            "encode them in overlapping windows (extract.long_sentences=window), or split these sentences "
            "in the data"
        )
    else:
        limit = int(max_seq_length)
        fix = (
            f"raise finetune.max_seq_length (now {limit}; at most the model's positions), shorten these "
            "texts, or task.long_texts=truncate (longest-first, as GLUE; the count is reported)"
        )
    check_lengths(task, tokenizer, limit, fix=fix)
