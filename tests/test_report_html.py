"""lexp.report: the one-page HTML report, checked as HTML and in a real headless Chromium.

The sweep is built from results.json dicts with the runs' own schema (the helpers of
test_tables.py) and small real PNG files standing in for the figures each run writes; two models
(MiniLM and its random-weights twin) on two tasks, every analysis, plus one ``analysis=compare``.
The browser test needs Debian's chromium (``apt-get install -y chromium``); without it, it skips.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lexp.report.browser import find_chromium, inspect_page, screenshot
from lexp.report.html import build_report, main
from lexp.report.tables import load_tables
from test_tables import _general, _layers, _neurons, _pipeline, _run, _timing, _write

MODELS = ("minilm", "minilm_random")
TASKS = ("pos", "sem")
HOSTILE = "<script>alert('x')</script>&.conllu"  # a data file name: must arrive escaped


def _png(path: Path, width: int, height: int = 30) -> bytes:
    """A real PNG of a given size (the size identifies the file once embedded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (width % 256, 90, 160)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _with_run_fields(data: dict[str, Any], root: Path, name: str, figures: list[str], seq: list[int]) -> dict:
    """What every real run adds: device, data files, stage timings and its figures (written here)."""
    data["device"] = {"device": "cpu", "type": "cpu", "name": "x86_64", "threads": 2}
    data["model_family"] = {"family": "bert", "tokenizer_kind": "wordpiece", "sentence": None}
    data["data_files"] = [f"/data/{data['task']}/train.conllu", f"/data/{HOSTILE}"]
    data["timings_s"] = {"read": 1.4, "extract": 11.36, "probes": 1.0, data["analysis"]: 2.5, "total": 23.48}
    data["figures"] = [f"figures/{f}" for f in figures]
    for figure in figures:
        seq[0] += 1
        _png(root / name / "figures" / figure, 40 + seq[0])
    return data


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    seq = [0]
    for m, model in enumerate(MODELS):
        lower = 0.2 * m  # the random twin scores lower
        for t, task in enumerate(TASKS):
            tag = f"{task}_{model}"
            cka = [[1.0, 0.9 - lower, 0.7], [0.9 - lower, 1.0, 0.8], [0.7, 0.8, 1.0]]
            general = _general(
                [(0.0, 12, 0.9 - lower, 0.91 - lower), (0.3, 6 - t, 0.85 - lower, 0.86 - lower)]
            )
            general |= {"cka": cka, "cka_adjacent": [cka[0][1], cka[1][2]]}
            general["table6"][1]["makeup"]["pct"] = {"same_layer": 50.0, "adjacent": 30.0, "further": 20.0}
            runs = {
                "general": (
                    _run(task, "general", model=model, analysis_cfg={"ct": [0.0, 0.3]}, general=general),
                    ["cka.png", "reduction_vs_score.png", "cluster_makeup.png"],
                ),
                "layers": (_run(task, "layers", model=model, layers=_layers()), ["layers.png"]),
                "neurons": (
                    _run(
                        task,
                        "neurons",
                        model=model,
                        neurons=_neurons(3 + 2 * m + t, reduced_dev=0.88 - lower),
                    ),
                    ["minimal_set.png"],
                ),
                "pipeline": (
                    _run(
                        task,
                        "pipeline",
                        model=model,
                        pipeline=_pipeline(2 + m, 3 + t),
                        pipeline_timing=_timing(1.5),
                    ),
                    ["forward_time.png", "classifier_time.png"],
                ),
            }
            for row in runs["layers"][0]["layers"]["table"]:
                row["dev"] -= lower
                row["control_dev"] = 0.5  # control task: Table 7 gets control and selectivity columns
            runs["layers"][0]["layers"]["table"][1]["dev_std"] = 0.004  # seeds: mean ± std
            for analysis, (data, figs) in runs.items():
                name = f"{tag}_{analysis}"
                _write(root, name, _with_run_fields(data, root, name, figs, seq))
    compare = _run("pos", "compare", model="minilm")
    compare["compare"] = {"models": list(MODELS), "cka": [[0.9, 0.2, 0.1], [0.3, 0.4, 0.2], [0.1, 0.2, 0.3]]}
    _write(root, "pos_compare", _with_run_fields(compare, root, "pos_compare", [], seq))
    return root


class _Parsed(HTMLParser):
    """Every <img src>, every table (data-key → header and body cell texts), every tag name seen."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, dict[str, list[list[str]]]] = {}
        self.tags: set[str] = set()
        self._table: str | None = None
        self._part = "rows"
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "img":
            self.images.append(a)
        elif tag == "table" and "data-key" in a:
            self._table = a["data-key"]
            self.tables[self._table] = {"header": [], "rows": []}
        elif tag in ("thead", "tbody"):
            self._part = "header" if tag == "thead" else "rows"
        elif tag == "tr" and self._table:
            self.tables[self._table][self._part].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][self._part][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def page(sweep: Path) -> Any:
    return build_report([sweep], warn=lambda message: None)


def _results(sweep: Path, task: str, model: str, analysis: str) -> dict[str, Any]:
    return json.loads((sweep / f"{task}_{model}_{analysis}" / "results.json").read_text())


def _row(table: dict[str, list[list[str]]], **match: str) -> dict[str, str]:
    """The one body row whose cells match ``column=value`` (single-row headers only)."""
    header = table["header"][0]
    rows = [dict(zip(header, r, strict=True)) for r in table["rows"]]
    found = [r for r in rows if all(r[k.replace("_", " ")] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


# ------------------------------------------------------------------------------- without a browser
def test_page_embeds_every_figure_as_png_and_is_self_contained(sweep: Path, page: Any) -> None:
    parsed = _Parsed()
    parsed.feed(page.html)
    decoded = []
    for img in parsed.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["src"][:60]
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = Image.open(io.BytesIO(data)).size
        assert width > 0 and height > 0 and img["alt"]
        decoded.append(data)
    # every PNG the runs wrote is embedded byte for byte, exactly once
    written = sorted(sweep.rglob("figures/*.png"))
    assert len(written) == len(MODELS) * len(TASKS) * 7
    for path in written:
        assert decoded.count(path.read_bytes()) == 1, path
    # drawn here: Fig. 2 across tasks, Fig. 4 per task, cross-model CKA, 3 model-comparison bar charts
    generated = [i for i in parsed.images if i["data-source"] == "generated by lexp.report"]
    assert sorted(i["alt"] for i in generated) == sorted(
        [
            "Figure 2: score and % neurons removed against the clustering threshold, all tasks",
            "Figure 4: pos, probe score per layer by model",
            "Figure 4: sem, probe score per layer by model",
            "pos: CKA minilm vs minilm_random",
            "Tables 1-2: size of the minimal neuron set, by model",
            "LayerSelector: layers kept (incl. embeddings), by model",
            "CCFS: neurons kept, by model",
        ]
    )
    assert page.n_figures == len(parsed.images) == len(written) + len(generated)
    # nothing to fetch, nothing to run
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert "http://" not in page.html and "https://" not in page.html
    # text from results.json arrives escaped
    assert (
        HOSTILE not in page.html
        and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;.conllu" in page.html
    )
    assert page.warnings == []


def test_tables_hold_the_numbers_of_the_results_files(sweep: Path, page: Any) -> None:
    parsed = _Parsed()
    parsed.feed(page.html)
    # the same tables as python -m lexp.tables, cell for cell
    tables = load_tables([sweep], warn=lambda message: None, paper=True)
    assert {t.key for t in tables} == {
        "oracle", "general", "cka", "layers", "neurons", "pipeline", "paper_general", "paper_layers",
        "compare_oracle", "compare_general", "compare_cka", "compare_layers", "compare_neurons", "compare_pipeline",
    }  # fmt: skip
    assert set(parsed.tables) == {t.key for t in tables} | {"runs", "models", "data", "timings"}
    for model in MODELS:  # the family each run recorded (results.json's model_family)
        row = _row(parsed.tables["models"], model=model)
        assert (row["family"], row["tokenizer"], row["sentence vector"]) == ("bert", "wordpiece", "")
    for table in tables:
        assert parsed.tables[table.key]["rows"] == table.cells(), table.key
    # and those are the numbers in the files (read here without lexp)
    for model in MODELS:
        for task in TASKS:
            layers = _results(sweep, task, model, "layers")["layers"]
            for entry in layers["table"]:
                row = _row(parsed.tables["layers"], task=task, model=model, layer=str(entry["layer"]))
                std = f" ± {100 * entry['dev_std']:.2f}" if "dev_std" in entry else ""
                assert row["dev"] == f"{100 * entry['dev']:.2f}{std}"
                assert row["control dev"] == "50.00"
                assert row["selectivity dev"] == f"{100 * (entry['dev'] - 0.5):.2f}"
            neurons = _results(sweep, task, model, "neurons")["neurons"]
            row = _row(parsed.tables["neurons"], task=task, model=model)
            assert row["#neurons"] == str(neurons["n_neurons"])
            assert row["reduced dev"] == f"{100 * neurons['reduced_dev']:.2f}"
            pipeline = _results(sweep, task, model, "pipeline")["pipeline"]
            row = _row(parsed.tables["pipeline"], task=task, model=model)
            assert row["% reduction"] == f"{100 * pipeline['reduction']:.2f}"
            assert row["LS layers"] == str(pipeline["ls_n_layers"])
    # Table 7 in the paper's layout: layer × task, the two models and their difference per task
    paper = parsed.tables["paper_layers"]
    assert paper["header"][0] == ["layer", "pos", "sem"]
    for entry in _results(sweep, "sem", "minilm", "layers")["layers"]["table"]:
        row = next(r for r in paper["rows"] if r[0] == str(entry["layer"]))
        other = _results(sweep, "sem", "minilm_random", "layers")["layers"]["table"][entry["layer"]]
        assert row[4:7] == [
            f"{100 * entry['test']:.2f}",
            f"{100 * other['test']:.2f}",
            f"{100 * (other['test'] - entry['test']):+.2f}".replace("+0.00", "0.00"),
        ]
    # the comparison: per task, one column per model and the difference
    compare = parsed.tables["compare_neurons"]
    assert compare["header"] == [
        ["task", "oracle test", "#neurons", "reduced test"],
        ["minilm", "minilm_random", "Δ"] * 3,
    ]
    for task in TASKS:
        a, b = (_results(sweep, task, m, "neurons")["neurons"] for m in MODELS)
        cells = next(r for r in compare["rows"] if r[0] == task)
        assert cells[4:7] == [
            str(a["n_neurons"]),
            str(b["n_neurons"]),
            f"{b['n_neurons'] - a['n_neurons']:+d}",
        ]
    runs = parsed.tables["runs"]
    assert len(runs["rows"]) == len(MODELS) * len(TASKS) * 4 + 1
    assert {r[5] for r in runs["rows"]} == {"cpu (x86_64, 2 threads)"}
    assert parsed.tables["timings"]["rows"][0][-1] == "23.5"


def test_missing_or_foreign_figures_are_reported_not_embedded(tmp_path: Path) -> None:
    data = _run("pos", "layers", layers=_layers())
    data["figures"] = ["figures/layers.png", "../elsewhere.png", "figures/not-a-png.png"]
    _write(tmp_path, "run", data)
    _png(tmp_path / "elsewhere.png", 33)
    (tmp_path / "run" / "figures").mkdir()
    (tmp_path / "run" / "figures" / "not-a-png.png").write_text("<svg/>")
    warnings: list[str] = []
    page = build_report([tmp_path / "run"], warn=warnings.append)
    run = tmp_path / "run"
    assert (
        warnings
        == page.warnings
        == [
            f"{run / 'figures' / 'layers.png'}: listed in results.json but missing or not a PNG; left out",
            f"{run / 'results.json'}: figure '../elsewhere.png' lies outside the run directory; left out",
            f"{run / 'figures' / 'not-a-png.png'}: listed in results.json but missing or not a PNG; left out",
        ]
    )
    assert 'id="left-out"' in page.html
    parsed = _Parsed()
    parsed.feed(page.html)
    assert [i["alt"] for i in parsed.images] == ["Figure 4: pos, probe score per layer"]  # drawn from Table 7


def test_cli_writes_the_page_and_exits_2_without_results(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(sweep), str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert f"{tmp_path / 'empty'} has no results.json below it" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    assert main([str(sweep), "--baseline", "bert", "--out", str(tmp_path / "r.html")]) == 2
    assert "baseline model 'bert' has no run here" in capsys.readouterr().err
    one = sweep / "pos_minilm_neurons"
    out = tmp_path / "sub" / "one.html"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "lexp.report", str(one), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (" in done.stderr and "from 1 results.json" in done.stderr
    assert "Table 8 / Tables 1-2" in out.read_text()


def test_importing_the_report_package_stays_light() -> None:
    code = "import sys, lexp.report, lexp.report.html; print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------------- in a real browser
needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium; or set LEXP_CHROMIUM)",
)


@needs_chromium
def test_page_renders_in_headless_chromium(sweep: Path, page: Any, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text(page.html, encoding="utf-8")
    seen = inspect_page(out)
    parsed = _Parsed()
    parsed.feed(page.html)
    assert len(seen["images"]) == len(parsed.images) == page.n_figures
    for image in seen["images"]:
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert image["box"][0] > 0 and image["box"][1] > 0, image  # laid out, not hidden
    # the embedded run figures decode to the sizes they were written with
    natural = sorted(i["naturalWidth"] for i in seen["images"] if i["source"].endswith(".png"))
    assert natural == sorted(Image.open(p).size[0] for p in sweep.rglob("figures/*.png"))
    rendered = {t["key"]: t for t in seen["tables"]}
    for table in load_tables([sweep], warn=lambda message: None, paper=True):
        assert rendered[table.key]["rows"] == table.cells(), table.key
        # Tables 6 and 7 in the paper's layout are shown; their long forms are folded below them
        folded = table.key in ("general", "compare_general", "layers", "compare_layers")
        assert rendered[table.key]["folded"] is folded, table.key
        if not folded:
            assert rendered[table.key]["box"][0] > 0 and rendered[table.key]["box"][1] > 0
    assert rendered["paper_layers"]["header"] == [
        ["layer", "pos", "sem"],
        ["minilm", "minilm_random", "Δ", "minilm", "minilm_random", "Δ"],
    ]
    assert seen["width"] <= 1280 + 1  # wide tables scroll inside their box, not the page
    shot = screenshot(out, tmp_path / "report.png", height=seen["height"])
    width, height = Image.open(shot).size
    assert width == 1280 and height == min(seen["height"], 30000) and height > 2000


@needs_chromium
def test_the_browser_check_sees_a_broken_image(tmp_path: Path) -> None:
    good = base64.b64encode(_png(tmp_path / "good.png", 21)).decode()
    page = tmp_path / "page.html"
    page.write_text(
        f'<!DOCTYPE html><html><body><img alt="good" src="data:image/png;base64,{good}">'
        '<img alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAA"></body></html>'
    )
    seen = {i["alt"]: i for i in inspect_page(page)["images"]}
    assert seen["good"]["naturalWidth"] == 21 and seen["good"]["box"][0] == 21
    assert seen["broken"]["naturalWidth"] == 0
