"""lexp.report.results_schema: the versioned results.json schema and its one reader.

``tests/data/results_v1/*.json`` are real results.json files (schema version 1, written before
``schema_version`` existed) of this machine's runs, trimmed: lists keep their first 8 items and
``layers.heads`` its first 2 heads. pipeline_seeds: pos, MiniLM, probe.seeds=[1..5] (per-seed
reduction); pipeline_timing: pos, MiniLM, with the forward-pass timing; compare: MiniLM vs its
random twin (cross-model CKA); layers_control_seeds: Table 7 with a control task and 3 seeds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

import lexp
from lexp.errors import LexpInputError
from lexp.report.html import build_report
from lexp.report.results import Report
from lexp.report.results_schema import (
    SCHEMA_VERSION,
    UnknownSchemaVersion,
    UnreadableResults,
    load_results,
    upgrade,
)
from lexp.report.tables import format_markdown, load_tables, main
from test_tables import _general, _layers, _neurons, _pipeline, _run, _timing, _write

V1 = Path(__file__).parent / "data" / "results_v1"


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every scalar of a JSON value by its path (``a.b[2].c``)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_leaves(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


# v1 path (regex) -> (v2 path, factor): the whole of the v1 -> v2 change, written out by hand
V1_TO_V2 = [
    (r"pipeline\.reduction(_std)?$", r"pipeline.pct_reduction\1", 100.0),
    (r"pipeline\.reduction_per_seed(\[\d+\])$", r"pipeline.pct_reduction_per_seed\1", 100.0),
    (r"pipeline\.per_seed(\[\d+\])\.reduction$", r"pipeline.per_seed\1.pct_reduction", 100.0),
    (r"pipeline_timing\.ls_layers$", "pipeline_timing.ls_layer", 1),
    (r"pipeline_timing\.forward(\[\d+\])\.n_layers$", r"pipeline_timing.forward\1.last_layer", 1),
    (r"compare\.best_match_b(\[\d+\])$", r"compare.best_b_layers\1", 1),
]


def _expected_v2(v1: dict[str, Any]) -> dict[str, Any]:
    out = {"schema_version": SCHEMA_VERSION}
    for path, value in _leaves(v1).items():
        for pattern, new, factor in V1_TO_V2:
            if re.match(pattern, path):
                path, value = re.sub(pattern, new, path), value * factor
                break
        out[path] = value
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in V1.glob("*.json")))
def test_a_real_v1_file_upgrades_to_v2_with_the_same_numbers(name: str) -> None:
    raw = json.loads((V1 / name).read_text())
    results = load_results(V1 / name)
    assert (results.source_version, results.schema_version, results.upgraded) == (1, SCHEMA_VERSION, True)
    assert list(results)[0] == "schema_version"
    got = _leaves(results.data)
    assert got == _expected_v2(raw)  # every number where the rule puts it, nothing else changed
    if "pipeline" in raw:
        p = results["pipeline"]
        assert "reduction" not in p and p["pct_reduction"] == 100 * raw["pipeline"]["reduction"]
        assert 0 < p["pct_reduction"] <= 100
        assert p["pct_reduction"] == pytest.approx(
            100 * (1 - p["ccfs_n_neurons"] / p["n_neurons_total"])
        )  # the paper's "% Reduct."
    if "pipeline_timing" in raw and raw["pipeline_timing"]:
        timing = results["pipeline_timing"]
        assert timing["ls_layer"] == results["pipeline"]["ls_layer"]
        at_ls = next(r for r in timing["forward"][1:] if r["last_layer"] == timing["ls_layer"])
        assert timing["speedup_at_ls"] == at_ls["speedup"]
    # upgrade() leaves its argument alone and is what load_results applied
    assert upgrade(raw) == results.data and "schema_version" not in raw


def test_a_v2_file_round_trips(tmp_path: Path) -> None:
    """What the writer (Report) writes at v2 is read back unchanged, in the same key order."""
    report = Report(tmp_path / "run", task="pos", model="minilm", analysis="pipeline")
    pipeline = _pipeline(2, 3)
    pipeline["pct_reduction"] = 100 * (1 - 3 / 12)
    del pipeline["reduction"]
    report["pipeline"] = pipeline
    report["pipeline_timing"] = {
        "forward": [{"last_layer": 2, "speedup": 1.0}, {"last_layer": 1, "speedup": 1.5}],
        "ls_layer": 1,
        "speedup_at_ls": 1.5,
    }
    report["status"] = "complete"
    text = report.path.read_text()
    assert text.startswith('{\n  "schema_version": 2,\n  "status": "complete"')
    results = load_results(report.path)
    assert (results.source_version, results.schema_version, results.upgraded) == (2, 2, False)
    assert json.dumps(results.data, indent=2) + "\n" == text
    assert results["pipeline"]["pct_reduction"] == 75.0
    with pytest.raises(ValueError, match="sets schema_version itself"):
        Report(tmp_path / "other", schema_version=1)


@pytest.mark.parametrize("version", [3, 99])
def test_a_newer_version_is_refused_naming_the_file_and_the_fix(tmp_path: Path, version: int) -> None:
    data = {"schema_version": version, **_run("pos", "neurons", neurons=_neurons())}
    path = _write(tmp_path, "future", data | {"lexp_version": "9.1"})
    with pytest.raises(UnknownSchemaVersion) as caught:
        load_results(path)
    assert str(caught.value) == (
        f"{path}: has schema_version {version}, newer than this lexp ({lexp.__version__}) reads "
        f"(up to {SCHEMA_VERSION}): upgrade lexp to the version that wrote it (lexp_version 9.1) "
        "(git pull in the lexp checkout) to read it"
    )
    assert isinstance(caught.value, LexpInputError) and caught.value.path == path


@pytest.mark.parametrize("version", ["2", 0, -1, True, 2.0, None])
def test_a_malformed_version_is_refused(tmp_path: Path, version: Any) -> None:
    path = _write(tmp_path, "odd", {"schema_version": version, "task": "pos"})
    with pytest.raises(UnknownSchemaVersion, match=r"which is not a version \(an integer 1\.\.2\)"):
        load_results(path)


def test_broken_files_are_unreadable_with_a_reason(tmp_path: Path) -> None:
    for name, text, reason in (
        ("json", '{"task": ', "is not valid JSON ("),
        ("list", "[1]", "is not a JSON object (found list)"),
        ("bytes", b"\xff\xfe{", "is not UTF-8 text ("),
    ):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UnreadableResults) as caught:
            load_results(path)
        assert caught.value.reason.startswith(reason) and str(caught.value).startswith(f"{path}: ")
    with pytest.raises(UnreadableResults, match="cannot be read"):
        load_results(tmp_path / "missing" / "results.json")


def test_the_tables_leave_out_a_newer_file_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    future = _write(tmp_path, "future", {"schema_version": 3, **_run("pos", "neurons", neurons=_neurons())})
    _write(tmp_path, "now", _run("sem", "neurons", neurons=_neurons()))
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"lexp.tables: {future}: has schema_version 3, newer than this lexp ({lexp.__version__}) "
        "reads (up to 2): upgrade lexp to the version that wrote it (lexp_version 0.1.0) (git pull "
        "in the lexp checkout) to read it; left out of every table"
    ]
    assert "| sem " in captured.out and "| pos " not in captured.out


def test_a_v1_file_with_v2_names_keeps_them(tmp_path: Path) -> None:
    """A v1 marker (no schema_version) with v2 keys — a writer caught mid-upgrade — is not scaled twice."""
    pipeline = _pipeline(2, 3) | {"pct_reduction": 75.0}
    del pipeline["reduction"]
    path = _write(tmp_path, "mixed", _run("pos", "pipeline", pipeline=pipeline))
    assert load_results(path)["pipeline"]["pct_reduction"] == 75.0


# ----------------------------------------------------------- the two views on v1 and v2 inputs
def _sweep(
    root: Path,
    version: int,
    tasks: tuple[str, ...] = ("pos", "sem"),
    analyses: tuple[str, ...] = ("general", "layers", "neurons", "pipeline"),
) -> None:
    """Two models, ``analyses`` (pipeline: timed) on ``tasks``, as a v1 or a v2 writer writes it."""
    for m, model in enumerate(("minilm", "minilm_random")):
        for t, task in enumerate(tasks):
            pipeline = _pipeline(2 + m, 3 + t) | {
                "reduction_std": 0.05,
                "per_seed": [{"seed": 1, "reduction": 1 - (3 + t) / 12}, {"seed": 2, "reduction": 0.5}],
            }
            timing = _timing(1.5 + t)
            if version == 2:  # written by hand with the v2 names
                pipeline["pct_reduction"] = 100 * (1 - (3 + t) / 12)
                pipeline["pct_reduction_std"] = 100 * 0.05
                pipeline["per_seed"] = [
                    {"seed": 1, "pct_reduction": 100 * (1 - (3 + t) / 12)},
                    {"seed": 2, "pct_reduction": 50.0},
                ]
                del pipeline["reduction"], pipeline["reduction_std"]
                timing = {
                    "forward": [{"last_layer": 2, "speedup": 1.0}, {"last_layer": 1, "speedup": 1.5 + t}],
                    "ls_layer": 1,
                    **{k: v for k, v in timing.items() if k not in ("forward", "ls_layers")},
                }
            general = _general(
                [(0.0, 12, 0.9, 0.91), (0.3, 6 - t, 0.85 - m / 10, 0.86)], cka=[0.9, 0.7 + m / 10]
            )
            runs = {
                "general": _run(
                    task, "general", model=model, analysis_cfg={"ct": [0.0, 0.3]}, general=general
                ),
                "layers": _run(task, "layers", model=model, layers=_layers()),
                "neurons": _run(task, "neurons", model=model, neurons=_neurons(3 + m + t)),
                "pipeline": _run(task, "pipeline", model=model, pipeline=pipeline, pipeline_timing=timing),
            }
            for analysis, data in runs.items():
                if analysis not in analyses:
                    continue
                if version == 2:
                    data = {"schema_version": 2, **data}
                _write(root, f"{task}_{model}_{analysis}", data)


def test_tables_are_identical_on_v1_and_v2_inputs(tmp_path: Path) -> None:
    text = {}
    for version in (1, 2):
        root = tmp_path / f"v{version}"
        _sweep(root, version)
        assert {load_results(p).source_version for p in root.rglob("results.json")} == {version}
        text[version] = format_markdown(load_tables([root], warn=pytest.fail, paper=True))
    assert text[1] == text[2]
    assert "### Tables 3, 9, 10 (pipeline)" in text[2] and "### Table 3, 9, 10" not in text[2]
    # the pipeline's % reduction is the percentage, with the seeds' spread in percent too
    pipeline = {t.key: t for t in load_tables([tmp_path / "v1"], warn=pytest.fail)}["pipeline"]
    rows = [dict(zip([c.name for c in pipeline.columns], r, strict=True)) for r in pipeline.cells()]
    assert [(r["task"], r["model"], r["% reduction"], r["speed-up"]) for r in rows] == [
        ("pos", "minilm", "75.00 ± 5.00", "1.50"),
        ("pos", "minilm_random", "75.00 ± 5.00", "1.50"),
        ("sem", "minilm", "66.67 ± 5.00", "2.50"),
        ("sem", "minilm_random", "66.67 ± 5.00", "2.50"),
        ("average (word-level, 2 tasks)", "minilm", "70.83", "2.00"),
        ("average (word-level, 2 tasks)", "minilm_random", "70.83", "2.00"),
    ]
    assert math.isclose(pipeline.records()[0]["% reduction"], 75.0)


def test_the_report_is_identical_on_v1_and_v2_inputs(tmp_path: Path) -> None:
    pages = {}
    for version in (1, 2):
        root = tmp_path / f"v{version}"
        _sweep(root, version, tasks=("pos",), analyses=("neurons", "pipeline"))  # 3 figures a page
        page = build_report([root], warn=pytest.fail).html
        pages[version] = re.sub(r"Generated [^<]* UTC", "", page).replace(str(root), "ROOT")
    assert pages[1] == pages[2]
    assert "75.00 ± 5.00" in pages[2] and "<figure" in pages[2]
