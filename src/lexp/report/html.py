"""One self-contained HTML page from any set of runs: ``python -m lexp.report multirun/ --out report.html``.

The page is what a user opens when there is no W&B server, and what they attach to a paper: every
table of :mod:`lexp.report.tables` (the same :class:`~lexp.report.tables.Table` objects, so the same
numbers as ``python -m lexp.tables``, with the model comparisons) and every figure the runs support,
laid out like the paper: Figure 1 (CKA per model, cross-model CKA), Figure 2 (ct curves across
tasks), Figure 3 (cluster make-up), Figure 4 (layer-wise scores per task, one line per model),
Tables 3/6/7/8/9/10, the minimal-set and timing figures, stage timings, and every other figure a
run wrote. Figures a run already wrote (``figures/*.png``) are reused; the cross-run ones are drawn
with matplotlib (Agg). Everything is embedded (PNG as base64 ``data:`` URIs, CSS inline): no
server, no network, no script. Text from results.json is escaped. The runs are read as the tables
read them (:func:`lexp.report.tables.load_runs`, i.e. through
:func:`lexp.report.results_schema.load_results`): the page sees only the current schema's names.

In a notebook::

    from lexp.report.html import build_report
    page = build_report(["multirun/"])     # Page: .html, .warnings, .n_figures
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lexp
from lexp.report import tables as tb
from lexp.report.tables import Column, Run, Table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# settings that vary between the jobs of one ct sweep, but not the clustering (CKA, make-up)
SWEEP_SETTINGS = ("analysis.ct", "analysis.evaluate")


def _stderr(message: str) -> None:
    print(f"lexp.report: {message}", file=sys.stderr, flush=True)


def esc(value: Any) -> str:
    """Text for HTML (element content and attribute values alike)."""
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------- figures
@dataclass
class Figure:
    """One embedded PNG: its bytes, a caption and where it came from (a run's file or 'generated')."""

    png: bytes
    caption: str
    source: str
    wide: bool = False  # a multi-panel figure: the page's full width

    def html(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        wide = ' class="wide"' if self.wide else ""
        return (
            f'<figure{wide}><img src="data:image/png;base64,{data}" '
            f'alt="{esc(self.caption)}" '
            f'data-source="{esc(self.source)}"><figcaption>{esc(self.caption)}</figcaption></figure>'
        )


def png_of(path: Path) -> bytes | None:
    """The bytes of a PNG file, or None when it is missing or not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(PNG_MAGIC) else None


class Drawer:
    """Draws cross-run figures with :mod:`lexp.report.figures` into a temp dir and returns PNG bytes."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="lexp-report-")
        self.count = 0

    def __call__(self, draw: Callable[..., Path], *args: Any, **kwargs: Any) -> bytes:
        self.count += 1
        path = Path(self.tmp.name) / f"figure-{self.count}.png"
        draw(*args, path=path, **kwargs)
        return path.read_bytes()

    def close(self) -> None:
        self.tmp.cleanup()


# -------------------------------------------------------------------------------------------- runs
def run_key(run: Run, drop: Sequence[str] = ()) -> tuple[str, str, str, str]:
    """(task, model, analysis, settings) of a run: runs sharing it repeat one experiment."""
    settings = json.dumps(tb.relevant_settings(run, drop), sort_keys=True)
    return (run.task, run.model, run.analysis, settings)


def newest_runs(runs: Iterable[Run], drop: Sequence[str] = ()) -> dict[tuple[str, ...], list[Run]]:
    """Runs grouped by :func:`run_key` (newest file first), groups in table order (task, model)."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(run_key(run, drop), []).append(run)
    for group in groups.values():
        group.sort(key=lambda r: (r.mtime_ns, str(r.path)), reverse=True)
    order = sorted(
        groups,
        key=lambda k: (tb._order(k[0], tb.TASK_ORDER), tb._order(k[1], tb.MODEL_ORDER), k[2], k[3]),
    )
    return {k: groups[k] for k in order}


def _fmt_seconds(value: Any) -> str:
    return "" if not isinstance(value, (int, float)) else f"{float(value):.1f}"


def _device(run: Run) -> str:
    device = run.data.get("device")
    if not isinstance(device, Mapping):
        return str(tb.get(run.data, "config", "device") or "")
    extra = [str(device[k]) for k in ("name",) if device.get(k)]
    if device.get("threads"):
        extra.append(f"{device['threads']} threads")
    return f"{device.get('device', '?')}" + (f" ({', '.join(extra)})" if extra else "")


# -------------------------------------------------------------------------------------------- page
@dataclass
class Page:
    """The report: its HTML and what was left out (also printed on stderr)."""

    html: str
    warnings: list[str] = field(default_factory=list)
    n_figures: int = 0
    n_tables: int = 0


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em 2em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin:1.2em 0 .4em}.meta{color:#555}.toc{columns:3;font-size:.95em}
.scroll{overflow-x:auto;margin:.4em 0 1em}
table.lexp{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
.caption{font-weight:600;padding:.3em 0;max-width:70em}
table.lexp th,table.lexp td{border:1px solid #d0d0d0;padding:2px 6px;white-space:nowrap}
table.lexp th{background:#f2f2f2}table.lexp td.num{text-align:right}
table.lexp td.neg{color:#b00020}table.lexp td.pos{color:#1b6e20}
table.lexp tbody tr:nth-child(even){background:#fafafa}
ul.notes{font-size:.9em;color:#555;margin:.2em 0 1em}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;border:1px solid #e3e3e3;padding:6px;background:#fff;max-width:min(100%,580px)}
figure.wide{max-width:100%}
figure img{display:block;max-width:100%;height:auto}figcaption{font-size:.85em;color:#444;margin-top:4px}
.warn{color:#8a4b00}details{margin:.3em 0 1em}summary{cursor:pointer;color:#444}
"""


def render_table(table: Table) -> str:
    """A :class:`Table` as HTML: the printed cells of :meth:`Table.cells`, numbers right-aligned.

    Columns named ``<value> · <model>`` (model comparisons) get a two-row header.
    """
    names = [c.name for c in table.columns]
    grouped = any(" · " in n for n in names)
    head: list[str] = []
    if grouped:
        top, bottom = [], []
        i = 0
        while i < len(names):
            if " · " not in names[i]:
                top.append(f'<th rowspan="2">{esc(names[i])}</th>')
                i += 1
                continue
            group = names[i].split(" · ", 1)[0]
            j = i
            while j < len(names) and " · " in names[j] and names[j].split(" · ", 1)[0] == group:
                bottom.append(f"<th>{esc(names[j].split(' · ', 1)[1])}</th>")
                j += 1
            top.append(f'<th colspan="{j - i}">{esc(group)}</th>')
            i = j
        head = ["<tr>" + "".join(top) + "</tr>", "<tr>" + "".join(bottom) + "</tr>"]
    else:
        head = ["<tr>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    body = []
    for cells in table.cells():
        tds = []
        for text, column in zip(cells, table.columns, strict=True):
            classes = []
            if column.kind != "text":
                classes.append("num")
            if column.kind.startswith("d:") and text and text[0] in "+-":
                classes.append("pos" if text[0] == "+" else "neg")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            tds.append(f"<td{attr}>{esc(text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in table.notes)
    return (
        f'<div class="caption">{esc(table.title)}</div>'
        f'<div class="scroll"><table class="lexp" id="table-{esc(table.key)}" data-key="{esc(table.key)}" '
        f'aria-label="{esc(table.title)}"><thead>{"".join(head)}</thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>" + (f'<ul class="notes">{notes}</ul>' if notes else "")
    )


def _figures_html(figs: Sequence[Figure]) -> str:
    return '<div class="figs">' + "".join(f.html() for f in figs) + "</div>" if figs else ""


#: What a run's own figure shows (a caption, not its file name).
FIGURE_CAPTIONS = {
    "cka.png": "linear CKA between layers",
    "cluster_makeup.png": "cluster make-up: neurons per layer in clusters of two or more",
    "minimal_set.png": "minimal neuron set: score against the number of neurons",
    "forward_time.png": "forward pass time per sentence against transformer layers kept",
    "classifier_time.png": "probe train and inference time against the number of features",
}


class ReportBuilder:
    """Collects the sections of one report from loaded runs and their tables."""

    def __init__(
        self,
        runs: Sequence[Run],
        tables: Sequence[Table],
        *,
        split: str,
        warnings: list[str],
        warn: Callable[[str], None],
        inputs: Sequence[Path],
    ) -> None:
        self.runs = list(runs)
        self.tables = {t.key: t for t in tables}
        self.split = split
        self.warnings = warnings  # every line so far (shown at the end of the page)
        self.warn = warn  # adds a line to warnings and prints it
        self.inputs = inputs
        self.used: set[Path] = set()  # run figures already placed in a section
        self.draw = Drawer()
        self.n_figures = 0
        self.sections: list[tuple[str, str, str]] = []  # (id, title, html)

    # ------------------------------------------------------------------ helpers
    def run_png(self, run: Run, name: str) -> Figure | None:
        """The run's own ``figures/<name>`` (a figure it listed in results.json), or None."""
        listed = run.data.get("figures") or []
        if not any(isinstance(f, str) and Path(f).name == name for f in listed):
            return None
        path = run.path.parent / "figures" / name
        data = png_of(path)
        if data is None:
            self.warn(f"{path}: listed in results.json but missing or not a PNG; left out")
            return None
        self.used.add(path.resolve())
        return self._fig(data, f"{run.task} · {run.model}: {FIGURE_CAPTIONS.get(name, name)}", str(path))

    def _fig(self, png: bytes, caption: str, source: str) -> Figure:
        self.n_figures += 1
        return Figure(png, caption, source)

    def generated(
        self, caption: str, draw: Callable[..., Path], *args: Any, wide: bool = False, **kwargs: Any
    ) -> Figure:
        figure = self._fig(self.draw(draw, *args, **kwargs), caption, "generated by lexp.report")
        figure.wide = wide
        return figure

    def section(self, sid: str, title: str, parts: Iterable[str]) -> None:
        body = "".join(p for p in parts if p)
        if body:
            self.sections.append((sid, title, body))

    def table(self, key: str) -> str:
        """A table and its model comparison, if the runs produced them; for Tables 6 and 7 the
        paper's layout (which holds the comparison too) with the long forms folded below it."""
        long = "".join(render_table(self.tables[k]) for k in (key, "compare_" + key) if k in self.tables)
        paper = self.tables.get("paper_" + key)
        if paper is None or not long:
            return long
        return (
            render_table(paper)
            + f"<details><summary>{esc(self.tables[key].title.split(':')[0])}: every column, one row per "
            f"task and model</summary>{long}</details>"
        )

    def score_split(self, table: Table) -> str:
        """The report's split, or the other one when no row of ``table`` has a score of it."""
        for split in (self.split, "dev" if self.split == "test" else "test"):
            if any(r.get(split) is not None for r in table.records()):
                return split
        return self.split

    # ------------------------------------------------------------------ sections
    def header(self) -> str:
        runs = self.runs
        models = tb.model_order(r.model for r in runs)
        tasks = sorted({r.task for r in runs}, key=lambda t: tb._order(t, tb.TASK_ORDER))
        analyses = sorted({r.analysis for r in runs})
        devices = sorted({_device(r) for r in runs} - {""})
        versions = sorted({str(r.data.get("lexp_version", "?")) for r in runs})
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        items = [
            ("inputs", ", ".join(str(p) for p in self.inputs)),
            ("runs", f"{len(runs)} results.json"),
            ("models", ", ".join(models)),
            ("tasks", ", ".join(tasks)),
            ("analyses", ", ".join(analyses)),
            ("devices", "; ".join(devices) or "not recorded"),
            ("lexp version of the runs", ", ".join(versions)),
        ]
        meta = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
        return (
            "<h1>lexp report: redundancy in pretrained transformers</h1>"
            f'<p class="meta">Generated {esc(now)} by lexp {esc(lexp.__version__)} (python -m lexp.report); '
            "the numbers are those of the results.json files listed below. Scores in %, as the paper "
            "(Dalvi et al., 2020).</p>"
            f'<div class="scroll"><table class="lexp meta-table">{meta}</table></div>'
        )

    def runs_section(self) -> None:
        run_table = Table(
            "runs",
            "Runs (every results.json read; newest of repeated runs is used in the tables)",
            [
                Column("run directory"),
                Column("task"),
                Column("model"),
                Column("analysis"),
                Column("status"),
                Column("device"),
                Column("lexp"),
                Column("total s", "seconds"),
                Column("written"),
            ],
            [
                [
                    str(r.path.parent),
                    r.task,
                    r.model,
                    r.analysis,
                    r.status,
                    _device(r),
                    str(r.data.get("lexp_version", "")),
                    tb.get(r.data, "timings_s", "total"),
                    dt.datetime.fromtimestamp(r.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M"),
                ]
                for key, group in newest_runs(self.runs).items()
                for r in group
            ],
        )
        models: dict[str, Run] = {}
        for group in newest_runs(self.runs).values():
            models.setdefault(group[0].model, group[0])
        sentence_vectors: dict[str, set[str]] = {}
        for run in self.runs:  # the representation sentence tasks used (word tasks record none)
            family = run.data.get("model_family")
            if isinstance(family, Mapping) and family.get("sentence"):
                sentence_vectors.setdefault(run.model, set()).add(str(family["sentence"]))
        model_rows = []
        for name in tb.model_order(models):
            run = models[name]
            family = run.data.get("model_family")
            family = family if isinstance(family, Mapping) else {}
            config = tb.get(run.data, "config", "model")
            config = config if isinstance(config, Mapping) else {}
            other = {
                k: v
                for k, v in tb.flatten(config).items()
                if k not in ("name", "name_or_path") and v is not None
            }
            model_rows.append(
                [
                    name,
                    str(tb.get(config, "name_or_path") or ""),
                    tb.get(run.data, "n_layers"),
                    tb.get(run.data, "hidden"),
                    tb.get(run.data, "n_neurons"),
                    str(family.get("family") or "not recorded"),
                    str(family.get("tokenizer_kind") or ""),
                    ", ".join(sorted(sentence_vectors.get(name, ()))),
                    ", ".join(f"{k}={json.dumps(v)}" for k, v in other.items()),
                ]
            )
        model_table = Table(
            "models",
            "Models (layer 0 = embeddings)",
            [
                Column("model"),
                Column("name_or_path"),
                Column("layers", "int"),
                Column("hidden", "int"),
                Column("neurons", "int"),
                Column("family"),
                Column("tokenizer"),
                Column("sentence vector"),
                Column("model settings"),
            ],
            model_rows,
        )
        data: dict[str, dict[str, Any]] = {}
        for run in self.runs:
            entry = data.setdefault(run.task, {"kind": run.kind, "files": {}, "counts": None})
            for f in run.data.get("data_files") or []:
                entry["files"][str(f)] = None
            if entry["counts"] is None and isinstance(run.data.get("rows"), Mapping):
                entry["counts"] = run.data["rows"]
        data_table = Table(
            "data",
            "Data files (rows = words for word-level tasks, examples for sentence tasks, as stored)",
            [
                Column("task"),
                Column("kind"),
                Column("train rows", "int"),
                Column("dev rows", "int"),
                Column("test rows", "int"),
                Column("files"),
            ],
            [
                [
                    task,
                    info["kind"] or "",
                    *[tb.get(info["counts"] or {}, s) for s in ("train", "dev", "test")],
                    " ".join(info["files"]) or "not recorded",
                ]
                for task, info in sorted(data.items(), key=lambda kv: tb._order(kv[0], tb.TASK_ORDER))
            ],
        )
        self.section(
            "runs",
            "Runs, models and data",
            [render_table(run_table), render_table(model_table), render_table(data_table)],
        )

    def oracle_section(self) -> None:
        self.section("oracle", "Oracle: probe on all neurons", [self.table("oracle")])

    def figure1(self) -> None:
        """Figure 1: CKA heatmap per model (and task), cross-model CKA, and the adjacent-layer table."""
        from lexp.report import figures

        figs = []
        groups = newest_runs([r for r in self.runs if r.analysis == "general"], SWEEP_SETTINGS)
        for runs in groups.values():  # task by task, the models side by side
            run = next((r for r in runs if tb.get(r.data, "general", "cka") is not None), runs[0])
            fig = self.run_png(run, "cka.png")
            cka = tb.get(run.data, "general", "cka")
            if fig is None and isinstance(cka, list) and cka:
                fig = self.generated(
                    f"{run.task} · {run.model}: linear CKA between layers",
                    figures.cka_heatmap,
                    _matrix(cka),
                    title=f"{run.model} ({run.task}): linear CKA",
                    layers=_layer_ids(run.data, len(cka)),
                )
            if fig is not None:
                figs.append(fig)
            debiased = tb.get(run.data, "general", "cka_debiased")
            if isinstance(debiased, list) and debiased:
                figs.append(
                    self.generated(
                        f"{run.task} · {run.model}: debiased linear CKA between layers",
                        figures.cka_heatmap,
                        _matrix(debiased),
                        title=f"{run.model} ({run.task}): debiased CKA",
                        layers=_layer_ids(run.data, len(debiased)),
                    )
                )
        cross = self.cross_model_cka()
        parts = [_figures_html(figs)]
        if cross:
            parts.append("<h3>Cross-model CKA (analysis=compare)</h3>" + _figures_html(cross))
        parts.append(self.table("cka"))
        self.section("fig1", "Figure 1: layer similarity (linear CKA)", parts)

    def cross_model_cka(self) -> list[Figure]:
        """Heatmaps of ``analysis=compare`` runs: their own CKA figures, else drawn from the matrices."""
        from lexp.report import figures

        out = []
        for runs in newest_runs([r for r in self.runs if r.analysis == "compare"]).values():
            run = runs[0]
            own = [
                f
                for f in run.data.get("figures") or []
                if isinstance(f, str) and "cka" in Path(f).name.lower()
            ]
            placed = [fig for fig in (self.run_png(run, Path(f).name) for f in own) if fig is not None]
            if placed:
                out += placed
                continue
            block = run.data.get("compare")
            if not isinstance(block, Mapping):
                continue
            names = block.get("models")
            if not (isinstance(names, list) and len(names) == 2):
                names = [block.get("model_a", run.model), block.get("model_b", "model B")]
            for key in ("cka", "cka_biased", "cka_debiased"):
                matrix = block.get(key)
                if isinstance(matrix, list) and matrix and isinstance(matrix[0], list):
                    label = "debiased " if "debiased" in key else ""
                    out.append(
                        self.generated(
                            f"{run.task}: {label}CKA {names[0]} vs {names[1]}",
                            figures.cka_cross_heatmap,
                            _matrix(matrix),
                            title=f"{label}CKA: {names[0]} vs {names[1]} ({run.task})",
                            xlabel=f"{names[1]} layer",
                            ylabel=f"{names[0]} layer",
                        )
                    )
        return out

    def figure2(self) -> None:
        """Figure 2 across tasks (one panel column per model) and Table 6."""
        from lexp.report import figures

        table = self.tables.get("general")
        figs = []
        if table is not None:
            column = self.score_split(table)
            label = f"{column} score (%)"
            curves: dict[str, dict[str, tuple[list, list, list]]] = {}
            for r in table.records():
                if r["ct"] == "oracle" or not isinstance(r["ct"], (int, float)):
                    continue
                model = r.get("model") or _only_model(self.runs, "general")
                series = r["task"] + (f" ({r['settings']})" if r.get("settings") else "")
                cts, removed, scores = curves.setdefault(model, {}).setdefault(series, ([], [], []))
                cts.append(float(r["ct"]))
                removed.append(float(r["% removed"]))
                scores.append(r.get(column))
            if any(len(c[0]) > 1 for per_model in curves.values() for c in per_model.values()):
                ordered = {m: curves[m] for m in tb.model_order(curves)}
                figs.append(
                    self.generated(
                        "Figure 2: score and % neurons removed against the clustering threshold, all tasks",
                        figures.ct_curves,
                        ordered,
                        wide=len(ordered) > 1,
                        title="Correlation clustering: effect of ct (Fig. 2)",
                        score_label=label,
                    )
                )
        self.section(
            "fig2",
            "Figure 2 and Table 6: correlation clustering",
            [_figures_html(figs), self.table("general")],
        )

    def figure3(self) -> None:
        """Figure 3: where the clustered neurons lie (per task and model; one ct sweep = one figure)."""
        from lexp.report import figures

        figs = []
        groups = newest_runs([r for r in self.runs if r.analysis == "general"], SWEEP_SETTINGS)
        for runs in groups.values():
            if len(runs) == 1:
                fig = self.run_png(runs[0], "cluster_makeup.png")
                if fig is not None:
                    figs.append(fig)
                    continue
            makeup: dict[float, Mapping[str, float]] = {}
            for run in reversed(runs):  # newest last: it wins a ct two jobs share
                for row in tb.get(run.data, "general", "table6") or []:
                    pct = tb.get(row, "makeup", "pct")
                    if isinstance(pct, Mapping) and isinstance(row.get("ct"), (int, float)):
                        makeup[float(row["ct"])] = pct
            if makeup:
                run = runs[0]
                figs.append(
                    self.generated(
                        f"{run.task} · {run.model}: cluster make-up",
                        figures.cluster_makeup_bars,
                        makeup,
                        title=f"{run.model} ({run.task}): where clustered neurons lie (Fig. 3)",
                    )
                )
        self.section("fig3", "Figure 3: make-up of the clusters", [_figures_html(figs)])

    def figure4(self) -> None:
        """Figure 4 per task (all models in one plot) and Table 7."""
        from lexp.report import figures

        table = self.tables.get("layers")
        figs = []
        if table is not None:
            column = self.score_split(table)
            label, control = f"{column} score (%)", f"control {column}"
            per_task: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
            for r in table.records():
                model = r.get("model") or _only_model(self.runs, "layers")
                task = (r["task"], r.get("settings") or "")
                series = per_task.setdefault(task, {}).setdefault(
                    model, {"scores": [], "std": [], "control": [], "oracle": None}
                )
                if r["layer"] == "oracle":
                    series["oracle"] = r.get(column)
                    continue
                value = r.get(column)
                series["scores"].append(value)
                series["std"].append(getattr(value, "std", None))
                series["control"].append(r.get(control))
            for (task, settings), by_model in per_task.items():
                ordered = {m: by_model[m] for m in tb.model_order(by_model)}
                for series in ordered.values():
                    if not any(s is not None for s in series["control"]):
                        series["control"] = None
                    if not any(s is not None for s in series["std"]):
                        series["std"] = None
                name = task + (f" ({settings})" if settings else "")
                figs.append(
                    self.generated(
                        f"Figure 4: {name}, probe score per layer"
                        + (" by model" if len(ordered) > 1 else ""),
                        figures.layer_curves,
                        ordered,
                        title=f"{name}: layer-wise probes (Fig. 4)",
                        score_label=label,
                    )
                )
        self.section(
            "fig4",
            "Figure 4 and Table 7: layer-level redundancy",
            [_figures_html(figs), self.table("layers")],
        )

    def table8(self) -> None:
        """Table 8 (Tables 1-2), the model comparison as bars, and each run's minimal-set curve."""
        figs = self._bars("neurons", "#neurons", "Tables 1-2: size of the minimal neuron set", "#neurons")
        for runs in newest_runs([r for r in self.runs if r.analysis == "neurons"]).values():
            fig = self.run_png(runs[0], "minimal_set.png")
            if fig is not None:
                figs.append(fig)
        self.section(
            "table8",
            "Table 8 (Tables 1-2): minimal set of neurons",
            [self.table("neurons"), _figures_html(figs)],
        )

    def pipeline(self) -> None:
        """Tables 3, 9, 10, the LS / CCFS comparison as bars, and each run's timing figures."""
        figs = self._bars("pipeline", "LS layers", "LayerSelector: layers kept (incl. embeddings)", "layers")
        figs += self._bars("pipeline", "CCFS #neurons", "CCFS: neurons kept", "#neurons")
        for runs in newest_runs([r for r in self.runs if r.analysis == "pipeline"]).values():
            for name in ("forward_time.png", "classifier_time.png"):
                fig = self.run_png(runs[0], name)
                if fig is not None:
                    figs.append(fig)
        self.section(
            "pipeline",
            "Tables 3, 9, 10: efficient transfer (LayerSelector + CCFS)",
            [self.table("pipeline"), _figures_html(figs)],
        )

    def layerdrop(self) -> None:
        """analysis=layerdrop: BI, angular distance and adjacent CKA per block, and the drop test."""
        if "layerdrop" not in self.tables:
            return
        figs = []
        for runs in newest_runs([r for r in self.runs if r.analysis == "layerdrop"]).values():
            fig = self.run_png(runs[0], "layerdrop.png")
            if fig is not None:
                figs.append(fig)
        self.section(
            "layerdrop",
            "Layer redundancy of the LLM literature: Block Influence, angular distance, drop test",
            [self.table("layerdrop"), _figures_html(figs)],
        )

    def _bars(self, key: str, column: str, title: str, ylabel: str) -> list[Figure]:
        """Grouped bars (task × model) of one column, when several models ran the same tasks."""
        from lexp.report import figures

        table = self.tables.get(key)
        if table is None or "compare_" + key not in self.tables:
            return []
        records = [r for r in table.records() if not str(r["task"]).startswith("average (")]
        tasks = list(dict.fromkeys(r["task"] for r in records))
        models = tb.model_order(r["model"] for r in records)
        values = {(r["task"], r["model"]): r.get(column) for r in records if not r.get("settings")}
        series = {m: [values.get((t, m)) for t in tasks] for m in models}
        return [
            self.generated(
                f"{title}, by model", figures.grouped_bars, tasks, series, title=title, ylabel=ylabel
            )
        ]

    def timings(self) -> None:
        """Wall time of every stage of every run used (seconds, from results.json ``timings_s``)."""
        used = [g[0] for g in newest_runs(self.runs).values()]
        stages = list(
            dict.fromkeys(
                s
                for r in used
                for s in (r.data.get("timings_s") or {})
                if isinstance(s, str) and s != "total"
            )
        )
        if not stages:
            return
        rows = []
        for r in used:
            timings = r.data.get("timings_s") or {}
            rows.append(
                [r.task, r.model, r.analysis, _device(r)]
                + [timings.get(s) for s in stages]
                + [timings.get("total")]
            )
        table = Table(
            "timings",
            "Stage wall times in seconds (total includes model loading and everything else)",
            [Column("task"), Column("model"), Column("analysis"), Column("device")]
            + [Column(s, "seconds") for s in stages]
            + [Column("total", "seconds")],
            rows,
        )
        self.section("timings", "Timings", [render_table(table)])

    def appendix(self) -> None:
        """Every other figure the runs wrote (per-run Figure 2 and 4, and any others)."""
        figs = []
        for group in newest_runs(self.runs).values():
            run = group[0]
            for name in run.data.get("figures") or []:
                if not isinstance(name, str):
                    continue
                path = run.path.parent / name
                if path.resolve() in self.used or path.suffix.lower() != ".png":
                    continue
                if run.path.parent.resolve() not in path.resolve().parents:
                    self.warn(f"{run.path}: figure {name!r} lies outside the run directory; left out")
                    continue
                data = png_of(path)
                if data is None:
                    self.warn(f"{path}: listed in results.json but missing or not a PNG; left out")
                    continue
                self.used.add(path.resolve())
                figs.append(
                    self._fig(
                        data, f"{run.task} · {run.model} · {run.analysis}: {Path(name).name}", str(path)
                    )
                )
        self.section("run-figures", "Figures of each run", [_figures_html(figs)])

    def build(self) -> str:
        self.runs_section()
        self.oracle_section()
        self.figure1()
        self.figure2()
        self.figure3()
        self.figure4()
        self.table8()
        self.pipeline()
        self.layerdrop()
        self.timings()
        self.appendix()
        if self.warnings:
            items = "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
            self.sections.append(("left-out", "Left out", f'<ul class="warn">{items}</ul>'))
        toc = "".join(f'<li><a href="#{esc(sid)}">{esc(title)}</a></li>' for sid, title, _ in self.sections)
        body = "".join(
            f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{part}</section>'
            for sid, title, part in self.sections
        )
        self.draw.close()
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="lexp {esc(lexp.__version__)}">'
            f"<title>lexp report</title><style>{CSS}</style></head><body>"
            f'{self.header()}<nav><ul class="toc">{toc}</ul></nav>{body}</body></html>\n'
        )


def _matrix(rows: Sequence[Sequence[Any]]) -> Any:
    import numpy as np

    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def _only_model(runs: Sequence[Run], analysis: str) -> str:
    """The model of single-model tables (they carry no model column)."""
    return next((r.model for r in runs if r.analysis == analysis), "model")


def build_report(
    paths: Iterable[str | Path],
    *,
    baseline: str | None = None,
    split: str = "test",
    warn: Callable[[str], None] = _stderr,
) -> Page:
    """The report over every results.json below ``paths`` (a ``ValueError`` for an unknown baseline)."""
    paths = [Path(p) for p in paths]
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    files, empty = tb.find_results(paths)
    for path in empty:
        note(f"{path}: no {tb.RESULTS} found")
    runs = tb.model_variants(tb.load_runs(files, note))
    tables = tb.build_tables(runs, note, baseline=baseline, split=split, paper=True)
    builder = ReportBuilder(runs, tables, split=split, warnings=warnings, warn=note, inputs=paths)
    text = builder.build()
    return Page(text, warnings, builder.n_figures, len(tables))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the page; exit 2 if a path has no results.json or the baseline model has no run."""
    parser = argparse.ArgumentParser(
        prog="python -m lexp.report",
        description="One self-contained HTML page (tables and figures) from every results.json below the paths.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="run directories, sweep directories or results.json files"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="the HTML file (default: report.html)"
    )
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also save a full-page screenshot taken by headless Chromium (needs chromium installed)",
    )
    tb.add_compare_arguments(parser)
    args = parser.parse_args(argv)
    files, empty = tb.find_results(args.paths)
    if empty:
        for path in empty:
            what = "does not exist" if not path.exists() else f"has no {tb.RESULTS} below it"
            _stderr(f"error: {path} {what}")
        return 2
    start = time.perf_counter()
    try:
        page = build_report(args.paths, baseline=args.baseline, split=args.split)
    except ValueError as exc:
        _stderr(f"error: --baseline: {exc}")
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page.html, encoding="utf-8")
    size = args.out.stat().st_size
    _stderr(
        f"wrote {args.out} ({size / 1e6:.1f} MB: {page.n_tables} tables, {page.n_figures} figures from "
        f"{len(files)} {tb.RESULTS}) in {time.perf_counter() - start:.1f} s"
    )
    if args.screenshot is not None:
        from lexp.report.browser import BrowserError, screenshot

        try:
            shot = screenshot(args.out, args.screenshot)
        except BrowserError as exc:
            _stderr(f"error: screenshot: {exc}")
            return 1
        _stderr(f"wrote {shot}")
    return 0


def _layer_ids(data: Mapping[str, Any], n: int) -> list[int] | None:
    """The model's layer number of each of ``n`` stored layers (results.json ``layer_ids``, written
    for ``model.layers`` subsets too); None when absent or of another length."""
    ids = data.get("layer_ids")
    return [int(i) for i in ids] if isinstance(ids, list) and len(ids) == n else None
