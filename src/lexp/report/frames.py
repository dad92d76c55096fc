"""Results as pandas DataFrames (for notebooks): one row per run, and the paper's tables.

``results_frame(paths)`` reads every results.json below ``paths`` through the schema reader
(older files upgraded, like every table) and gives one row per run: where it is, its status,
its settings (the flattened config, ``probe.lr``, ``task.name`` ...) and its headline numbers
(the oracle's dev/test scores and the scalar results of its analysis). ``Table.to_pandas()``
(:mod:`lexp.report.tables`) converts one of the paper's tables. pandas is imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lexp.report.tables import Table, Warn, _stderr, find_results, flatten, load_runs, model_variants

__all__ = ["HEADLINE_SECTIONS", "results_frame", "table_frame"]

#: results.json sections whose scalar numbers are headline columns (``<section>.<key>``); the
#: oracle also gives its ``dev``/``test`` scores (``oracle.dev.accuracy`` ...).
HEADLINE_SECTIONS = ("layers", "neurons", "general", "pipeline", "compare", "extractor", "control_task")
#: The first columns, in this order; settings (``config.*`` flattened) and numbers follow.
RUN_COLUMNS = ("run_dir", "task", "model", "analysis", "status", "task_kind", "n_neurons", "seed")


def _scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str) or value is None


def _cell(value: Any) -> Any:
    """Lists and mappings as JSON text, so every cell is a scalar (groupby/merge work)."""
    return value if _scalar(value) else json.dumps(value, sort_keys=True)


def headline(data: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of one results.json as ``dotted key -> value``."""
    out: dict[str, Any] = {}
    oracle = data.get("oracle")
    if isinstance(oracle, Mapping):
        out["oracle.metric"] = oracle.get("metric")
        for split in ("dev", "test"):
            scores = oracle.get(split)
            if isinstance(scores, Mapping):
                out.update({f"oracle.{split}.{k}": v for k, v in scores.items() if _scalar(v)})
    for section in HEADLINE_SECTIONS:
        values = data.get(section)
        if isinstance(values, Mapping):
            out.update(
                {
                    f"{section}.{k}": v
                    for k, v in values.items()
                    if isinstance(v, bool | int | float) or k == "metric"
                }
            )
    total = (data.get("timings_s") or {}).get("total")
    if total is not None:
        out["timings_s.total"] = total
    return out


def results_frame(paths: Iterable[str | Path] | str | Path, warn: Warn = _stderr) -> Any:
    """One ``pandas.DataFrame`` row per run below ``paths`` (files or folders, e.g. a sweep's
    ``multirun/`` folder): run columns, then ``config.*`` settings, then headline numbers.

    A file that is not a readable lexp run is left out with one ``warn`` line, as for the tables.
    A run that failed keeps its row (``status`` says why; its numbers are missing, NaN).
    """
    import pandas as pd

    if isinstance(paths, str | Path):
        paths = [paths]
    files, empty = find_results(paths)
    for path in empty:
        warn(f"{path}: no results.json found")
    runs = model_variants(load_runs(files, warn))
    rows = []
    for run in runs:
        data = run.data
        config = data.get("config") if isinstance(data.get("config"), Mapping) else {}
        row: dict[str, Any] = {
            "run_dir": str(run.path.parent),
            "task": run.task,
            "model": run.model,
            "analysis": run.analysis,
            "status": run.status,
            "task_kind": run.kind,
            "n_neurons": data.get("n_neurons"),
            "seed": config.get("seed"),
        }
        row.update({f"config.{k}": _cell(v) for k, v in flatten(config).items()})
        row.update({k: _cell(v) for k, v in headline(data).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    settings = sorted(c for c in frame.columns if c.startswith("config."))
    numbers = [c for c in frame.columns if c not in RUN_COLUMNS and c not in settings]
    return frame[[*RUN_COLUMNS, *settings, *numbers]]


def table_frame(table: Table) -> Any:
    """A paper table as a ``pandas.DataFrame``: raw values (scores as fractions, as in
    ``table.records()``); a mean over seeds gets a ``<column> std`` column beside it; the title
    and notes are in ``frame.attrs``."""
    import pandas as pd

    from lexp.report.tables import Stat

    names = [c.name for c in table.columns]
    data: dict[str, list[Any]] = {}
    for i, name in enumerate(names):
        values = [row[i] for row in table.rows]
        data[name] = [float(v) if isinstance(v, Stat) else v for v in values]
        if any(isinstance(v, Stat) for v in values):
            data[f"{name} std"] = [v.std if isinstance(v, Stat) else None for v in values]
    frame = pd.DataFrame(data, columns=list(data))
    frame.attrs.update(key=table.key, title=table.title, notes=list(table.notes))
    return frame
