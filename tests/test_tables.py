"""lexp.tables: the paper's tables from hand-built results.json files with the runs' own schema.

The helpers build schema version 1 files (no ``schema_version``, as every run wrote before it), so
every test here also reads through the v1 -> v2 upgrade; tests/test_results_schema.py builds the
same runs at v2 and checks that the tables are identical.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lexp.tables import Table, format_csv, format_markdown, load_tables, main

T0 = 1_700_000_000  # file mtimes are set explicitly: newest-wins must not depend on write speed


def _config(task: str, kind: str, model: str, analysis: dict[str, Any]) -> dict[str, Any]:
    """The parts of the resolved Hydra config a run writes (``config`` in results.json)."""
    return {
        "task": {"name": task, "kind": kind, "data_dir": f"/data/{task}", "max_train_tokens": 150000},
        "model": {"name": model, "name_or_path": model, "revision": None, "dtype": "float32"},
        "probe": {"name": "elasticnet", "epochs": 10, "lr": 0.001, "l1": 1e-05, "l2": 1e-05, "seed": 42},
        "analysis": analysis,
        "finetune": {"learning_rate": 5e-05, "epochs": 3, "eval_batch_size": 32},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "logger": {"kind": "wandb", "mode": "offline"},
        "seed": 42,
        "extract": {"batch_size": 32, "subword": "last", "splits": ["train", "dev", "test"]},
        "limit": {"train": None, "dev": None, "test": None},
        "threads": {"extract": None, "probes": 1, "clustering": None},
        "store": {"dtype": "float16"},
        "progress": False,
    }


def _probe(dev: float, test: float | None, regression: bool = False) -> dict[str, Any]:
    """A probe result as ``public()`` writes it (no weights)."""
    names = ("pearson", "spearman", "mse") if regression else ("accuracy", "macro_f1")
    out: dict[str, Any] = {
        "dev": {names[0]: dev, names[1]: dev - 0.1},
        "best_epoch": 3,
        "dev_history": [dev - 0.02, dev],
        "train_seconds": 1.5,
        "heads_in_pass": 1,
    }
    if test is not None:
        out["test"] = {names[0]: test, names[1]: test - 0.1}
    return out


def _run(
    task: str = "pos",
    analysis: str = "oracle",
    *,
    model: str = "minilm",
    kind: str = "labelling",
    dev: float = 0.9,
    test: float | None = 0.91,
    status: str = "complete",
    analysis_cfg: dict[str, Any] | None = None,
    **blocks: Any,
) -> dict[str, Any]:
    """A results.json as experiment.run writes it, with the analysis's own block(s) in ``blocks``."""
    return {
        "status": status,
        "task": task,
        "model": model,
        "analysis": analysis,
        "lexp_version": "0.1.0",
        "command": f"run.py task={task} analysis={analysis}",
        "config": _config(task, kind, model, {"name": analysis, **(analysis_cfg or {})}),
        "timings_s": {"read": 0.1, "total": 2.0},
        "figures": [],
        "task_kind": kind,
        "n_labels": 2,
        "n_layers": 3,
        "hidden": 4,
        "n_neurons": 12,
        "rows": {"train": 100, "dev": 20, "test": 30},
        "oracle": _probe(dev, test, kind == "regression"),
        "summary_lines": [],
        **blocks,
    }


def _write(root: Path, name: str, data: Any, age: int = 0) -> Path:
    """``root/name/results.json``; larger ``age`` = older file."""
    path = root / name / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    os.utime(path, (T0 - age, T0 - age))
    return path


def _general(rows: list[tuple[float, int, float, float]], cka: list[float] | None = None) -> dict[str, Any]:
    table6 = [
        {
            "task": "pos",
            "ct": ct,
            "n_neurons": n,
            "pct_removed": 100.0 * (1 - n / 12),
            "makeup": {"n_neurons": 12, "n_clusters": n, "pct": {"same_layer": 0.0}},
            "dev": dev,
            "test": test,
            "probe": _probe(dev, test),
        }
        for ct, n, dev, test in rows
    ]
    block: dict[str, Any] = {
        "metric": "accuracy",
        "split": "train",
        "n_neurons_total": 12,
        "oracle_dev": 0.9,
        "oracle_test": 0.91,
        "cache": ".cache/x.general-abc",
        "cache_reused": False,
        "table6": table6,
        "representatives": {f"{ct:g}": list(range(n)) for ct, n, _, _ in rows},
    }
    if cka is not None:
        block["cka"] = [[1.0] * 3] * 3
        block["cka_adjacent"] = cka
    return block


def _layers() -> dict[str, Any]:
    scores = [(0.80, 0.81, 0.80, 0.81), (0.895, 0.90, 0.88, 0.89), (0.85, 0.86, 0.9, 0.91)]
    return {
        "metric": "accuracy",
        "oracle_dev": 0.9,
        "oracle_test": 0.91,
        "threshold": 0.99,
        "threshold_score_dev": 0.891,
        "table": [
            {
                "layer": i,
                "dev": dev,
                "test": test,
                "redundant": dev >= 0.891,
                "incremental_dev": inc_dev,
                "incremental_test": inc_test,
            }
            for i, (dev, test, inc_dev, inc_test) in enumerate(scores)
        ],
        "redundant_layers": [1],
        "heads": {"oracle": _probe(0.9, 0.91), "layer_0": _probe(0.8, 0.81)},
    }


def _neurons(n: int = 3, reduced_dev: float = 0.88, reached: bool = True) -> dict[str, Any]:
    return {
        "metric": "accuracy",
        "oracle_dev": 0.9,
        "oracle_test": 0.91,
        "target_fraction": 0.97,
        "target_dev": 0.873,
        "reached": reached,
        "n_neurons": n,
        "pct_of_all": 100.0 * n / 12,
        "reduced_dev": reduced_dev,
        "reduced_test": 0.8875,
        "evaluated": [[1, 0.5], [n, reduced_dev]],
        "selected_neurons": list(range(n)),
        "selected_per_layer": [n, 0, 0],
        "ranking": list(range(12)),
        "probe": _probe(reduced_dev, 0.8875),
    }


def _pipeline(ls_n_layers: int = 2, ccfs_n: int = 3, ccfs_dev: float = 0.885) -> dict[str, Any]:
    return {
        "n_neurons_total": 12,
        "oracle_dev": 0.9,
        "oracle_test": 0.91,
        "ls_delta": 0.01,
        "ls_target": 0.891,
        "ls_reached": True,
        "ls_layer": ls_n_layers - 1,
        "ls_n_layers": ls_n_layers,
        "ls_n_neurons": 4 * ls_n_layers,
        "ls_dev": 0.8925,
        "ls_test": 0.9,
        "ct": 0.3,
        "cc_n_neurons": 6,
        "cc_dev": 0.89,
        "cc_test": 0.9,
        "fs_delta": 0.01,
        "fs_target": 0.8811,
        "fs_reached": True,
        "ccfs_n_neurons": ccfs_n,
        "ccfs_dev": ccfs_dev,
        "ccfs_test": 0.895,
        "reduction": 1 - ccfs_n / 12,
        "cc_columns": [0, 1, 2, 3, 4, 5],
        "ccfs_columns": list(range(ccfs_n)),
        "fs_evaluated": [[ccfs_n, ccfs_dev]],
        "metric": "accuracy",
        "seconds": 3.0,
    }


def _timing(speedup: float) -> dict[str, Any]:
    return {
        "forward": [{"n_layers": 2, "speedup": 1.0}, {"n_layers": 1, "speedup": speedup}],
        "ls_layers": 1,
        "speedup_at_ls": speedup,
        "sentences_timed": 8,
        "classifier": [],
    }


def _tables(root: Path) -> dict[str, Table]:
    return {t.key: t for t in load_tables([root])}


def _header(table: Table) -> list[str]:
    return [c.name for c in table.columns]


# ------------------------------------------------------------------------------------------- tables
def test_oracle_table_in_paper_task_order_with_finetuned_scores(tmp_path: Path) -> None:
    _write(tmp_path, "stsb", _run("stsb", kind="regression", dev=0.8812, test=0.87))
    rte = _run("rte", "layers", kind="classification", dev=0.65, test=0.6449, layers=_layers())
    rte["finetune"] = {
        "complete": True,
        "metrics": {"dev": {"loss": 0.6, "accuracy": 0.7}, "test": {"loss": 0.7, "accuracy": 0.68}},
        "path": ".cache/lexp/finetuned/minilm/rte-1",
    }
    _write(tmp_path, "rte", rte)
    _write(tmp_path, "pos", _run("pos", test=None))
    table = _tables(tmp_path)["oracle"]
    assert table.title.endswith("· model minilm")
    assert _header(table) == [
        "task",
        "kind",
        "#neurons",
        "train rows",
        "dev rows",
        "test rows",
        "metric",
        "oracle dev",
        "oracle test",
        "fine-tuned dev",
        "fine-tuned test",
    ]
    assert table.cells() == [
        ["pos", "labelling", "12", "100", "20", "30", "accuracy", "90.00", "", "", ""],
        ["rte", "classification", "12", "100", "20", "30", "accuracy", "65.00", "64.49", "70.00", "68.00"],
        ["stsb", "regression", "12", "100", "20", "30", "pearson", "88.12", "87.00", "", ""],
    ]
    assert table.records()[2]["oracle dev"] == pytest.approx(0.8812)  # raw values for notebooks
    assert table.notes == []


def test_oracle_is_shared_by_every_analysis_and_newest_wins(tmp_path: Path) -> None:
    _write(tmp_path, "old", _run("pos", "layers", dev=0.8, layers=_layers()), age=20)
    new = _run("pos", "neurons", dev=0.9, neurons=_neurons())
    new["config"]["threads"]["probes"] = 2  # threads never change the numbers
    _write(tmp_path, "new", new, age=10)
    table = _tables(tmp_path)["oracle"]
    assert [row[:1] + row[7:] for row in table.cells()] == [["pos", "90.00", "91.00"]]
    assert table.notes == [
        "1 older result with the same oracle (same task, model and settings, any analysis) skipped "
        "(newest by file mtime kept)"
    ]


def test_table6_merges_a_ct_sweep_with_the_oracle_first(tmp_path: Path) -> None:
    both = _run(
        analysis="general",
        analysis_cfg={"ct": [0.0, 0.3], "split": "train"},
        general=_general([(0.0, 12, 0.9, 0.91), (0.3, 6, 0.8812, 0.8899)], cka=[0.95, 0.61234]),
    )
    _write(tmp_path, "sweep/0", both, age=30)
    one = _run(
        analysis="general",
        analysis_cfg={"ct": 0.3, "split": "train"},
        general=_general([(0.3, 5, 0.87, 0.875)]),
    )
    _write(tmp_path, "sweep/1", one, age=10)
    tables = _tables(tmp_path)
    table = tables["general"]
    assert _header(table) == ["task", "ct", "#neurons", "% removed", "dev", "test"]
    assert table.cells() == [
        ["pos", "oracle", "12", "0.00", "90.00", "91.00"],
        ["pos", "0.00", "12", "0.00", "90.00", "91.00"],
        ["pos", "0.30", "5", "58.33", "87.00", "87.50"],  # the newer job's ct = 0.3
    ]
    assert table.notes == [
        "1 older result for the same task, model, settings and ct skipped (newest by file mtime kept)"
    ]
    cka = tables["cka"]
    assert _header(cka) == ["task", "0-1", "1-2"]
    assert cka.cells() == [["pos", "0.9500", "0.6123"]]  # only the older run had CKA


def test_table7_layers_incremental_and_redundant(tmp_path: Path) -> None:
    _write(tmp_path, "run", _run(analysis="layers", layers=_layers()))
    table = _tables(tmp_path)["layers"]
    assert _header(table) == ["task", "layer", "dev", "test", "0..k dev", "0..k test", "redundant"]
    assert table.cells() == [
        ["pos", "oracle", "90.00", "91.00", "", "", ""],
        ["pos", "0", "80.00", "81.00", "80.00", "81.00", ""],
        ["pos", "1", "89.50", "90.00", "88.00", "89.00", "yes"],
        ["pos", "2", "85.00", "86.00", "90.00", "91.00", ""],
    ]
    assert table.notes == ["pos: redundant layers 1 (dev >= 0.99 x oracle dev = 89.10)"]


def test_table8_newest_wins_and_differing_settings_get_their_own_row(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "a",
        _run(analysis="neurons", analysis_cfg={"target_fraction": 0.97}, neurons=_neurons(4)),
        30,
    )
    _write(
        tmp_path,
        "b",
        _run(analysis="neurons", analysis_cfg={"target_fraction": 0.97}, neurons=_neurons(3)),
        20,
    )
    loose = _neurons(2, reduced_dev=0.8, reached=False) | {"target_fraction": 0.9, "target_dev": 0.81}
    _write(tmp_path, "c", _run(analysis="neurons", analysis_cfg={"target_fraction": 0.9}, neurons=loose), 40)
    table = _tables(tmp_path)["neurons"]
    assert _header(table) == [
        "task",
        "settings",
        "oracle dev",
        "oracle test",
        "#neurons",
        "% of all",
        "reduced dev",
        "reduced test",
        "target frac",
        "target dev",
        "reached",
    ]
    assert table.cells() == [
        [
            "pos",
            "analysis.target_fraction=0.9",
            "90.00",
            "91.00",
            "2",
            "16.67",
            "80.00",
            "88.75",
            "0.9",
            "81.00",
            "no",
        ],
        [
            "pos",
            "analysis.target_fraction=0.97",
            "90.00",
            "91.00",
            "3",
            "25.00",
            "88.00",
            "88.75",
            "0.97",
            "87.30",
            "yes",
        ],
    ]
    assert table.notes == [
        "pos (analysis.target_fraction=0.9): target not reached; the best candidate is reported",
        "1 older result for the same task, model and settings skipped (newest by file mtime kept)",
    ]


def test_pipeline_table_with_speedup_and_table3_averages(tmp_path: Path) -> None:
    _write(
        tmp_path, "pos", _run("pos", "pipeline", pipeline=_pipeline(2, 3), pipeline_timing=_timing(1.8512))
    )
    _write(tmp_path, "sem", _run("sem", "pipeline", pipeline=_pipeline(3, 6, 0.875)))
    _write(tmp_path, "rte", _run("rte", "pipeline", kind="classification", pipeline=_pipeline(1, 1)))
    table = _tables(tmp_path)["pipeline"]
    assert _header(table) == [
        "task",
        "#neurons",
        "oracle dev",
        "oracle test",
        "LS layers",
        "LS dev",
        "LS test",
        "CC #neurons",
        "CCFS #neurons",
        "CCFS dev",
        "CCFS test",
        "% reduction",
        "CCFS % of oracle",
        "speed-up",
    ]
    # CCFS % of oracle: 89.50 / 91.00 test = 98.35 % (the paper's headline, no longer by hand)
    assert table.cells() == [
        [
            "pos",
            "12",
            "90.00",
            "91.00",
            "2",
            "89.25",
            "90.00",
            "6",
            "3",
            "88.50",
            "89.50",
            "75.00",
            "98.35",
            "1.85",
        ],
        [
            "sem",
            "12",
            "90.00",
            "91.00",
            "3",
            "89.25",
            "90.00",
            "6",
            "6",
            "87.50",
            "89.50",
            "50.00",
            "98.35",
            "",
        ],
        [
            "rte",
            "12",
            "90.00",
            "91.00",
            "1",
            "89.25",
            "90.00",
            "6",
            "1",
            "88.50",
            "89.50",
            "91.67",
            "98.35",
            "",
        ],
        # Table 3: the word-level average (the sentence group has a single task: no average)
        [
            "average (word-level, 2 tasks)",
            "",
            "90.00",
            "91.00",
            "2.5",
            "89.25",
            "90.00",
            "6",
            "4.5",
            "88.00",
            "89.50",
            "62.50",
            "98.35",
            "",
        ],
    ]


def test_several_models_get_a_model_column(tmp_path: Path) -> None:
    _write(tmp_path, "x", _run("pos", "neurons", model="xlnet", neurons=_neurons(5)))
    _write(tmp_path, "b", _run("pos", "neurons", model="bert", neurons=_neurons(4)))
    table = _tables(tmp_path)["neurons"]
    assert "model" not in table.title
    assert [row[:2] + row[4:5] for row in table.cells()] == [["pos", "bert", "4"], ["pos", "xlnet", "5"]]


def test_running_run_is_used_and_noted(tmp_path: Path) -> None:
    path = _write(tmp_path, "r", _run("pos", "neurons", status="running", neurons=_neurons()))
    table = _tables(tmp_path)["neurons"]
    assert table.cells()[0][3] == "3"
    assert table.notes == [f"pos: from a run with status 'running' ({path})"]


# --------------------------------------------------------------------------------------- formatting
def test_markdown_block(tmp_path: Path) -> None:
    _write(tmp_path, "n", _run("pos", "neurons", neurons=_neurons()))
    text = format_markdown([t for t in load_tables([tmp_path]) if t.key == "neurons"])
    lines = text.splitlines()
    assert lines[0].startswith("### Table 8 / Tables 1-2 (neurons)")
    assert lines[2].startswith("| task | oracle dev |")
    assert set(lines[3]) <= {"|", "-", ":"}
    assert [c.strip() for c in lines[4].strip("|").split("|")] == [
        "pos", "90.00", "91.00", "3", "25.00", "88.00", "88.75", "0.97", "87.30", "yes",
    ]  # fmt: skip
    assert text.endswith("\n") and len(lines) == 5


def test_csv_output_parses_with_the_csv_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, "n", _run("pos", "neurons", neurons=_neurons()))
    _write(tmp_path, "l", _run("pos", "layers", layers=_layers()), age=5)
    assert main([str(tmp_path), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    titles = [i for i, r in enumerate(rows) if len(r) == 1 and r[0].startswith("# Table 8")]
    assert len(titles) == 1
    header, data = rows[titles[0] + 1], rows[titles[0] + 2]
    assert dict(zip(header, data, strict=True))["#neurons"] == "3"
    assert dict(zip(header, data, strict=True))["reduced dev"] == "88.00"
    assert [] in rows  # blank line between blocks
    # the same tables through the pure function
    assert format_csv(load_tables([tmp_path])) == format_csv(load_tables([tmp_path / "n", tmp_path / "l"]))


def test_broken_files_get_one_stderr_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_json = _write(tmp_path, "bad", '{"status": "complete", "task": ')
    not_object = _write(tmp_path, "list", "[1, 2]")
    running = _run("pos", "pipeline", status="running")
    del running["oracle"]
    incomplete = _write(tmp_path, "running", running)
    layers = _layers()
    del layers["table"]
    no_table = _write(tmp_path, "nolayers", _run("pos", "layers", layers=layers))
    _write(tmp_path, "good", _run("pos", "neurons", neurons=_neurons()))
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 4
    assert f"lexp.tables: {bad_json}: is not valid JSON (" in captured.err
    assert f"lexp.tables: {not_object}: is not a JSON object (found list); left out of every table" in lines
    assert (
        f"lexp.tables: {incomplete}: status 'running'; left out of the oracle table (no oracle), "
        "Table 3/9/10 (no pipeline)"
    ) in lines
    assert f"lexp.tables: {no_table}: left out of Table 7 (no layers.table)" in lines
    assert "### Table 8" in captured.out and "### Oracle" in captured.out


def test_a_value_of_the_wrong_type_is_reported_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = _write(tmp_path, "odd", _run("pos", "neurons", neurons=_neurons() | {"reduced_dev": "n/a"}))
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"lexp.tables: {odd}: left out of Table 8 (neurons.reduced_dev = 'n/a' is not a number)"
    ]
    assert "### Oracle" in captured.out and "### Table 8" not in captured.out


def test_exit_2_for_a_path_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} has no results.json below it" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_subprocess(tmp_path: Path) -> None:
    runs = tmp_path / "multirun"
    _write(runs, "0_pos", _run("pos", "neurons", neurons=_neurons()))
    out = tmp_path / "tables.md"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "lexp.tables", str(runs), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "wrote 2 tables" in done.stderr
    text = out.read_text()
    assert "### Oracle" in text and "### Table 8 / Tables 1-2 (neurons)" in text
    done = subprocess.run(
        [sys.executable, "-m", "lexp.tables", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_lexp_tables_is_the_module_in_lexp_report() -> None:
    """The tables moved to lexp.report.tables; the old name is the same module object."""
    import lexp.report.tables
    import lexp.tables

    assert lexp.tables is lexp.report.tables and load_tables is lexp.report.tables.load_tables
    from lexp.tables import _order, need_num  # private names too (notebooks, lexp.report.html)

    assert _order("pos", ("pos",)) == (0, "") and need_num({"a": 1}, "a") == 1


# --------------------------------------------------------------------------------- model comparison
def _two_models(root: Path) -> None:
    """pos and sem with bert and xlnet (Table 8 and Tables 3/9/10), as the paper's tables."""
    for task, b_n, x_n in (("pos", 290, 280), ("sem", 330, 290)):
        bert = _neurons(b_n, reduced_dev=0.88) | {"reduced_test": 0.943}
        xlnet = _neurons(x_n, reduced_dev=0.89) | {"reduced_test": 0.956}
        _write(root, f"{task}_bert_n", _run(task, "neurons", model="bert", test=0.957, neurons=bert))
        _write(root, f"{task}_xlnet_n", _run(task, "neurons", model="xlnet", test=0.961, neurons=xlnet))
    _write(root, "pos_bert_p", _run("pos", "pipeline", model="bert", pipeline=_pipeline(4, 300)))
    _write(root, "pos_xlnet_p", _run("pos", "pipeline", model="xlnet", pipeline=_pipeline(3, 300, 0.9)))


def test_models_side_by_side_with_the_difference(tmp_path: Path) -> None:
    _two_models(tmp_path)
    tables = load_tables([tmp_path])
    keys = [t.key for t in tables]
    # each comparison follows the table it lines up
    assert keys.index("compare_neurons") == keys.index("neurons") + 1
    table = {t.key: t for t in tables}["compare_neurons"]
    assert table.title.startswith("Table 8 / Tables 1-2 (neurons) by model: bert vs xlnet (test scores")
    assert "Δ = xlnet - bert" in table.title
    assert _header(table) == [
        "task",
        "oracle test · bert", "oracle test · xlnet", "oracle test · Δ",
        "#neurons · bert", "#neurons · xlnet", "#neurons · Δ",
        "reduced test · bert", "reduced test · xlnet", "reduced test · Δ",
    ]  # fmt: skip
    assert table.cells() == [
        ["pos", "91.00", "91.00", "0.00", "290", "280", "-10", "94.30", "95.60", "+1.30"],
        ["sem", "91.00", "91.00", "0.00", "330", "290", "-40", "94.30", "95.60", "+1.30"],
        # Table 3's average over the word-level tasks both models ran
        ["average (word-level, 2 tasks)", "91.00", "91.00", "0.00", "310", "285", "-25", "94.30", "95.60", "+1.30"],
    ]  # fmt: skip
    assert table.records()[0]["reduced test · Δ"] == pytest.approx(0.013)
    pipeline = {t.key: t for t in tables}["compare_pipeline"]
    row = dict(zip(_header(pipeline), pipeline.cells()[0], strict=True))
    assert (row["LS layers · bert"], row["LS layers · xlnet"], row["LS layers · Δ"]) == ("4", "3", "-1")
    assert (row["CCFS test · Δ"], row["% reduction · Δ"]) == ("0.00", "0.00")
    # the long tables are unchanged: one row per task and model
    assert [r[:2] for r in {t.key: t for t in tables}["neurons"].cells()][:2] == [
        ["pos", "bert"],
        ["pos", "xlnet"],
    ]


def test_baseline_picks_the_reference_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _two_models(tmp_path)
    table = {t.key: t for t in load_tables([tmp_path], baseline="xlnet")}["compare_neurons"]
    assert "xlnet vs bert" in table.title and "Δ = bert - xlnet" in table.title
    assert table.cells()[0][4:7] == ["280", "290", "+10"]
    assert main([str(tmp_path), "--baseline", "roberta"]) == 2
    assert "baseline model 'roberta' has no run here (models: bert, xlnet)" in capsys.readouterr().err
    assert main([str(tmp_path), "--no-compare"]) == 0
    assert "by model" not in capsys.readouterr().out


def test_comparison_rows_a_model_lacks_are_blank_and_dev_when_no_test(tmp_path: Path) -> None:
    layers = _layers() | {"oracle_test": None}
    for row in layers["table"]:
        row["test"] = None
    _write(
        tmp_path, "a", _run("pos", "layers", model="minilm", test=None, layers=layers | {"oracle_test": None})
    )
    other = _layers()
    other["table"] = other["table"][:2]  # a shallower model
    for row in other["table"]:
        row.update(dev=row["dev"] - 0.1, test=None, redundant=False)
    _write(
        tmp_path, "b", _run("pos", "layers", model="random", test=None, layers=other | {"oracle_test": None})
    )
    _write(tmp_path, "c", _run("sem", "layers", model="minilm", test=None, layers=layers))  # minilm only
    table = {t.key: t for t in load_tables([tmp_path], split="test")}["compare_layers"]
    assert "(dev scores in %" in table.title
    assert _header(table) == [
        "task", "layer", "dev · minilm", "dev · random", "dev · Δ", "redundant · minilm", "redundant · random",
    ]  # fmt: skip
    assert table.cells() == [
        ["pos", "oracle", "90.00", "90.00", "0.00", "", ""],
        ["pos", "0", "80.00", "70.00", "-10.00", "", ""],
        ["pos", "1", "89.50", "79.50", "-10.00", "yes", ""],
        ["pos", "2", "85.00", "", "", "", ""],
        ["sem", "oracle", "90.00", "", "", "", ""],
        ["sem", "0", "80.00", "", "", "", ""],
        ["sem", "1", "89.50", "", "", "yes", ""],
        ["sem", "2", "85.00", "", "", "", ""],
    ]
    assert table.notes == [
        "no run has test scores: dev scores are compared",
        "blank where a model has no such row (random: pos 2, sem)",
    ]


def test_one_model_or_no_shared_task_gives_no_comparison(tmp_path: Path) -> None:
    _write(tmp_path, "a", _run("pos", "neurons", model="bert", neurons=_neurons()))
    _write(tmp_path, "b", _run("sem", "neurons", model="xlnet", neurons=_neurons()))
    assert not [t for t in load_tables([tmp_path]) if t.key.startswith("compare_")]


def test_cka_compared_per_layer_pair(tmp_path: Path) -> None:
    for model, cka in (("bert", [0.9, 0.8]), ("xlnet", [0.95, 0.7])):
        _write(
            tmp_path,
            model,
            _run("pos", "general", model=model, general=_general([(0.3, 6, 0.88, 0.89)], cka)),
        )
    table = {t.key: t for t in load_tables([tmp_path])}["compare_cka"]
    assert _header(table) == ["task", "layers", "CKA · bert", "CKA · xlnet", "CKA · Δ"]
    assert table.cells() == [
        ["pos", "0-1", "0.9000", "0.9500", "+0.0500"],
        ["pos", "1-2", "0.8000", "0.7000", "-0.1000"],
    ]
    assert "scores" not in table.title


# ------------------------------------------------------------------ seeds, controls, debiased CKA
def test_std_beside_a_value_prints_as_plus_minus(tmp_path: Path) -> None:
    layers = _layers()
    layers["table"][0]["dev_std"] = 0.0123  # x_std beside x
    layers["table"][1]["std"] = {"test": 0.005}  # or std: {x: ...}
    layers["oracle_dev_std"] = 0.001
    neurons = _neurons() | {"n_neurons": 3.4, "n_neurons_std": 0.49}
    _write(tmp_path, "l", _run("pos", "layers", layers=layers))
    _write(tmp_path, "n", _run("pos", "neurons", neurons=neurons))
    tables = _tables(tmp_path)
    cells = tables["layers"].cells()
    assert cells[0][2] == "90.00 ± 0.10"
    assert cells[1][2:4] == ["80.00 ± 1.23", "81.00"]
    assert cells[2][2:4] == ["89.50", "90.00 ± 0.50"]
    value = tables["layers"].records()[1]["dev"]
    assert value == pytest.approx(0.8) and value.std == pytest.approx(0.0123)
    assert tables["neurons"].cells()[0][3] == "3.4 ± 0.5"


def test_table7_control_task_and_selectivity_columns(tmp_path: Path) -> None:
    layers = _layers()
    for row, control in zip(layers["table"], (0.6, 0.7, 0.75), strict=True):
        row["control_dev"] = control  # selectivity = dev - control when not stored
    layers["table"][2]["selectivity_dev"] = 0.11  # stored: used as is
    layers["oracle_control_dev"] = 0.5
    _write(tmp_path, "l", _run("pos", "layers", layers=layers))
    table = _tables(tmp_path)["layers"]
    assert _header(table)[-2:] == ["control dev", "selectivity dev"]
    assert [r[-2:] for r in table.cells()] == [
        ["50.00", "40.00"],
        ["60.00", "20.00"],
        ["70.00", "19.50"],
        ["75.00", "11.00"],
    ]


def test_seed_agreement_and_debiased_cka(tmp_path: Path) -> None:
    pipeline = _pipeline(2, 3) | {"ls_n_layers_per_seed": [2, 2, 3, 2, 2]}
    _write(tmp_path, "p", _run("pos", "pipeline", pipeline=pipeline))
    general = _general([(0.3, 6, 0.88, 0.89)], cka=[0.95, 0.6]) | {"cka_adjacent_debiased": [0.9, 0.41]}
    _write(tmp_path, "g", _run("pos", "general", general=general))
    tables = _tables(tmp_path)
    row = dict(zip(_header(tables["pipeline"]), tables["pipeline"].cells()[0], strict=True))
    assert row["LS layers same across seeds"] == "80% (4/5: 2)"
    assert _header(tables["cka"]) == ["task", "estimator", "0-1", "1-2"]
    assert tables["cka"].cells() == [
        ["pos", "biased", "0.9500", "0.6000"],
        ["pos", "debiased", "0.9000", "0.4100"],
    ]


def test_a_model_setting_makes_a_second_model(tmp_path: Path) -> None:
    """``model.random_init=true`` under the same model name is compared as a model of its own."""
    _write(tmp_path, "a", _run("pos", "neurons", neurons=_neurons(4)))
    twin = _run("pos", "neurons", neurons=_neurons(9, reduced_dev=0.5))
    twin["config"]["model"]["random_init"] = True
    _write(tmp_path, "b", twin)
    tables = _tables(tmp_path)
    assert [r[:2] for r in tables["neurons"].cells()] == [
        ["pos", "minilm"],
        ["pos", "minilm[random_init=true]"],
    ]
    assert "settings" not in _header(tables["neurons"])
    compare = tables["compare_neurons"]
    assert _header(compare)[4:7] == [
        "#neurons · minilm",
        "#neurons · minilm[random_init=true]",
        "#neurons · Δ",
    ]
    assert compare.cells()[0][4:7] == ["4", "9", "+5"]
    plain = _run("pos", "neurons", neurons=_neurons(4))
    plain["config"]["model"].update(random_init=False, init_seed=7)  # conf/model sets both keys
    twin["config"]["model"]["init_seed"] = 42
    _write(tmp_path, "a", plain)
    _write(tmp_path, "b", twin)
    # pretrained weights: random_init=false and its (unused) init_seed do not name a variant
    assert [r[1] for r in _tables(tmp_path)["neurons"].cells()] == [
        "minilm",
        "minilm[init_seed=42,random_init=true]",
    ]


def test_paper_layout_layer_by_task_with_models_side_by_side(tmp_path: Path) -> None:
    _write(tmp_path, "pos", _run("pos", "layers", layers=_layers()))
    _write(tmp_path, "sem", _run("sem", "layers", layers=_layers()))
    one = {t.key: t for t in load_tables([tmp_path], paper=True)}["paper_layers"]
    assert one.title.endswith("layer × task (test scores in %) · model minilm")
    assert _header(one) == ["layer", "pos", "sem"]
    assert one.cells() == [
        ["oracle", "91.00", "91.00"],
        ["0", "81.00", "81.00"],
        ["1", "90.00", "90.00"],
        ["2", "86.00", "86.00"],
    ]
    twin = _layers()
    for row in twin["table"]:
        row["test"] -= 0.2
    _write(tmp_path, "pos_b", _run("pos", "layers", model="random", layers=twin))
    tables = load_tables([tmp_path], paper=True)
    assert [t.key for t in tables].index("paper_layers") + 1 == [t.key for t in tables].index("layers")
    two = {t.key: t for t in tables}["paper_layers"]
    assert _header(two) == [
        "layer",
        "pos · minilm",
        "pos · random",
        "pos · Δ",
        "sem · minilm",
        "sem · random",
        "sem · Δ",
    ]
    assert two.cells()[1] == ["0", "81.00", "61.00", "-20.00", "81.00", "", ""]
    general = _run(analysis="general", general=_general([(0.0, 12, 0.9, 0.91), (0.3, 6, 0.88, 0.8899)]))
    _write(tmp_path, "g", general)
    table6 = {t.key: t for t in load_tables([tmp_path / "g"], paper=True)}["paper_general"]
    assert _header(table6) == ["ct", "pos · #neurons", "pos · test"]
    assert table6.cells() == [["oracle", "12", "91.00"], ["0.00", "12", "91.00"], ["0.30", "6", "88.99"]]
