"""Readers for the official GLUE TSV files (and the labelled stand-ins in ``$LEXP_DATA/glue``).

Rows are split exactly as GLUE's own processors do: ``csv`` with tab delimiter and
``QUOTE_NONE``, so the many unbalanced ``"`` in MRPC, QNLI, QQP, RTE and STS-B are plain text.

Columns are found by their header names, so the labelled train/dev files and the unlabelled test
files (same header minus the label column) share one reader. Formats without a header give their
column layout instead: the QQP subset here (``id qid1 qid2 question1 question2 is_duplicate``; the
official QQP files have that header) and the MNLI samples (``gold_label sentence1 sentence2``; the
official MNLI files have a header with those names among others). Quirks handled explicitly:

* MRPC's header starts with a UTF-8 BOM (``\\ufeffQuality``): files are decoded as ``utf-8-sig``.
* QQP's first row has its label glued to ``question2`` by a space (``... jlpt5? 0``). That row is
  repaired, and the repair is reported through ``repairs`` (the task's ``notes``), never silently.
* STS-B's label is a float ``score`` in [0, 5] (regression).
* GLUE test files are unlabelled: they can be read with ``require_labels=False`` (label ``None``).

Any other malformed row raises LexpInputError naming the file and the 1-based line.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lexp.errors import LexpInputError
from lexp.tasks.base import Example

log = logging.getLogger(__name__)

_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")


@dataclass(frozen=True)
class GlueFormat:
    """Where a GLUE task keeps its texts and label, and which labels are valid."""

    text_a: str  # header name of the first text
    text_b: str | None  # header name of the second text (None: single-sentence task)
    label: str  # header name of the label column
    label_values: tuple[str, ...] | None  # valid class labels; None: a float score (regression)
    score_range: tuple[float, float] | None = None  # regression only
    headerless: tuple[str, ...] | None = None  # column names of files that have no header
    glued_label: bool = False  # the format is known to glue the label to the previous field

    @property
    def kind(self) -> str:
        return "regression" if self.label_values is None else "classification"


FORMATS: dict[str, GlueFormat] = {
    "sst2": GlueFormat("sentence", None, "label", _BINARY),
    "mrpc": GlueFormat("#1 String", "#2 String", "Quality", _BINARY),
    "mnli": GlueFormat(
        "sentence1",
        "sentence2",
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        headerless=("gold_label", "sentence1", "sentence2"),
    ),
    "qnli": GlueFormat("question", "sentence", "label", _ENTAILMENT),
    "qqp": GlueFormat(
        "question1",
        "question2",
        "is_duplicate",
        _BINARY,
        headerless=("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        glued_label=True,
    ),
    "rte": GlueFormat("sentence1", "sentence2", "label", _ENTAILMENT),
    "stsb": GlueFormat("sentence1", "sentence2", "score", None, score_range=(0.0, 5.0)),
}


def glue_format(task: str) -> GlueFormat:
    """The format of a GLUE task (``sst2``, ``mrpc``, ``mnli``, ``qnli``, ``qqp``, ``rte``, ``stsb``)."""
    try:
        return FORMATS[task]
    except KeyError:
        raise LexpInputError(
            f"unknown GLUE task {task!r}; known: {', '.join(FORMATS)}. Set task.glue_task to one of them."
        ) from None


def read_glue(
    task: str,
    path: str | Path,
    *,
    require_labels: bool = True,
    repairs: list[str] | None = None,
) -> list[Example]:
    """Read one GLUE TSV file of ``task`` into examples, in file order.

    ``require_labels=False`` also accepts unlabelled (test) files, whose examples get label
    ``None``. Every repaired row is described in ``repairs`` (also logged when ``repairs`` is None).
    """
    fmt = glue_format(task)
    path = Path(path)
    if not path.is_file():
        raise LexpInputError(
            f"{path}: file not found. Check task.data_dir / task.files (or set LEXP_DATA to the data root)."
        )
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = _numbered_rows(reader, path)
        first = next(rows, None)
        if first is None:
            raise LexpInputError(f"{path}:1: the file is empty. Point task.files at a {task} TSV file.")
        line, row = first
        if fmt.text_a in row:
            names, data = row, rows
        elif fmt.headerless is not None:
            names, data = list(fmt.headerless), _chain(first, rows)
        else:
            raise LexpInputError(
                f"{path}:1: expected a {task} header with the column {fmt.text_a!r}, found "
                f"{_show(row)}. Is this the right file for task {task}?"
            )
        columns = _column_positions(fmt, names, path, task, require_labels)
        for line, row in data:
            if len(row) != len(names):
                row = _repair_or_fail(fmt, row, names, path, line, repairs)
            examples.append(_example(fmt, row, columns, path, line))
    if not examples:
        raise LexpInputError(
            f"{path}:2: the file has a header but no rows. Point task.files at a {task} file."
        )
    return examples


def _numbered_rows(reader, path: Path):
    """Yield (1-based line, row); blank lines are allowed only at the end of the file."""
    blank: int | None = None
    try:
        for row in reader:
            if not row or row == [""]:
                blank = blank or reader.line_num
                continue
            if blank is not None:
                raise LexpInputError(
                    f"{path}:{blank}: blank line inside the file. Remove it (GLUE files have one example per line)."
                )
            yield reader.line_num, row
    except UnicodeDecodeError as exc:
        raise LexpInputError(
            f"{path}:{reader.line_num + 1}: not valid UTF-8 ({exc.reason}). Convert the file to UTF-8."
        ) from None


def _chain(first, rows):
    yield first
    yield from rows


def _column_positions(
    fmt: GlueFormat, names: list[str], path: Path, task: str, require_labels: bool
) -> tuple[int, int | None, int | None]:
    """Positions of text_a, text_b and label (None when the file is unlabelled)."""
    wanted = [fmt.text_a] + ([fmt.text_b] if fmt.text_b else [])
    missing = [n for n in wanted if n not in names]
    if missing:
        raise LexpInputError(
            f"{path}:1: the header lacks {', '.join(map(repr, missing))} (found {_show(names)}). "
            f"Is this the right file for task {task}?"
        )
    if fmt.label not in names and require_labels:
        raise LexpInputError(
            f"{path}:1: no label column {fmt.label!r} (found {_show(names)}); GLUE test files are "
            "unlabelled. Use a labelled file: the protocol tests on the official dev set."
        )
    return (
        names.index(fmt.text_a),
        names.index(fmt.text_b) if fmt.text_b else None,
        names.index(fmt.label) if fmt.label in names else None,
    )


_GLUED = re.compile(r"(.*\S)\s+(\S+)")


def _repair_or_fail(
    fmt: GlueFormat, row: list[str], names: list[str], path: Path, line: int, repairs: list[str] | None
) -> list[str]:
    """Split a label glued to the previous field (a known QQP quirk) or raise."""
    if fmt.glued_label and len(row) == len(names) - 1 and names[-1] == fmt.label:
        match = _GLUED.fullmatch(row[-1])
        if match and match.group(2) in (fmt.label_values or ()):
            text, label = match.groups()
            note = (
                f"{path}:{line}: label {label!r} was glued to {names[-2]} by a space; split it off "
                f"({len(row)} fields repaired to {len(names)})"
            )
            if repairs is None:
                log.warning("repaired %s", note)
            else:
                repairs.append(note)
            return [*row[:-1], text, label]
    raise LexpInputError(
        f"{path}:{line}: found {len(row)} tab-separated fields, expected {len(names)} "
        f"({_show(names)}). Fix or remove the row (a tab inside a text splits it)."
    )


def _example(
    fmt: GlueFormat, row: list[str], columns: tuple[int, int | None, int | None], path: Path, line: int
) -> Example:
    a, b, y = columns
    text_a = row[a]
    text_b = row[b] if b is not None else None
    for name, text in ((fmt.text_a, text_a), (fmt.text_b, text_b)):
        if text is not None and not text.strip():
            raise LexpInputError(f"{path}:{line}: the text {name!r} is empty. Fix or remove the row.")
    label: str | float | None = None
    if y is not None:
        raw = row[y].strip()
        if fmt.label_values is not None:
            if raw not in fmt.label_values:
                raise LexpInputError(
                    f"{path}:{line}: label {raw!r} is not one of {', '.join(fmt.label_values)}. "
                    "Fix the row, or check that the file belongs to this task."
                )
            label = raw
        else:
            label = _score(raw, fmt.score_range, path, line)
    return Example(text_a=text_a, text_b=text_b, label=label, source=f"{path}:{line}")


def _score(raw: str, score_range: tuple[float, float] | None, path: Path, line: int) -> float:
    try:
        score = float(raw)
    except ValueError:
        score = math.nan
    low, high = score_range or (-math.inf, math.inf)
    if not (low <= score <= high):  # also rejects nan
        raise LexpInputError(
            f"{path}:{line}: score {raw!r} is not a number in [{low:g}, {high:g}]. Fix the row."
        )
    return score


def _show(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:12])
    return f"[{shown}{', ...' if len(names) > 12 else ''}]"
