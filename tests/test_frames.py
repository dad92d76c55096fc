"""Results as pandas DataFrames: ``lexp.report.results_frame`` and ``Table.to_pandas()``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from lexp.report import results_frame
from lexp.report.frames import RUN_COLUMNS
from lexp.report.tables import Column, Stat, Table
from lexp.tables import load_tables
from test_tables import _pipeline, _run, _write


def test_results_frame_one_row_per_run_with_settings_and_headline_numbers(tmp_path: Path) -> None:
    _write(tmp_path, "a/oracle", _run("pos", dev=0.9, test=0.91))
    pipe = _run("sst2", "pipeline", kind="classification", dev=0.8, test=0.79, pipeline=_pipeline(ccfs_n=5))
    pipe["config"]["probe"]["lr"] = 0.01
    pipe["config"]["seed"] = 7
    _write(tmp_path, "b/pipeline", pipe)
    failed = _run("pos", "layers", status="failed: LexpInputError: bad file")
    del failed["oracle"]
    _write(tmp_path, "c/failed", failed)
    _write(tmp_path, "d/broken", "{not json")
    warnings: list[str] = []
    frame = results_frame([tmp_path], warn=warnings.append)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 3
    assert len(warnings) == 1 and "broken" in warnings[0]
    assert list(frame.columns[: len(RUN_COLUMNS)]) == list(RUN_COLUMNS)
    rows = {r["analysis"]: r for r in frame.to_dict("records")}
    assert rows["oracle"]["oracle.dev.accuracy"] == pytest.approx(0.9)
    assert rows["oracle"]["oracle.test.accuracy"] == pytest.approx(0.91)
    assert rows["oracle"]["config.probe.lr"] == pytest.approx(0.001) and rows["oracle"]["seed"] == 42
    assert rows["pipeline"]["config.probe.lr"] == pytest.approx(0.01) and rows["pipeline"]["seed"] == 7
    assert (
        rows["pipeline"]["pipeline.ccfs_n_neurons"] == 5 and rows["pipeline"]["pipeline.metric"] == "accuracy"
    )
    assert math.isnan(rows["oracle"]["pipeline.ccfs_n_neurons"])  # no pipeline in an oracle run
    assert rows["layers"]["status"].startswith("failed") and math.isnan(rows["layers"]["oracle.dev.accuracy"])
    assert json.loads(rows["oracle"]["config.extract.splits"]) == ["train", "dev", "test"]  # lists as JSON
    assert rows["pipeline"]["run_dir"] == str(tmp_path / "b" / "pipeline")
    # a sweep's numbers group like any DataFrame
    best = frame.groupby("task")["oracle.dev.accuracy"].max()
    assert best["pos"] == pytest.approx(0.9) and best["sst2"] == pytest.approx(0.8)
    assert (
        results_frame(tmp_path / "nothing", warn=warnings.append).empty and "no results.json" in warnings[-1]
    )


def test_table_to_pandas_keeps_raw_values_std_and_notes(tmp_path: Path) -> None:
    _write(tmp_path, "pos", _run("pos", dev=0.9, test=0.91))
    _write(tmp_path, "sst2", _run("sst2", kind="classification", dev=0.8, test=0.79))
    oracle = {t.key: t for t in load_tables([tmp_path])}["oracle"]
    frame = oracle.to_pandas()
    assert list(frame.columns) == [c.name for c in oracle.columns]
    assert frame.to_dict("records") == oracle.records()
    assert frame.attrs["title"] == oracle.title and frame.attrs["notes"] == oracle.notes
    table = Table(
        "t", "seeds", [Column("task"), Column("dev", "score")], [["pos", Stat(0.5, 0.1)], ["ccg", 0.7]]
    )
    frame = table.to_pandas()
    assert list(frame.columns) == ["task", "dev", "dev std"]
    assert frame["dev"].tolist() == [0.5, 0.7] and frame["dev std"].tolist()[0] == pytest.approx(0.1)
    assert pd.isna(frame["dev std"].tolist()[1])
