"""A generic reader for CoNLL-style column files (one token per line, blank line between sentences).

One function covers every labelling format the project reads, configured by column indices:

=====================  ============  ============  =========  ========  ===============
format                 word_column   label_column  separator  comments  skip_token_ids
=====================  ============  ============  =========  ========  ===============
UD CoNLL-U (XPOS)      1             4             ``\\t``     ``#``     yes
CoNLL-2000 chunking    0             2             None       None      no
PMB 4.0.0 (sem / cat)  0             3 / 4         ``\\t``     ``#``     no
=====================  ============  ============  =========  ========  ===============

Format facts the reader relies on (checked on the real files):

* **Comments only between sentences.** A line starting with ``comment_prefix`` is a comment only
  before the first token of a sentence (CoNLL-U and PMB put them there). Inside a sentence it is a
  token line, so a token ``#`` is never dropped; a misplaced comment fails loudly instead, as a
  line with too few columns. CoNLL-2000 has ``#`` (pound sign) tokens, one of them the first word
  of a sentence (train.txt line 202,400), so its config turns comments off.
* **CoNLL-U ids.** With ``skip_token_ids``, multiword-token ranges (``1-2``) and empty nodes
  (``8.1``) are skipped, but only in a sentence whose column 0 is a CoNLL-U id on *every* line with
  the word ids running 1, 2, ..., n, and never when column 0 is the word or the label column. CoNLL-2000 has 1,773 words such as ``1.8``
  or ``10-2`` in column 0; they are words, not ids.
* **Tokens with spaces.** With a separator (e.g. tab) every field is kept verbatim except for
  surrounding whitespace, so a token that contains a space stays one word. With
  ``separator=None`` columns are split on any whitespace, which cannot represent such tokens.
* **PMB documents.** PMB 4.0.0 separates *every* sentence by a blank line, also the sentences of
  one multi-sentence document (e.g. p94/d3206, "I apologize." + "It was my mistake."), so a blank
  line is a sentence boundary there too: train yields one sentence per ``# raw sent`` comment
  (7,745 sentences in 7,668 documents).
"""

from __future__ import annotations

import re
from pathlib import Path

from lexp.errors import LexpInputError
from lexp.tasks.base import Sentence

#: A CoNLL-U ID: a word index, a multiword-token range (``1-2``) or an empty node (``8.1``).
_CONLLU_ID = re.compile(r"[0-9]+(?:-[0-9]+|\.[0-9]+)?")

_Row = tuple[int, list[str]]  # (1-based line number, columns)


def read_columns(
    path: str | Path,
    *,
    word_column: int,
    label_column: int,
    separator: str | None = None,
    comment_prefix: str | None = "#",
    skip_token_ids: bool = True,
    min_columns: int | None = None,
) -> list[Sentence]:
    """Read a CoNLL-style file into labelled sentences.

    Columns are 0-based. ``separator=None`` splits on runs of whitespace; any other string splits
    exactly on it (use ``"\\t"`` for CoNLL-U and PMB). ``comment_prefix=None`` disables comments.
    ``min_columns`` makes every token line need at least that many columns. Besides, every token
    line must have as many columns as the file's first token line, so that a line missing a column
    cannot shift a label into the wrong place unnoticed.

    Raises LexpInputError naming the file, the 1-based line, the problem and the fix for: an empty
    file or one without sentences, a line with too few columns for ``word_column``/``label_column``
    or ``min_columns``, a column count that differs from the file's first token line, and an empty
    word or label (or ``_``, CoNLL-U's "unspecified", as a label in a CoNLL-U file).
    """
    path = Path(path)
    _check_arguments(path, word_column, label_column, separator, min_columns)
    text = _read_text(path)
    if not text.strip():
        raise LexpInputError(
            f"{path}:1: the file is empty. Point the task's `files` at a CoNLL-style file with one "
            "token per line and a blank line between sentences."
        )
    needed = max(word_column, label_column) + 1
    ids_possible = skip_token_ids and word_column != 0 and label_column != 0
    sentences: list[Sentence] = []
    rows: list[_Row] = []
    expected_columns: tuple[int, int] | None = None  # (count, line of the first token line)
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            if rows:
                sentences.append(_sentence(path, rows, word_column, label_column, ids_possible))
                rows = []
            continue
        if comment_prefix and not rows and raw.startswith(comment_prefix):
            continue
        columns = raw.rstrip("\r").split(separator) if separator is not None else raw.split()
        n = len(columns)
        if n < needed:
            _too_few_columns(path, lineno, n, word_column, label_column, comment_prefix, raw)
        if min_columns is not None and n < min_columns:
            raise LexpInputError(
                f"{path}:{lineno}: found {n} columns, but this format needs at least {min_columns} "
                f"(min_columns={min_columns}). Fix the line, or set task.min_columns to match the file."
            )
        if expected_columns is None:
            expected_columns = (n, lineno)
        elif n != expected_columns[0]:
            raise LexpInputError(
                f"{path}:{lineno}: found {n} columns, but the first token line ({expected_columns[1]}) "
                f"has {expected_columns[0]}; a missing or extra column would shift the labels. "
                f"Fix the line (check the separator: {_separator_name(separator)})."
            )
        rows.append((lineno, columns))
    if rows:
        sentences.append(_sentence(path, rows, word_column, label_column, ids_possible))
    if not sentences:
        raise LexpInputError(
            f"{path}:1: no sentences found (only blank or comment lines starting with "
            f"{comment_prefix!r}). Check the file, or set task.comment_prefix: null if token lines "
            "start with that prefix."
        )
    return sentences


def _check_arguments(
    path: Path, word_column: int, label_column: int, separator: str | None, min_columns: int | None
) -> None:
    for name, value in (("word_column", word_column), ("label_column", label_column)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LexpInputError(f"{path}: {name} must be a 0-based column index >= 0, got {value!r}")
    if word_column == label_column:
        raise LexpInputError(f"{path}: word_column and label_column are both {word_column}; they must differ")
    if separator == "" or (separator is not None and not isinstance(separator, str)):
        raise LexpInputError(f"{path}: separator must be null (any whitespace) or a string such as '\\t'")
    if min_columns is not None and (isinstance(min_columns, bool) or not isinstance(min_columns, int)):
        raise LexpInputError(f"{path}: min_columns must be an integer or null, got {min_columns!r}")
    if not path.is_file():
        raise LexpInputError(
            f"{path}: file not found. Check task.data_dir / task.files (or set LEXP_DATA to the data root)."
        )


def _read_text(path: Path) -> str:
    """Decode UTF-8 (a leading BOM is dropped) and name the line of any undecodable byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LexpInputError(
            f"{path}:{line}: the file is not valid UTF-8 ({exc.reason} at byte {exc.start}). "
            "Convert it, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


def _too_few_columns(
    path: Path,
    lineno: int,
    n: int,
    word_column: int,
    label_column: int,
    comment_prefix: str | None,
    raw: str,
) -> None:
    missing = [
        f"{name}={col} (column {col + 1} counting from 1)"
        for name, col in (("word_column", word_column), ("label_column", label_column))
        if col >= n
    ]
    hint = ""
    if comment_prefix and raw.startswith(comment_prefix):
        hint = (
            f" The line starts with {comment_prefix!r} but follows a token line; comments are only "
            "allowed before a sentence, so add a blank line before it."
        )
    raise LexpInputError(
        f"{path}:{lineno}: found {n} column{'s' if n != 1 else ''}, so {' and '.join(missing)} "
        f"is missing.{hint} Fix the line, or set task.word_column / task.label_column / "
        "task.separator to match the file."
    )


def _separator_name(separator: str | None) -> str:
    return "any whitespace" if separator is None else repr(separator)


def _sentence(
    path: Path, rows: list[_Row], word_column: int, label_column: int, ids_possible: bool
) -> Sentence:
    """Turn a block of token lines into a Sentence, skipping CoNLL-U ranges and empty nodes."""
    conllu = ids_possible and _is_conllu_sentence(rows)
    if conllu:
        rows = [row for row in rows if row[1][0].isdigit()]  # "1-2" and "8.1" are not words
    words = tuple(columns[word_column].strip() for _, columns in rows)
    labels = tuple(columns[label_column].strip() for _, columns in rows)
    if not all(words) or not all(labels) or (conllu and "_" in labels):
        _fail_on_empty(path, rows, words, labels, word_column, label_column, conllu)
    return Sentence(words=words, labels=labels, source=f"{path}:{rows[0][0]}")


def _fail_on_empty(
    path: Path,
    rows: list[_Row],
    words: tuple[str, ...],
    labels: tuple[str, ...],
    word_column: int,
    label_column: int,
    conllu: bool,
) -> None:
    for (lineno, _), word, label in zip(rows, words, labels, strict=True):
        if not word:
            raise LexpInputError(
                f"{path}:{lineno}: the word (column {word_column + 1}) is empty. Fix the line, or check "
                "task.word_column and task.separator."
            )
        if not label or (conllu and label == "_"):
            what = "empty" if not label else "'_' (unspecified in CoNLL-U)"
            raise LexpInputError(
                f"{path}:{lineno}: the label (column {label_column + 1}) is {what}. Every word needs a "
                "label: fix the line, or point task.label_column at a filled column."
            )


#: "1", "2", ... as written in CoNLL-U, to compare a sentence's word ids without parsing them.
_WORD_IDS = [str(i) for i in range(1, 1001)]


def _is_conllu_sentence(rows: list[_Row]) -> bool:
    """Column 0 is a CoNLL-U ID column: every entry is an ID and the word IDs run 1, 2, ..., n."""
    firsts = [columns[0] for _, columns in rows]
    word_ids = [first for first in firsts if first.isdigit()]
    if not word_ids or len(word_ids) < len(firsts) and not all(map(_CONLLU_ID.fullmatch, firsts)):
        return False
    expected = _WORD_IDS if len(word_ids) <= len(_WORD_IDS) else [str(i) for i in range(1, len(word_ids) + 1)]
    return word_ids == expected[: len(word_ids)]
