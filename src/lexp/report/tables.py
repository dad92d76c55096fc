"""The paper's tables from any set of runs: ``python -m lexp.tables multirun/ outputs/``.

Every run writes ``results.json``; this module finds them below the given paths, reads each one
through :func:`lexp.report.results_schema.load_results` (older schema versions are upgraded there,
so the tables know only the current names and units) and lays them out as the paper's tables
(oracle, Table 6 + CKA, Table 7, Table 8 / Tables 1-2, Tables 3/9/10), one row per task (and
model, and setting that differs between runs). It only reads: a file that cannot be parsed, is of
a newer schema than this lexp, or lacks what a table needs, gets one line on stderr and is left
out of that table. :mod:`lexp.report.html` is the other view over the same runs and tables
(``lexp.tables`` is this module under its older name).

Several models (or one model name with different ``model.*`` settings, e.g. ``minilm`` and
``minilm[random_init=true]``) on the same tasks: each table is followed by its model comparison,
one column per model and ``Δ`` = model − baseline (``--baseline MODEL``; default the first of
bert, xlnet, then alphabetical; ``--split dev|test``; ``--no-compare``). Optional results appear
as extra columns when a run has them: ``x_std`` / ``std: {x: …}`` beside any number prints
``mean ± std``; ``control_dev|test`` and ``selectivity_dev|test`` per Table 7 row (``oracle_``
prefixed for the oracle) and in the ``neurons`` block; ``general.cka_adjacent_debiased``;
``neurons.n_neurons_per_seed`` and ``pipeline.ls_n_layers_per_seed`` (seed agreement).

In a notebook::

    from lexp.report.tables import load_tables, format_markdown   # or: from lexp.tables import ...
    tables = load_tables(["multirun/"])          # list[Table]; warnings go to stderr
    tables[0].records()                            # raw values (scores as fractions in [0, 1])
    print(format_markdown(tables))
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lexp.report.results_schema import RESULTS, SCHEMA_VERSION, ResultsError, load_results

# The paper's column order; other tasks and models follow alphabetically.
TASK_ORDER = ("pos", "sem", "ccg", "chunking", "sst2", "mrpc", "mnli", "qnli", "qqp", "rte", "stsb")
MODEL_ORDER = ("bert", "xlnet")

# Config keys that change how fast a run goes or where it logs, never what it measures: two runs
# differing only here are the same experiment (the newer one wins).
IGNORED_SETTINGS = (
    "threads",
    "progress",
    "logger",
    "data_root",
    "cache_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "extract.batch_size",
    "extract.max_tokens",
    "finetune.eval_batch_size",
    "finetune.num_workers",
    "finetune.resume",
    "finetune.keep_checkpoints",
    "finetune.checkpoint_every_n_steps",
    "analysis.chunk_rows",
    "analysis.batch",
    "analysis.save_extractor",
    "analysis.verify_extractor",
    "analysis.timing",
)

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"lexp.tables: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ loading
class Missing(Exception):
    """A results.json lacks what a table needs (absent, null or not a number); ``str()`` says what."""


class Unreadable(Exception):
    """A results.json that cannot be read or parsed into a run."""


@dataclass(frozen=True)
class Run:
    """One results.json: where it is, when it was written (newest wins) and its contents, as
    :func:`~lexp.report.results_schema.load_results` gives them (current schema version)."""

    path: Path
    mtime_ns: int
    data: dict[str, Any]
    #: the model's name with the model settings that tell it from other runs of that name
    #: (:func:`model_variants`), e.g. ``minilm[random_init=true]``; None: the plain name
    variant: str | None = None
    #: the schema version the file was written with (``data`` is always at the current one)
    source_version: int = SCHEMA_VERSION

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def model(self) -> str:
        return self.variant or str(self.data["model"])

    @property
    def analysis(self) -> str:
        return str(self.data["analysis"])

    @property
    def status(self) -> str:
        return str(self.data.get("status", "unknown"))

    @property
    def kind(self) -> str | None:
        """labelling | classification | regression (None if the run stopped before reading)."""
        kind = get(self.data, "task_kind") or get(self.data, "config", "task", "kind")
        return str(kind) if kind else None


def find_results(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Every results.json below ``paths`` (a path may be the file itself), and the paths with none.

    Files reached twice (overlapping paths) are listed once.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    empty: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            hits = [path] if path.name == RESULTS else []
        elif path.is_dir():
            hits = sorted(p for p in path.rglob(RESULTS) if p.is_file())
        else:
            hits = []
        if not hits:
            empty.append(path)
        for hit in hits:
            key = hit.resolve()
            if key not in seen:
                seen.add(key)
                found.append(hit)
    return found, empty


def load_run(path: str | Path) -> Run:
    """Read one results.json through the schema reader; raise :class:`Unreadable` with a one-line
    reason if it cannot be read (or is of an unknown schema version) or is not a run."""
    try:
        results = load_results(path)
    except ResultsError as exc:
        raise Unreadable(exc.reason) from exc
    data = results.data
    absent = [k for k in ("task", "model", "analysis") if not data.get(k)]
    if absent:
        raise Unreadable(f"lacks {', '.join(absent)}: not a lexp run")
    return Run(path=Path(path), mtime_ns=results.mtime_ns, data=data, source_version=results.source_version)


def model_variants(runs: Sequence[Run]) -> list[Run]:
    """The runs, each named by its model and the ``model.*`` settings that differ between runs of
    that model name: ``minilm`` and ``minilm[random_init=true]`` are two models in every table.

    A setting a run does not have is left out of its name; names without differences stay plain.
    """
    configs = {}
    for run in runs:
        config = get(run.data, "config", "model")
        flat = flatten(config) if isinstance(config, Mapping) else {}
        if flat.get("random_init") is not True:  # pretrained weights: the init seed means nothing
            flat = {k: v for k, v in flat.items() if k not in ("random_init", "init_seed")}
        configs[id(run)] = {
            k: json.dumps(v, sort_keys=True) for k, v in flat.items() if k not in ("name", "name_or_path")
        }
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(str(run.data["model"]), []).append(run)
    out = {}
    for name, group in by_name.items():
        keys = sorted({k for r in group for k in configs[id(r)]})
        differ = [k for k in keys if len({configs[id(r)].get(k) for r in group}) > 1]
        for run in group:
            parts = [f"{k}={_short(configs[id(run)][k])}" for k in differ if k in configs[id(run)]]
            out[id(run)] = replace(run, variant=f"{name}[{','.join(parts)}]" if parts else None)
    return [out[id(r)] for r in runs]


def load_runs(files: Iterable[str | Path], warn: Warn = _stderr) -> list[Run]:
    """Every file that parses as a run; each one that does not gets one ``warn`` line."""
    runs = []
    for file in files:
        try:
            runs.append(load_run(file))
        except Unreadable as exc:
            warn(f"{file}: {exc}; left out of every table")
    return runs


# ----------------------------------------------------------------------------------------- settings
def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            out.update(flatten(item, name + "."))
        else:
            out[name] = item
    return out


def _dropped(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def relevant_settings(run: Run, drop: Sequence[str] = ()) -> dict[str, str]:
    """The run's config that decides the numbers of a table, as ``dotted key → JSON value``.

    Runs agreeing here are repeats of one experiment; ``drop`` removes what a table varies itself
    (e.g. ``analysis`` for the oracle, ``analysis.ct`` for Table 6). Fine-tuning settings count
    only for sentence tasks (word-level tasks never fine-tune).
    """
    config = run.data.get("config")
    if not isinstance(config, Mapping):
        return {}
    prefixes = list(IGNORED_SETTINGS) + list(drop)
    if run.kind == "labelling":
        prefixes.append("finetune")
    return {k: json.dumps(v, sort_keys=True) for k, v in flatten(config).items() if not _dropped(k, prefixes)}


# ------------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """``kind`` decides the printed form: score (fraction → % with 2 decimals), pct (already %),
    int, ratio (4 decimals), num (shortest form), speedup (2 decimals), seconds (1 decimal), ct,
    text; ``d:<kind>`` is a signed difference of ``<kind>`` (model comparison)."""

    name: str
    kind: str = "text"


@dataclass
class Table:
    """One of the paper's tables: raw values per row (scores as fractions) and footnote lines."""

    key: str
    title: str
    columns: list[Column]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """Rows as dicts (column name → raw value), e.g. for ``pandas.DataFrame(table.records())``."""
        return [dict(zip([c.name for c in self.columns], row, strict=True)) for row in self.rows]

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of the raw values (``<column> std`` beside means over seeds;
        title and notes in ``.attrs``): :func:`lexp.report.frames.table_frame`."""
        from lexp.report.frames import table_frame

        return table_frame(self)

    def cells(self) -> list[list[str]]:
        """Rows as the printed strings."""
        return [[format_cell(v, c.kind) for v, c in zip(row, self.columns, strict=True)] for row in self.rows]


class Stat(float):
    """A mean over seeds that carries its standard deviation: it computes as the mean (sums,
    differences, averages give plain floats) and prints as ``mean ± std``.

    A results.json holds the spread of a number ``x`` beside it, as ``x_std`` or ``std: {x: …}`` in
    the same object (``x_std`` list for a list ``x``); every table picks it up (see :func:`need_num`).
    """

    std: float

    def __new__(cls, mean: float, std: float) -> Stat:
        obj = super().__new__(cls, mean)
        obj.std = float(std)
        return obj

    def __repr__(self) -> str:
        return f"Stat({float(self)!r}, std={self.std!r})"


def _format_number(value: float, kind: str) -> str:
    if kind == "score":
        return f"{100 * value:.2f}"
    if kind in ("pct", "speedup"):
        return f"{value:.2f}"
    if kind == "ratio":
        return f"{value:.4f}"
    if kind == "num":
        return f"{value:g}"
    if kind == "seconds":
        return f"{value:.1f}"
    if kind == "int":
        return str(int(value)) if value.is_integer() else f"{value:.1f}"
    if kind == "ct":
        return f"{value:.2f}" if round(value, 2) == value else f"{value:g}"
    return str(value)


def _format_delta(value: float, kind: str) -> str:
    """A signed difference in the printed unit of ``kind`` (scores: percentage points)."""
    text = _format_number(value, kind)
    if text.lstrip("-").strip("0.") == "":  # rounds to zero: no sign
        return text.lstrip("-")
    return text if text.startswith("-") else "+" + text


def format_cell(value: Any, kind: str) -> str:
    """Printed form of one value: scores as percentages with 2 decimals; None as an empty cell.

    ``kind`` ``d:<kind>`` is a signed difference (model comparison); a :class:`Stat` prints
    ``mean ± std`` in the same unit.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind.startswith("d:"):
        return _format_delta(float(value), kind[2:])
    if kind not in NUMERIC_KINDS:
        return str(value)
    text = _format_number(float(value), kind)
    std = getattr(value, "std", None)
    if std is not None and math.isfinite(std):
        spread = "int" if kind == "int" else kind
        text += " ± " + (f"{std:.1f}" if spread == "int" else _format_number(float(std), spread))
    return text


NUMERIC_KINDS = ("score", "pct", "speedup", "ratio", "num", "int", "ct", "seconds")


@dataclass
class Entry:
    """What one run contributes to one row (group) of a table, before newest-wins."""

    run: Run
    settings: dict[str, str]
    sub: Any  # a row within the group (Table 6: ct); None for one row per run
    payload: dict[str, Any]
    label: str = ""  # the settings that set it apart from other kept runs of its task and model

    @property
    def group(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return (self.run.task, self.run.model, tuple(sorted(self.settings.items())))


def need(data: Any, *keys: str | int) -> Any:
    """``data[k1][k2]...``, raising :class:`Missing` ("no a.b") if absent or null."""
    value: Any = data
    for i, key in enumerate(keys):
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            value = None
        if value is None:
            raise Missing("no " + ".".join(str(k) for k in keys[: i + 1]))
    return value


def get(data: Any, *keys: str | int) -> Any:
    """Like :func:`need`, but None where absent."""
    try:
        return need(data, *keys)
    except Missing:
        return None


def need_num(data: Any, *keys: str | int) -> float | int:
    """A number that must be there (a table cannot do without it); a :class:`Stat` when the
    results.json holds its standard deviation beside it (``x_std`` or ``std: {x: …}``)."""
    value = need(data, *keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Missing(f"{'.'.join(str(k) for k in keys)} = {repr(value)[:40]} is not a number")
    std = _std_of(data, keys)
    return value if std is None else Stat(value, std)


def _std_of(data: Any, keys: Sequence[str | int]) -> float | None:
    """The spread stored beside ``data[k1]...[kn]``, or None (absent or not a finite number)."""
    *parents, last = keys
    if isinstance(last, int):  # an element of a list x: the same element of x_std
        if not parents or not isinstance(parents[-1], str):
            return None
        std = get(data, *parents[:-1], f"{parents[-1]}_std", last)
    else:
        std = get(data, *parents, f"{last}_std")
        if std is None:
            std = get(data, *parents, "std", last)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std):
        return None
    return float(std)


def get_num(data: Any, *keys: str | int) -> float | int | None:
    """A number that may be absent (None), but is never anything else."""
    return None if get(data, *keys) is None else need_num(data, *keys)


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), value)


def newest(entries: list[Entry]) -> tuple[list[Entry], int]:
    """Keep the newest entry (file mtime) per (task, model, settings, sub); return it and #skipped."""
    best: dict[Any, Entry] = {}
    for entry in entries:
        key = (entry.group, json.dumps(entry.sub))
        held = best.get(key)
        if held is None or (entry.run.mtime_ns, str(entry.run.path)) > (
            held.run.mtime_ns,
            str(held.run.path),
        ):
            best[key] = entry
    kept = list(best.values())
    _label(kept)
    kept.sort(
        key=lambda e: (
            _order(e.run.task, TASK_ORDER),
            _order(e.run.model, MODEL_ORDER),
            e.label,
            _sub_order(e.sub),
        )
    )
    return kept, len(entries) - len(kept)


def _sub_order(sub: Any) -> tuple[int, Any]:
    return (0, sub) if isinstance(sub, (int, float)) else (1, str(sub))


def _label(entries: list[Entry]) -> None:
    """Name the settings in which kept runs of one task and model differ (empty if they do not)."""
    by_task: dict[tuple[str, str], list[Entry]] = {}
    for entry in entries:
        by_task.setdefault((entry.run.task, entry.run.model), []).append(entry)
    for group in by_task.values():
        keys = sorted({k for e in group for k in e.settings})
        differ = [k for k in keys if len({e.settings.get(k, "<unset>") for e in group}) > 1]
        for entry in group:
            entry.label = ", ".join(f"{k}={_short(entry.settings.get(k))}" for k in differ)


def _short(value: str | None) -> str:
    if value is None:
        return "<unset>"
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else json.dumps(decoded)


class Problems:
    """Per file, the tables it was left out of and why: printed as one line per file."""

    def __init__(self) -> None:
        self.by_file: dict[Path, tuple[Run, list[str]]] = {}

    def add(self, run: Run, table: str, reason: str) -> None:
        self.by_file.setdefault(run.path, (run, []))[1].append(f"{table} ({reason})")

    def report(self, warn: Warn) -> None:
        for path, (run, what) in self.by_file.items():
            state = "" if run.status == "complete" else f"status '{run.status}'; "
            warn(f"{path}: {state}left out of {', '.join(what)}")


def _collect(
    runs: Iterable[Run],
    table: str,
    analyses: Sequence[str] | None,
    extract: Callable[[Run], list[tuple[Any, dict[str, Any]]]],
    drop: Sequence[str],
    problems: Problems,
) -> list[Entry]:
    entries = []
    for run in runs:
        if analyses is not None and run.analysis not in analyses:
            continue
        try:
            parts = extract(run)
        except Missing as exc:
            problems.add(run, table, str(exc))
            continue
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # any other odd shape
            problems.add(run, table, f"malformed: {type(exc).__name__}: {exc}")
            continue
        settings = relevant_settings(run, drop)
        entries.extend(Entry(run, settings, sub, payload) for sub, payload in parts)
    return entries


def _key_columns(entries: Sequence[Entry]) -> tuple[list[Column], Callable[[Entry], list[Any]], str]:
    """task [, model] [, settings] columns, and a title suffix naming the model when there is one."""
    models = sorted({e.run.model for e in entries})
    several = len(models) > 1
    labelled = any(e.label for e in entries)
    columns = (
        [Column("task")] + ([Column("model")] if several else []) + ([Column("settings")] if labelled else [])
    )

    def values(entry: Entry) -> list[Any]:
        return (
            [task_cell(entry.run)]
            + ([entry.run.model] if several else [])
            + ([entry.label] if labelled else [])
        )

    return columns, values, "" if several or not models else f" · model {models[0]}"


_RELEASE = re.compile(r"v?\d+(\.\d+)+")


def data_release(run: Run) -> str | None:
    """The data release a run read, from its files' paths: ``pmb 4.0.0`` for
    ``.../pmb/4.0.0/en/train.conll`` (the folder named like a version and the one above it)."""
    files = run.data.get("data_files")
    if not isinstance(files, list) or not files or not isinstance(files[0], str):
        return None
    parts = Path(files[0]).parts
    for i, part in enumerate(parts[:-1]):
        if _RELEASE.fullmatch(part):
            return f"{parts[i - 1]} {part}" if i else part
    return None


def task_cell(run: Run) -> str:
    """The task as a table row names it, with the data release when the paths show one."""
    release = data_release(run)
    return f"{run.task} ({release})" if release else run.task


def _name(entry: Entry, several_models: bool) -> str:
    extra = ([entry.run.model] if several_models else []) + ([entry.label] if entry.label else [])
    return entry.run.task + (f" ({', '.join(extra)})" if extra else "")


def _common_notes(kept: Sequence[Entry], skipped: int, what: str) -> list[str]:
    notes = []
    if skipped:
        notes.append(
            f"{skipped} older result{'s' if skipped != 1 else ''} {what} skipped (newest by file mtime kept)"
        )
    several = len({e.run.model for e in kept}) > 1
    partial = {}
    for entry in kept:
        if entry.run.status != "complete":
            partial.setdefault(entry.run.path, (entry, entry.run.status))
    for path, (entry, status) in partial.items():
        notes.append(f"{_name(entry, several)}: from a run with status '{status}' ({path})")
    return notes


def metric_of(run: Run) -> str:
    """The headline metric of the run's task: accuracy (the paper), Pearson for regression."""
    kind = run.kind
    if kind is None:
        raise Missing("no task_kind")
    return "pearson" if kind == "regression" else "accuracy"


# ---- oracle
def _oracle_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    data = run.data
    metric = metric_of(run)
    return [
        (
            None,
            {
                "kind": run.kind,
                "n_neurons": get_num(data, "n_neurons"),
                "rows": [get_num(data, "rows", s) for s in ("train", "dev", "test")],
                "metric": metric,
                "dev": need_num(data, "oracle", "dev", metric),
                "test": get_num(data, "oracle", "test", metric),
                "ft_dev": get_num(data, "finetune", "metrics", "dev", metric),
                "ft_test": get_num(data, "finetune", "metrics", "test", metric),
            },
        )
    ]


def oracle_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Task data and the oracle (probe on every neuron) of every run, whatever its analysis."""
    entries = _collect(runs, "the oracle table", None, _oracle_payload, ["analysis"], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    finetuned = any(e.payload["ft_dev"] is not None or e.payload["ft_test"] is not None for e in kept)
    columns = key_cols + [
        Column("kind"),
        Column("#neurons", "int"),
        Column("train rows", "int"),
        Column("dev rows", "int"),
        Column("test rows", "int"),
        Column("metric"),
        Column("oracle dev", "score"),
        Column("oracle test", "score"),
    ]
    if finetuned:
        columns += [Column("fine-tuned dev", "score"), Column("fine-tuned test", "score")]
    rows = []
    for e in kept:
        p = e.payload
        row = key_values(e) + [p["kind"], p["n_neurons"], *p["rows"], p["metric"], p["dev"], p["test"]]
        rows.append(row + ([p["ft_dev"], p["ft_test"]] if finetuned else []))
    return Table(
        "oracle",
        "Oracle: probe on all neurons of all layers (scores in %: accuracy, Pearson for regression)" + suffix,
        columns,
        rows,
        _common_notes(kept, skipped, "with the same oracle (same task, model and settings, any analysis)"),
    )


# ---- Table 6
def _general_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    data = run.data
    rows = need(data, "general", "table6")
    if not isinstance(rows, list):
        raise Missing("general.table6 is not a list")
    out: list[tuple[Any, dict[str, Any]]] = [
        (
            "oracle",
            {
                "n_neurons": get_num(data, "general", "n_neurons_total"),
                "pct_removed": 0.0,
                "dev": need_num(data, "general", "oracle_dev"),
                "test": get_num(data, "general", "oracle_test"),
            },
        )
    ]
    for i in range(len(rows)):
        row = ("general", "table6", i)
        out.append(
            (
                float(need_num(data, *row, "ct")),
                {
                    "n_neurons": need_num(data, *row, "n_neurons"),
                    "pct_removed": need_num(data, *row, "pct_removed"),
                    "dev": get_num(data, *row, "dev"),
                    "test": get_num(data, *row, "test"),
                },
            )
        )
    return out


def general_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Table 6: neurons kept and probe scores after correlation clustering at each ct.

    Runs that differ only in ``analysis.ct`` (a sweep, one ct per job) merge into one block; the
    oracle row sits just above ct = 0.
    """
    entries = _collect(runs, "Table 6", ["general"], _general_payload, ["analysis.ct"], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    # one oracle row per group even when every ct came from its own job
    skipped -= sum(1 for e in entries if e.sub == "oracle") - sum(1 for e in kept if e.sub == "oracle")
    kept = _oracle_first(kept)
    key_cols, key_values, suffix = _key_columns(kept)
    columns = key_cols + [
        Column("ct", "ct"),
        Column("#neurons", "int"),
        Column("% removed", "pct"),
        Column("dev", "score"),
        Column("test", "score"),
    ]
    rows = [
        key_values(e)
        + [e.sub, e.payload["n_neurons"], e.payload["pct_removed"], e.payload["dev"], e.payload["test"]]
        for e in kept
    ]
    return Table(
        "general",
        "Table 6 (general): neurons kept after correlation clustering at threshold ct (scores in %)" + suffix,
        columns,
        rows,
        _common_notes(kept, skipped, "for the same task, model, settings and ct"),
    )


def _oracle_first(kept: list[Entry]) -> list[Entry]:
    """Within each group, the oracle row first, then ct ascending."""
    groups: dict[Any, list[Entry]] = {}
    for entry in kept:
        groups.setdefault(entry.group, []).append(entry)
    out = []
    for group in groups.values():
        out += sorted(group, key=lambda e: (e.sub != "oracle", _sub_order(e.sub)))
    return out


def _cka_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    adjacent = get(run.data, "general", "cka_adjacent")  # a run without "general" is reported for Table 6
    if adjacent is None:
        return []
    if not isinstance(adjacent, list):
        raise Missing("general.cka_adjacent is not a list")
    general = need(run.data, "general")
    debiased = get(general, "cka_adjacent_debiased")
    if debiased is not None and not isinstance(debiased, list):
        raise Missing("general.cka_adjacent_debiased is not a list")
    return [
        (
            None,
            {
                "adjacent": [need_num(general, "cka_adjacent", i) for i in range(len(adjacent))],
                "debiased": None
                if debiased is None
                else [need_num(general, "cka_adjacent_debiased", i) for i in range(len(debiased))],
                # the model's layer numbers of a model.layers subset (absent: 0, 1, 2, ...)
                "layers": general.get("cka_layers"),
            },
        )
    ]


def cka_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Figure 1 in numbers: linear CKA between each layer and the next (general runs that have it)."""
    entries = _collect(runs, "the CKA table", ["general"], _cka_payload, ["analysis.ct"], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    debiased = any(e.payload["debiased"] is not None for e in kept)
    width = max(len(e.payload[k] or []) for e in kept for k in ("adjacent", "debiased"))
    ids = [list(e.payload.get("layers") or range(len(e.payload["adjacent"]) + 1)) for e in kept]
    same = all(i == ids[0] for i in ids) and len(ids[0]) == width + 1  # subsets: the model's numbers
    columns = (
        key_cols
        + ([Column("estimator")] if debiased else [])
        + [Column(f"{ids[0][i]}-{ids[0][i + 1]}" if same else f"{i}-{i + 1}", "ratio") for i in range(width)]
    )
    rows = []
    for e in kept:
        estimators = [("biased", e.payload["adjacent"])]
        if debiased:
            estimators.append(("debiased", e.payload["debiased"] or []))
        for name, values in estimators:
            padded = list(values) + [None] * (width - len(values))
            rows.append(key_values(e) + ([name] if debiased else []) + padded)
    return Table(
        "cka",
        "Table 6 / Figure 1 (general): linear CKA between adjacent layers (layer 0 = embeddings"
        + (
            "; biased = the paper's estimator, debiased = unbiased HSIC, Nguyen et al. 2021"
            if debiased
            else ""
        )
        + ")"
        + suffix,
        columns,
        rows,
        _common_notes(kept, skipped, "for the same task, model and settings"),
    )


# ---- Table 7
def _layers_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    data = run.data
    rows = need(data, "layers", "table")
    if not isinstance(rows, list):
        raise Missing("layers.table is not a list")
    layers = []
    for i in range(len(rows)):
        row = ("layers", "table", i)
        layers.append(
            {
                "layer": int(need_num(data, *row, "layer")),
                "dev": need_num(data, *row, "dev"),
                "test": get_num(data, *row, "test"),
                "inc_dev": get_num(data, *row, "incremental_dev"),
                "inc_test": get_num(data, *row, "incremental_test"),
                "redundant": get(data, *row, "redundant") is True,
                **_control(data, row, "dev", "test"),
            }
        )
    oracle = _control(data, ("layers",), "oracle_dev", "oracle_test", prefix="oracle_")
    info = {
        "oracle_control": oracle,
        "oracle_dev": need_num(data, "layers", "oracle_dev"),
        "oracle_test": get_num(data, "layers", "oracle_test"),
        "threshold": get_num(data, "layers", "threshold"),
        "threshold_score_dev": get_num(data, "layers", "threshold_score_dev"),
        "redundant_layers": [r["layer"] for r in layers if r["redundant"]],
        "layers": layers,
    }
    return [(None, info)]


CONTROL_FIELDS = (
    ("control dev", "score", "control_dev"),
    ("control test", "score", "control_test"),
    ("selectivity dev", "score", "selectivity_dev"),
    ("selectivity test", "score", "selectivity_test"),
)


def _control(
    data: Any, where: Sequence[str | int], dev_key: str, test_key: str, prefix: str = ""
) -> dict[str, Any]:
    """Control-task accuracy and selectivity (Hewitt & Liang 2019) stored in ``data[where]``.

    Reads ``<prefix>control_dev``/``_test`` and ``<prefix>selectivity_dev``/``_test``; a
    selectivity that is not stored is the score minus the control score. All None without a control.
    """
    out: dict[str, Any] = {}
    for split, key in (("dev", dev_key), ("test", test_key)):
        control = get_num(data, *where, f"{prefix}control_{split}")
        selectivity = get_num(data, *where, f"{prefix}selectivity_{split}")
        score = get_num(data, *where, key)
        if selectivity is None and control is not None and score is not None:
            selectivity = float(score) - float(control)
        out[f"control_{split}"] = control
        out[f"selectivity_{split}"] = selectivity
    return out


def _present(payloads: Iterable[Mapping[str, Any]], fields: Sequence[tuple[str, str, str]]) -> list:
    """The fields some payload has a value for (optional columns appear only when used)."""
    payloads = list(payloads)
    return [f for f in fields if any(p.get(f[2]) is not None for p in payloads)]


def layers_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Table 7: probe on each layer, on layers 0..k, the oracle, and which layers are redundant."""
    entries = _collect(runs, "Table 7", ["layers"], _layers_payload, [], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    several = len({e.run.model for e in kept}) > 1
    columns = key_cols + [
        Column("layer"),
        Column("dev", "score"),
        Column("test", "score"),
        Column("0..k dev", "score"),
        Column("0..k test", "score"),
        Column("redundant"),
    ]
    control = _present(
        [e.payload["oracle_control"] for e in kept] + [r for e in kept for r in e.payload["layers"]],
        CONTROL_FIELDS,
    )
    columns += [Column(name, kind) for name, kind, _ in control]
    rows = []
    notes = []
    for e in kept:
        p = e.payload
        keys = key_values(e)
        extra = [p["oracle_control"][k] for _, _, k in control]
        rows.append(keys + ["oracle", p["oracle_dev"], p["oracle_test"], None, None, ""] + extra)
        for r in p["layers"]:
            rows.append(
                keys
                + [
                    str(r["layer"]),
                    r["dev"],
                    r["test"],
                    r["inc_dev"],
                    r["inc_test"],
                    "yes" if r["redundant"] else "",
                ]
                + [r[k] for _, _, k in control]
            )
        layers = ", ".join(str(x) for x in p["redundant_layers"]) or "none"
        rule = ""
        if p["threshold"] is not None and p["threshold_score_dev"] is not None:
            rule = f" (dev >= {p['threshold']:g} x oracle dev = {format_cell(p['threshold_score_dev'], 'score')})"
        notes.append(f"{_name(e, several)}: redundant layers {layers}{rule}")
    return Table(
        "layers",
        "Table 7 (layers): probe per layer and on layers 0..k (scores in %, layer 0 = embeddings)" + suffix,
        columns,
        rows,
        notes + _common_notes(kept, skipped, "for the same task, model and settings"),
    )


# ---- Table 8 / Tables 1-2
def _neurons_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    data = run.data
    reached = get(data, "neurons", "reached")
    return [
        (
            None,
            {
                "oracle_dev": need_num(data, "neurons", "oracle_dev"),
                "oracle_test": get_num(data, "neurons", "oracle_test"),
                "n_neurons": need_num(data, "neurons", "n_neurons"),
                "pct_of_all": get_num(data, "neurons", "pct_of_all"),
                "reduced_dev": need_num(data, "neurons", "reduced_dev"),
                "reduced_test": get_num(data, "neurons", "reduced_test"),
                "target_fraction": get_num(data, "neurons", "target_fraction"),
                "target_dev": get_num(data, "neurons", "target_dev"),
                "reached": reached if isinstance(reached, bool) else None,
                **_control(data, ("neurons",), "reduced_dev", "reduced_test"),
                "seeds_agree": _agreement(get(data, "neurons", "n_neurons_per_seed")),
            },
        )
    ]


def _agreement(per_seed: Any) -> str | None:
    """How stable a decision is across seeds: the share of seeds agreeing with the most common one."""
    if not isinstance(per_seed, list) or not per_seed:
        return None
    values = [json.dumps(v) for v in per_seed]
    mode = max(set(values), key=lambda v: (values.count(v), v))
    n = values.count(mode)
    return f"{100 * n / len(values):.0f}% ({n}/{len(values)}: {_short(mode)})"


NEURON_FIELDS = (
    ("oracle dev", "score", "oracle_dev"),
    ("oracle test", "score", "oracle_test"),
    ("#neurons", "int", "n_neurons"),
    ("% of all", "pct", "pct_of_all"),
    ("reduced dev", "score", "reduced_dev"),
    ("reduced test", "score", "reduced_test"),
    ("target frac", "num", "target_fraction"),
    ("target dev", "score", "target_dev"),
)


# decisions that seeds can disagree on: "<share agreeing with the most common> (<n>/<seeds>: <value>)"
SEED_FIELDS = {
    "neurons": (("#neurons same across seeds", "text", "seeds_agree"),),
    "pipeline": (("LS layers same across seeds", "text", "ls_seeds_agree"),),
}


def neurons_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Table 8 (Tables 1, 2): the smallest top-ranked neuron set that keeps the target score."""
    entries = _collect(runs, "Table 8", ["neurons"], _neurons_payload, [], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    several = len({e.run.model for e in kept}) > 1
    optional = _present([e.payload for e in kept], CONTROL_FIELDS + SEED_FIELDS["neurons"])
    fields = NEURON_FIELDS + tuple(optional)
    columns = key_cols + [Column(name, kind) for name, kind, _ in fields] + [Column("reached")]
    rows = [
        key_values(e)
        + [e.payload[k] for _, _, k in fields]
        + [None if e.payload["reached"] is None else bool(e.payload["reached"])]
        for e in kept
    ]
    rows += _averages(
        kept, key_cols, [k for _, kind, k in fields if k != "target_fraction" and kind != "text"], fields
    )
    notes = [
        f"{_name(e, several)}: target not reached; the best candidate is reported"
        for e in kept
        if e.payload["reached"] is False
    ]
    return Table(
        "neurons",
        "Table 8 / Tables 1-2 (neurons): minimal set of top-ranked neurons keeping target frac x oracle dev "
        "(scores in %)" + suffix,
        columns,
        rows,
        notes + _common_notes(kept, skipped, "for the same task, model and settings"),
    )


def _averages(
    kept: Sequence[Entry],
    key_cols: Sequence[Column],
    averaged: Sequence[str],
    fields: Sequence[tuple[str, str, str]],
    extra: int = 1,
) -> list[list[Any]]:
    """The paper's average rows (word-level vs sentence tasks, per model), when a group has >= 2 tasks.

    Left out when runs of one task differ in settings: an average over variants would mislead.
    """
    if any(e.label for e in kept):
        return []
    groups: dict[tuple[str, str], list[Entry]] = {}
    for entry in kept:
        family = "word-level" if entry.run.kind == "labelling" else "sentence"
        groups.setdefault((entry.run.model, family), []).append(entry)
    rows = []
    several = any(c.name == "model" for c in key_cols)
    for (model, family), group in sorted(
        groups.items(), key=lambda kv: (_order(kv[0][0], MODEL_ORDER), kv[0][1] != "word-level")
    ):
        if len(group) < 2:
            continue
        row: list[Any] = [f"average ({family}, {len(group)} tasks)"] + ([model] if several else [])
        for _, _, key in fields:
            values = [e.payload[key] for e in group]
            ok = key in averaged and all(isinstance(v, (int, float)) for v in values)
            row.append(sum(values) / len(values) if ok else None)
        rows.append(row + [None] * extra)
    return rows


# ---- Tables 3, 9, 10
def _pipeline_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    data = run.data
    ls_reached = get(data, "pipeline", "ls_reached")
    fs_reached = get(data, "pipeline", "fs_reached")
    return [
        (
            None,
            {
                "n_neurons_total": get_num(data, "pipeline", "n_neurons_total"),
                "oracle_dev": need_num(data, "pipeline", "oracle_dev"),
                "oracle_test": get_num(data, "pipeline", "oracle_test"),
                "ls_n_layers": need_num(data, "pipeline", "ls_n_layers"),
                "ls_dev": need_num(data, "pipeline", "ls_dev"),
                "ls_test": get_num(data, "pipeline", "ls_test"),
                "cc_n_neurons": get_num(data, "pipeline", "cc_n_neurons"),
                "ccfs_n_neurons": need_num(data, "pipeline", "ccfs_n_neurons"),
                "ccfs_dev": need_num(data, "pipeline", "ccfs_dev"),
                "ccfs_test": get_num(data, "pipeline", "ccfs_test"),
                "pct_reduction": need_num(data, "pipeline", "pct_reduction"),
                "ccfs_pct_of_oracle": _pct_of(
                    get_num(data, "pipeline", "ccfs_test"), get_num(data, "pipeline", "oracle_test")
                )
                or _pct_of(need_num(data, "pipeline", "ccfs_dev"), need_num(data, "pipeline", "oracle_dev")),
                "speedup": get_num(data, "pipeline_timing", "speedup_at_ls"),
                "ls_reached": ls_reached if isinstance(ls_reached, bool) else None,
                "fs_reached": fs_reached if isinstance(fs_reached, bool) else None,
                "ls_seeds_agree": _agreement(get(data, "pipeline", "ls_n_layers_per_seed")),
            },
        )
    ]


PIPELINE_FIELDS = (
    ("#neurons", "int", "n_neurons_total"),
    ("oracle dev", "score", "oracle_dev"),
    ("oracle test", "score", "oracle_test"),
    ("LS layers", "int", "ls_n_layers"),
    ("LS dev", "score", "ls_dev"),
    ("LS test", "score", "ls_test"),
    ("CC #neurons", "int", "cc_n_neurons"),
    ("CCFS #neurons", "int", "ccfs_n_neurons"),
    ("CCFS dev", "score", "ccfs_dev"),
    ("CCFS test", "score", "ccfs_test"),
    ("% reduction", "pct", "pct_reduction"),
    ("CCFS % of oracle", "pct", "ccfs_pct_of_oracle"),
    ("speed-up", "speedup", "speedup"),
)


def _pct_of(score: float | None, oracle: float | None) -> float | None:
    """The paper's headline: the reduced model's score as a percentage of the oracle's."""
    if score is None or oracle is None or not oracle:
        return None
    return 100.0 * float(score) / float(oracle)


def pipeline_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Tables 9, 10 (one row per task) with Table 3's averages: LayerSelector, then CCFS.

    ``LS layers`` counts the embeddings (layers 0..k = k + 1, as the paper's "Layers");
    ``speed-up`` is the full encoder's forward time over the truncated one's.
    """
    entries = _collect(runs, "Table 3/9/10", ["pipeline"], _pipeline_payload, [], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    several = len({e.run.model for e in kept}) > 1
    fields = PIPELINE_FIELDS + tuple(_present([e.payload for e in kept], SEED_FIELDS["pipeline"]))
    columns = key_cols + [Column(name, kind) for name, kind, _ in fields]
    rows = [key_values(e) + [e.payload[k] for _, _, k in fields] for e in kept]
    averaged = [k for _, kind, k in fields if k != "n_neurons_total" and kind != "text"]
    rows += _averages(kept, key_cols, averaged, fields, extra=0)
    notes = []
    for e in kept:
        if e.payload["ls_reached"] is False:
            notes.append(f"{_name(e, several)}: no prefix of layers reached the LS target; all layers kept")
        if e.payload["fs_reached"] is False:
            notes.append(f"{_name(e, several)}: FS target not reached; the best candidate is reported")
    return Table(
        "pipeline",
        "Tables 3, 9, 10 (pipeline): LayerSelector + CCFS (scores in %; LS layers include the embeddings; "
        "CCFS % of oracle = CCFS score / oracle score, on test where the run has it, else dev; "
        "speed-up = forward pass of the full / truncated encoder)" + suffix,
        columns,
        rows,
        notes + _common_notes(kept, skipped, "for the same task, model and settings"),
    )


# ----------------------------------------------------------------------------------- model comparison
@dataclass(frozen=True)
class CompareSpec:
    """How a table lines models up: the column splitting a task's rows (ct, layer) and the columns
    compared side by side (``{split}`` = the scores' split), and whether Table 3's averages apply."""

    sub: str | None
    values: tuple[str, ...]
    averages: bool = False


COMPARE = {
    "oracle": CompareSpec(None, ("oracle {split}", "fine-tuned {split}")),
    "general": CompareSpec("ct", ("#neurons", "% removed", "{split}")),
    "cka": CompareSpec("layers", ("CKA",)),
    "layers": CompareSpec("layer", ("{split}", "redundant", "control {split}", "selectivity {split}")),
    "neurons": CompareSpec(
        None, ("oracle {split}", "#neurons", "reduced {split}", "selectivity {split}"), averages=True
    ),
    "pipeline": CompareSpec(
        None,
        ("LS layers", "LS {split}", "CCFS #neurons", "CCFS {split}", "% reduction", "speed-up"),
        averages=True,
    ),
}
KEY_COLUMNS = ("task", "model", "settings", "estimator")


def model_order(models: Iterable[str], baseline: str | None = None) -> list[str]:
    """Models in table order: the baseline first, then the paper's (bert, xlnet), then alphabetical.

    Without a baseline the first of that order is the reference of every difference column.
    """
    ordered = sorted(set(models), key=lambda m: _order(m, MODEL_ORDER))
    if baseline in ordered:
        ordered.remove(baseline)
        ordered.insert(0, baseline)
    return ordered


def _melt_cka(table: Table) -> tuple[list[dict[str, Any]], list[Column]]:
    """The CKA table with one row per layer pair (columns ``layers``, ``CKA``), so depths may differ."""
    keys = [c for c in table.columns if c.name in KEY_COLUMNS]
    pairs = [c.name for c in table.columns if c.name not in KEY_COLUMNS]
    records = []
    for record in table.records():
        for i, pair in enumerate(pairs):
            if record[pair] is not None:
                records.append(
                    {**{c.name: record[c.name] for c in keys}, "layers": (i, pair), "CKA": record[pair]}
                )
    return records, keys + [Column("layers"), Column("CKA", "ratio")]


def _row_order(value: Any) -> tuple[int, Any]:
    if isinstance(value, tuple):  # melted CKA pair: (index, name)
        return (1, value[0])
    if value == "oracle":
        return (0, 0)
    if isinstance(value, str) and value.isdigit():
        return (1, int(value))
    return (1, value) if isinstance(value, (int, float)) else (2, str(value))


def compare_table(
    table: Table,
    task_kinds: Mapping[str, str | None] | None = None,
    *,
    baseline: str | None = None,
    split: str = "test",
) -> Table | None:
    """The models of ``table`` side by side: per task (and ct / layer) one column per model for each
    compared value, and ``Δ <value> (<model>-<baseline>)`` for every other model.

    None when the table has a single model, the baseline is not among its models, or no task was
    run with two models. Scores are of ``split`` (the other split when no row has it).
    """
    spec = COMPARE.get(table.key)
    names = [c.name for c in table.columns]
    if spec is None or "model" not in names:
        return None
    if table.key == "cka":
        records, columns = _melt_cka(table)
    else:
        records = [r for r in table.records() if not str(r["task"]).startswith("average (")]
        columns = table.columns
    kinds = {c.name: c.kind for c in columns}
    models = model_order({r["model"] for r in records}, baseline)
    if len(models) < 2 or (baseline is not None and models[0] != baseline):
        return None
    notes = []
    used = _scored_split(records, spec.values, split)
    if used != split:
        notes.append(f"no run has {split} scores: {used} scores are compared")
    values = [v.format(split=used) for v in spec.values if v.format(split=used) in kinds]
    key_names = [n for n in ("task", "settings", "estimator") if n in kinds] + (
        [spec.sub] if spec.sub else []
    )
    grouped: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for record in records:
        key = tuple(record[k] for k in key_names)
        grouped.setdefault(key, {})[record["model"]] = record
    if not any(len(by_model) > 1 for by_model in grouped.values()):
        return None
    task_rank = {t: i for i, t in enumerate(dict.fromkeys(r["task"] for r in records))}
    ordered = sorted(grouped, key=lambda k: (task_rank[k[0]], *(_row_order(v) for v in k[1:])))
    base = models[0]
    out_columns = [Column(n) if n != spec.sub else Column(n, kinds.get(n, "text")) for n in key_names]
    deltas = [v for v in values if kinds[v] in NUMERIC_KINDS]
    for value in values:
        out_columns += [Column(f"{value} · {m}", kinds[value]) for m in models]
        if value in deltas:
            out_columns += [
                Column(f"{value} · Δ" + (f" {m}" if len(models) > 2 else ""), "d:" + kinds[value])
                for m in models[1:]
            ]

    def cells(by_model: Mapping[str, Mapping[str, Any] | None]) -> list[Any]:
        row: list[Any] = []
        for value in values:
            got = [(by_model.get(m) or {}).get(value) for m in models]
            row += got
            if value in deltas:
                row += [_difference(g, got[0]) for g in got[1:]]
        return row

    rows = []
    for key in ordered:
        shown = [k[1] if isinstance(k, tuple) else k for k in key]
        rows.append(shown + cells(grouped[key]))
    if spec.averages and "settings" not in kinds:
        rows += _compare_averages(grouped, ordered, models, values, task_kinds or {}, len(key_names), cells)
    lacking = []
    for m in models:
        tasks_run = {k[0] for k in ordered if m in grouped[k]}
        items = [
            k[0] if k[0] not in tasks_run else " ".join(str(v[1] if isinstance(v, tuple) else v) for v in k)
            for k in ordered
            if m not in grouped[k]
        ]
        if items:
            lacking.append(f"{m}: {', '.join(dict.fromkeys(items))}")
    if lacking:
        notes.append("blank where a model has no such row (" + "; ".join(lacking) + ")")
    head = table.title.split(":")[0]
    others = models[1] if len(models) == 2 else "model"
    scores = f"{used} scores in %; " if any("{split}" in v for v in spec.values) else ""
    return Table(
        "compare_" + table.key,
        f"{head} by model: {' vs '.join(models)} ({scores}Δ = {others} - {base}"
        + (", scores in percentage points)" if scores else ")"),
        out_columns,
        rows,
        notes,
    )


def _scored_split(records: Sequence[Mapping[str, Any]], templates: Sequence[str], split: str) -> str:
    """``split``, or the other split when no record has a score of ``split`` but some of the other."""
    other = "dev" if split == "test" else "test"

    def has(at: str) -> bool:
        names = [t.format(split=at) for t in templates if "{split}" in t]
        return any(r.get(n) is not None for r in records for n in names)

    return other if not has(split) and has(other) else split


# the paper's layout of the tables that have rows within a task: row = layer / ct, column = task
PAPER = {"layers": CompareSpec("layer", ("{split}",)), "general": CompareSpec("ct", ("#neurons", "{split}"))}


def paper_layout(table: Table, *, baseline: str | None = None, split: str = "test") -> Table | None:
    """Table 7 (or 6) as the paper prints it: one row per layer (ct), one column per task; with
    several models, one column per model within each task and ``Δ`` = model - baseline.

    The same values as ``table`` (and as :func:`compare_table`), only laid out as a grid.
    """
    spec = PAPER.get(table.key)
    if spec is None or spec.sub is None:
        return None
    records = table.records()
    kinds = {c.name: c.kind for c in table.columns}
    models = model_order({r["model"] for r in records}, baseline) if "model" in kinds else [""]
    if baseline is not None and len(models) > 1 and models[0] != baseline:
        return None
    used = _scored_split(records, spec.values, split)
    values = [v.format(split=used) for v in spec.values if v.format(split=used) in kinds]
    groups = list(dict.fromkeys((r["task"], r.get("settings") or "") for r in records))
    subs = sorted({r[spec.sub] for r in records}, key=_row_order)
    cell = {(r["task"], r.get("settings") or "", r[spec.sub], r.get("model", "")): r for r in records}
    columns = [Column(spec.sub, kinds[spec.sub])]
    for task, settings in groups:
        name = task + (f" ({settings})" if settings else "")
        for value in values:
            prefix = f"{name} · {value}" if len(values) > 1 else name
            if len(models) == 1:
                columns.append(Column(prefix if len(values) > 1 else name, kinds[value]))
                continue
            sep = " " if len(values) > 1 else " · "
            columns += [Column(f"{prefix}{sep}{m}", kinds[value]) for m in models]
            columns += [
                Column(f"{prefix}{sep}Δ" + (f" {m}" if len(models) > 2 else ""), "d:" + kinds[value])
                for m in models[1:]
            ]
    rows = []
    for sub in subs:
        row: list[Any] = [sub]
        for task, settings in groups:
            for value in values:
                got = [(cell.get((task, settings, sub, m)) or {}).get(value) for m in models]
                row += got
                if len(models) > 1:
                    row += [_difference(g, got[0]) for g in got[1:]]
        rows.append(row)
    head = table.title.split(":")[0]
    delta = f"; Δ = {models[1] if len(models) == 2 else 'model'} - {models[0]}" if len(models) > 1 else ""
    single = table.title.rfind(" · model ")  # a single-model table names its model at the end
    model = table.title[single:] if len(models) == 1 and single >= 0 else ""
    return Table(
        "paper_" + table.key,
        f"{head} in the paper's layout: {spec.sub} × task ({used} scores in %{delta}){model}",
        columns,
        rows,
        [],
    )


def _difference(value: Any, reference: Any) -> float | None:
    numbers = [v for v in (value, reference) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(value) - float(reference) if len(numbers) == 2 else None


def _compare_averages(
    grouped: Mapping[tuple[Any, ...], Mapping[str, Mapping[str, Any]]],
    ordered: Sequence[tuple[Any, ...]],
    models: Sequence[str],
    values: Sequence[str],
    task_kinds: Mapping[str, str | None],
    n_keys: int,
    cells: Callable[[Mapping[str, Mapping[str, Any] | None]], list[Any]],
) -> list[list[Any]]:
    """Table 3's averages over the tasks that every model ran (per word-level / sentence family)."""
    families: dict[str, list[tuple[Any, ...]]] = {}
    for key in ordered:
        if all(m in grouped[key] for m in models):
            family = "word-level" if task_kinds.get(key[0]) == "labelling" else "sentence"
            families.setdefault(family, []).append(key)
    rows = []
    for family in ("word-level", "sentence"):
        keys = families.get(family, [])
        if len(keys) < 2:
            continue
        averaged: dict[str, dict[str, Any]] = {}
        for m in models:
            averaged[m] = {}
            for value in values:
                got = [grouped[k][m].get(value) for k in keys]
                numeric = all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in got)
                averaged[m][value] = sum(float(g) for g in got) / len(got) if numeric else None
        label = f"average ({family}, {len(keys)} tasks)"
        rows.append([label] + [None] * (n_keys - 1) + cells(averaged))
    return rows


# ---- analysis=layerdrop (Block Influence, angular distance, adjacent CKA; the drop test)
def _layerdrop_payload(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    data = need(run.data, "layerdrop")
    table = need(data, "table")
    drops = need(data, "drops")
    if not isinstance(table, list) or not isinstance(drops, list):
        raise Missing("layerdrop.table / layerdrop.drops is not a list")
    return [(("layerdrop",), {"table": table, "drops": drops, "ppl_full": get(data, "perplexity_full")})]


def layerdrop_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Per block: BI, angular distance d(l, l+n), adjacent CKA; then one row per drop test."""
    entries = _collect(runs, "the layerdrop table", ["layerdrop"], _layerdrop_payload, [], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    gaps = sorted(
        {
            k.removeprefix("angular_")
            for e in kept
            for r in e.payload["table"]
            for k in r
            if k.startswith("angular_")
        },
        key=int,
    )
    columns = key_cols + [
        Column("block", "int"),
        Column("BI", "ratio"),
        *[Column(f"d(n={g})", "ratio") for g in gaps],
        Column("CKA(l,l+1)", "ratio"),
        Column("drop", "text"),
        Column("probe dev", "score"),
        Column("full dev", "score"),
        Column("probe test", "score"),
        Column("full test", "score"),
        Column("ppl", "num"),
        Column("ppl full", "num"),
    ]
    rows = []
    for e in kept:
        for r in e.payload["table"]:
            rows.append(
                key_values(e)
                + [r.get("block"), r.get("block_influence")]
                + [r.get(f"angular_{g}") for g in gaps]
                + [r.get("cka_adjacent")]
                + [None] * 7
            )
        for d in e.payload["drops"]:
            label = f"n={d.get('n')}: blocks {d.get('blocks')}"
            rows.append(
                key_values(e)
                + [None, None]
                + [None] * len(gaps)
                + [None, label]
                + [d.get(k) for k in ("probe_dev", "full_dev", "probe_test", "full_test", "perplexity")]
                + [d.get("perplexity_full")]
            )
    return Table(
        "layerdrop",
        "Layer redundancy (layerdrop): Block Influence (ShortGPT), angular distance d(l, l+n) (Gromov et al.), "
        "adjacent linear CKA per block (input = hidden state l); drop rows: the best block of n layers removed, "
        "last-layer probe and perplexity against the full model" + suffix,
        columns,
        rows,
        _common_notes(kept, skipped, "for the same task, model and settings"),
    )


BUILDERS: tuple[Callable[[Sequence[Run], Problems], Table | None], ...] = (
    oracle_table,
    general_table,
    cka_table,
    layers_table,
    neurons_table,
    pipeline_table,
    layerdrop_table,
)


def build_tables(
    runs: Sequence[Run],
    warn: Warn = _stderr,
    *,
    compare: bool = True,
    baseline: str | None = None,
    split: str = "test",
    paper: bool = False,
) -> list[Table]:
    """Every table that has data; each run lacking what a table needs gets one ``warn`` line.

    With ``paper``, Tables 6 and 7 are also given in the paper's layout (:func:`paper_layout`,
    key ``paper_<key>``), just before the table they come from.

    With ``compare`` (default), a table holding several models on the same tasks is followed by
    its model comparison (:func:`compare_table`, key ``compare_<key>``) against ``baseline``
    (default: the first model of :func:`model_order`); ``split`` picks the compared scores.
    A ``baseline`` that no run has is a ``ValueError``.
    """
    runs = model_variants(runs)
    if baseline is not None and runs and baseline not in {r.model for r in runs}:
        raise ValueError(
            f"baseline model {baseline!r} has no run here (models: {', '.join(model_order(r.model for r in runs))})"
        )
    problems = Problems()
    kinds = {r.task: r.kind for r in runs if r.kind}
    tables = []
    for build in BUILDERS:
        table = build(runs, problems)
        if table is None:
            continue
        laid_out = paper_layout(table, baseline=baseline, split=split) if paper else None
        if laid_out is not None:
            tables.append(laid_out)
        tables.append(table)
        compared = compare_table(table, kinds, baseline=baseline, split=split) if compare else None
        if compared is not None:
            tables.append(compared)
    problems.report(warn)
    return tables


def load_tables(
    paths: Iterable[str | Path],
    warn: Warn = _stderr,
    *,
    compare: bool = True,
    baseline: str | None = None,
    split: str = "test",
    paper: bool = False,
) -> list[Table]:
    """find → load → build in one call (for notebooks); paths without any results.json are warned."""
    files, empty = find_results(paths)
    for path in empty:
        warn(f"{path}: no {RESULTS} found")
    return build_tables(
        load_runs(files, warn), warn, compare=compare, baseline=baseline, split=split, paper=paper
    )


# ----------------------------------------------------------------------------------------- printing
def format_markdown(tables: Sequence[Table]) -> str:
    """One block per table: a heading, a pipe table (numbers right-aligned), then its notes."""
    blocks = []
    for table in tables:
        header = [c.name for c in table.columns]
        cells = [[v.replace("|", "\\|") for v in row] for row in table.cells()]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
        right = [c.kind != "text" for c in table.columns]

        def line(values: Sequence[str], widths: list[int] = widths, right: list[bool] = right) -> str:
            padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
            return "| " + " | ".join(padded) + " |"

        rule = (
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True)
            )
            + "|"
        )
        lines = [f"### {table.title}", "", line(header), rule] + [line(r) for r in cells]
        if table.notes:
            lines += [""] + [f"- {note}" for note in table.notes]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def format_csv(tables: Sequence[Table]) -> str:
    """One block per table: a ``# title`` row, the header, the rows, ``# note`` rows, a blank line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for i, table in enumerate(tables):
        if i:
            out.write("\n")
        writer.writerow([f"# {table.title}"])
        writer.writerow([c.name for c in table.columns])
        writer.writerows(table.cells())
        for note in table.notes:
            writer.writerow([f"# {note}"])
    return out.getvalue()


FORMATS = {"markdown": format_markdown, "csv": format_csv}


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-comparison options shared by ``lexp.tables`` and ``lexp.report``."""
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="MODEL",
        help="reference model of the comparison tables (Δ = other model - MODEL); default: the first "
        "of bert, xlnet, then the other model names alphabetically",
    )
    parser.add_argument(
        "--split",
        choices=("test", "dev"),
        default="test",
        help="scores compared across models (default test, as the paper; dev when no run has test)",
    )
    parser.add_argument("--no-compare", action="store_true", help="leave out the model comparison tables")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exit 0 with the tables (broken files warned on stderr), 2 if a path has no results.json."""
    parser = argparse.ArgumentParser(
        prog="python -m lexp.tables",
        description="The paper's tables from every results.json below the given paths.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="run directories, sweep directories or results.json files"
    )
    parser.add_argument("--format", choices=sorted(FORMATS), default="markdown")
    parser.add_argument("--out", type=Path, default=None, help="write the tables here (default: stdout)")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="also print Tables 6 and 7 in the paper's layout (ct / layer × task, models side by side)",
    )
    add_compare_arguments(parser)
    args = parser.parse_args(argv)
    files, empty = find_results(args.paths)
    if empty:
        for path in empty:
            what = "does not exist" if not path.exists() else f"has no {RESULTS} below it"
            _stderr(f"error: {path} {what}")
        return 2
    try:
        tables = build_tables(
            load_runs(files),
            compare=not args.no_compare,
            baseline=args.baseline,
            split=args.split,
            paper=args.paper,
        )
    except ValueError as exc:
        _stderr(f"error: --baseline: {exc}")
        return 2
    text = FORMATS[args.format](tables)
    if not tables:
        _stderr(f"no table has data ({len(files)} {RESULTS} read; see the lines above)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        _stderr(f"wrote {len(tables)} table{'s' if len(tables) != 1 else ''} to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
