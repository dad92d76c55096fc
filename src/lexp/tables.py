"""The paper's tables from any set of runs: ``python -m lexp.tables multirun/ outputs/``.

Every run writes ``results.json``; this module finds them below the given paths and lays them out
as the paper's tables (oracle, Table 6 + CKA, Table 7, Table 8 / Tables 1-2, Tables 3/9/10), one
row per task (and model, and setting that differs between runs). It only reads: a file that cannot
be parsed, or lacks what a table needs, gets one line on stderr and is left out of that table.

In a notebook::

    from lexp.tables import load_tables, format_markdown
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
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = "results.json"

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
    """One results.json: where it is, when it was written (newest wins) and its contents."""

    path: Path
    mtime_ns: int
    data: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def model(self) -> str:
        return str(self.data["model"])

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
    """Parse one results.json; raise :class:`Unreadable` with a one-line reason if it is not a run."""
    path = Path(path)
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Unreadable(f"cannot be read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Unreadable(f"is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise Unreadable(f"is not a JSON object (found {type(data).__name__})")
    absent = [k for k in ("task", "model", "analysis") if not data.get(k)]
    if absent:
        raise Unreadable(f"lacks {', '.join(absent)}: not a lexp run")
    return Run(path=path, mtime_ns=stat.st_mtime_ns, data=data)


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
    int, ratio (4 decimals), num (shortest form), speedup (2 decimals), ct, text."""

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

    def cells(self) -> list[list[str]]:
        """Rows as the printed strings."""
        return [[format_cell(v, c.kind) for v, c in zip(row, self.columns, strict=True)] for row in self.rows]


def format_cell(value: Any, kind: str) -> str:
    """Printed form of one value: scores as percentages with 2 decimals; None as an empty cell."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "score":
        return f"{100 * float(value):.2f}"
    if kind in ("pct", "speedup"):
        return f"{float(value):.2f}"
    if kind == "ratio":
        return f"{float(value):.4f}"
    if kind == "num":
        return f"{float(value):g}"
    if kind == "int":
        return str(int(value)) if float(value).is_integer() else f"{float(value):.1f}"
    if kind == "ct":
        return f"{float(value):.2f}" if round(float(value), 2) == float(value) else f"{float(value):g}"
    return str(value)


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
    """A number that must be there (a table cannot do without it)."""
    value = need(data, *keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Missing(f"{'.'.join(str(k) for k in keys)} = {repr(value)[:40]} is not a number")
    return value


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
        return [entry.run.task] + ([entry.run.model] if several else []) + ([entry.label] if labelled else [])

    return columns, values, "" if several or not models else f" · model {models[0]}"


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
    return [(None, {"adjacent": [need_num(adjacent, i) for i in range(len(adjacent))]})]


def cka_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Figure 1 in numbers: linear CKA between each layer and the next (general runs that have it)."""
    entries = _collect(runs, "the CKA table", ["general"], _cka_payload, ["analysis.ct"], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    width = max(len(e.payload["adjacent"]) for e in kept)
    columns = key_cols + [Column(f"{i}-{i + 1}", "ratio") for i in range(width)]
    rows = [
        key_values(e) + e.payload["adjacent"] + [None] * (width - len(e.payload["adjacent"])) for e in kept
    ]
    return Table(
        "cka",
        "Table 6 / Figure 1 (general): linear CKA between adjacent layers (layer 0 = embeddings)" + suffix,
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
            }
        )
    info = {
        "oracle_dev": need_num(data, "layers", "oracle_dev"),
        "oracle_test": get_num(data, "layers", "oracle_test"),
        "threshold": get_num(data, "layers", "threshold"),
        "threshold_score_dev": get_num(data, "layers", "threshold_score_dev"),
        "redundant_layers": [r["layer"] for r in layers if r["redundant"]],
        "layers": layers,
    }
    return [(None, info)]


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
    rows = []
    notes = []
    for e in kept:
        p = e.payload
        keys = key_values(e)
        rows.append(keys + ["oracle", p["oracle_dev"], p["oracle_test"], None, None, ""])
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
            },
        )
    ]


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


def neurons_table(runs: Sequence[Run], problems: Problems) -> Table | None:
    """Table 8 (Tables 1, 2): the smallest top-ranked neuron set that keeps the target score."""
    entries = _collect(runs, "Table 8", ["neurons"], _neurons_payload, [], problems)
    if not entries:
        return None
    kept, skipped = newest(entries)
    key_cols, key_values, suffix = _key_columns(kept)
    several = len({e.run.model for e in kept}) > 1
    columns = key_cols + [Column(name, kind) for name, kind, _ in NEURON_FIELDS] + [Column("reached")]
    rows = [
        key_values(e)
        + [e.payload[k] for _, _, k in NEURON_FIELDS]
        + [None if e.payload["reached"] is None else bool(e.payload["reached"])]
        for e in kept
    ]
    rows += _averages(
        kept, key_cols, [k for _, _, k in NEURON_FIELDS if k != "target_fraction"], NEURON_FIELDS
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
                # the block stores a fraction (1 - kept / all); the table prints percent
                "pct_reduction": 100.0 * need_num(data, "pipeline", "reduction"),
                "speedup": get_num(data, "pipeline_timing", "speedup_at_ls"),
                "ls_reached": ls_reached if isinstance(ls_reached, bool) else None,
                "fs_reached": fs_reached if isinstance(fs_reached, bool) else None,
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
    ("speed-up", "speedup", "speedup"),
)


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
    columns = key_cols + [Column(name, kind) for name, kind, _ in PIPELINE_FIELDS]
    rows = [key_values(e) + [e.payload[k] for _, _, k in PIPELINE_FIELDS] for e in kept]
    averaged = [k for _, _, k in PIPELINE_FIELDS if k != "n_neurons_total"]
    rows += _averages(kept, key_cols, averaged, PIPELINE_FIELDS, extra=0)
    notes = []
    for e in kept:
        if e.payload["ls_reached"] is False:
            notes.append(f"{_name(e, several)}: no prefix of layers reached the LS target; all layers kept")
        if e.payload["fs_reached"] is False:
            notes.append(f"{_name(e, several)}: FS target not reached; the best candidate is reported")
    return Table(
        "pipeline",
        "Tables 3, 9, 10 (pipeline): LayerSelector + CCFS (scores in %; LS layers include the embeddings; "
        "speed-up = forward pass of the full / truncated encoder)" + suffix,
        columns,
        rows,
        notes + _common_notes(kept, skipped, "for the same task, model and settings"),
    )


BUILDERS: tuple[Callable[[Sequence[Run], Problems], Table | None], ...] = (
    oracle_table,
    general_table,
    cka_table,
    layers_table,
    neurons_table,
    pipeline_table,
)


def build_tables(runs: Sequence[Run], warn: Warn = _stderr) -> list[Table]:
    """Every table that has data; each run lacking what a table needs gets one ``warn`` line."""
    problems = Problems()
    tables = [t for t in (build(runs, problems) for build in BUILDERS) if t is not None]
    problems.report(warn)
    return tables


def load_tables(paths: Iterable[str | Path], warn: Warn = _stderr) -> list[Table]:
    """find → load → build in one call (for notebooks); paths without any results.json are warned."""
    files, empty = find_results(paths)
    for path in empty:
        warn(f"{path}: no {RESULTS} found")
    return build_tables(load_runs(files, warn), warn)


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
    args = parser.parse_args(argv)
    files, empty = find_results(args.paths)
    if empty:
        for path in empty:
            what = "does not exist" if not path.exists() else f"has no {RESULTS} below it"
            _stderr(f"error: {path} {what}")
        return 2
    tables = build_tables(load_runs(files))
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
