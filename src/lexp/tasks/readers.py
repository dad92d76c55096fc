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
  line with too few columns. Before a sentence, a prefixed line that looks like a token line (as
  many columns as the file's token lines, and a first field without spaces, such as ``#<TAB>#``)
  cannot be told from a sentence that starts with the token ``#``: that is an error, never a
  silently dropped token. CoNLL-2000 and the Penn Treebank have ``#`` (pound sign) tokens, one of
  them the first word of a sentence (CoNLL-2000 train.txt line 202,400), so their configs turn
  comments off.
* **Blank means empty.** Only an empty line (or one holding nothing but ``\r``) ends a sentence.
  A line of only tabs or spaces is an empty token line (e.g. ``word<TAB>label`` with both fields
  missing) and an error naming the line, never a silent sentence break.
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
from dataclasses import dataclass
from pathlib import Path

from lexp.errors import LexpInputError
from lexp.tasks.base import Sentence

#: Named separators (a shell cannot pass a tab): ``tab``; ``\t`` as a shell hands it to Hydra
#: (backslash + t, or two backslashes + t) means a tab too; ``whitespace`` = null = any whitespace.
SEPARATOR_NAMES: dict[str, str | None] = {
    "tab": "\t",
    "\\t": "\t",
    "\\\\t": "\t",
    "space": " ",
    "whitespace": None,
}
#: Named comment prefixes: ``#`` starts a comment in Hydra's override grammar, so it needs quotes
#: that survive the shell (``"task.comment_prefix='#'"``); ``task.comment_prefix=hash`` needs none.
COMMENT_PREFIX_NAMES: dict[str, str | None] = {"hash": "#", "none": None}

#: A CoNLL-U ID: a word index, a multiword-token range (``1-2``) or an empty node (``8.1``).
_CONLLU_ID = re.compile(r"[0-9]+(?:-[0-9]+|\.[0-9]+)?")

_Row = tuple[int, list[str]]  # (1-based line number, columns)


def separator_value(value: object) -> str | None:
    """The separator a setting means: ``tab``/``\\t`` → a tab, ``space`` → " ", ``whitespace``/None →
    None (any run of whitespace); other strings stand for themselves.

    Raises LexpInputError for an empty string and for letters/digits (``t`` is what a shell leaves
    of an unquoted ``\\t``).
    """
    if value is None:
        return None
    if not isinstance(value, str) or value == "":
        raise LexpInputError(
            f"task.separator={value!r} is not a separator; use tab, space, whitespace (any run of "
            "whitespace, also null) or a literal string such as '|'. Fix: e.g. task.separator=tab"
        )
    if value.lower() in SEPARATOR_NAMES:
        return SEPARATOR_NAMES[value.lower()]
    if value.isalnum():
        shell = " (a shell turns an unquoted \\t into a plain t)" if value == "t" else ""
        raise LexpInputError(
            f"task.separator={value!r} would split columns on the text {value!r}{shell}. Fix: "
            "task.separator=tab for tab-separated files (or space, or whitespace for any whitespace)"
        )
    return value


def comment_prefix_value(value: object) -> str | None:
    """The comment prefix a setting means: ``hash`` → ``#``, ``none``/None → no comments."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise LexpInputError(
            f"task.comment_prefix={value!r} is not a prefix; use a non-empty string, hash (#) or null. "
            "Fix: e.g. task.comment_prefix=hash"
        )
    return COMMENT_PREFIX_NAMES.get(value.lower(), value)


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
    exactly on it (``"\\t"`` or ``"tab"`` for CoNLL-U and PMB; see :func:`separator_value`).
    ``comment_prefix=None`` disables comments (``"hash"`` means ``#``). ``min_columns`` makes every
    token line need at least that many columns. Besides, every token line must have as many columns
    as the file's first token line, so that a line missing a column cannot shift a label into the
    wrong place unnoticed.

    Raises LexpInputError naming the file, the 1-based line, the problem and the fix for: an empty
    file or one without sentences, a line with too few columns for ``word_column``/``label_column``
    or ``min_columns``, a column count that differs from the file's first token line, a line of
    only whitespace (an empty token line, not a sentence break), a comment line that looks like a
    token line, and an empty word or label (or ``_``, CoNLL-U's "unspecified", in a CoNLL-U file).
    """
    path = Path(path)
    separator = separator_value(separator)
    comment_prefix = comment_prefix_value(comment_prefix)
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
    preamble: list[tuple[int, str]] = []  # comment lines before the first token line of the file
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line:
            if rows:
                sentences.append(_sentence(path, rows, word_column, label_column, ids_possible))
                rows = []
            continue
        if not line.strip():
            raise LexpInputError(
                f"{path}:{lineno}: the line holds only whitespace ({line!r}): an empty token line, not a "
                "sentence break. Fix: make the line empty if a sentence ends here, or fill in the word "
                f"and the label (separator={_separator_name(separator)})."
            )
        if comment_prefix and not rows and line.startswith(comment_prefix):
            if expected_columns is None:
                preamble.append((lineno, line))
            else:
                _check_comment(path, lineno, line, separator, comment_prefix, expected_columns)
            continue
        columns = line.split(separator) if separator is not None else line.split()
        n = len(columns)
        if n < needed:
            _too_few_columns(path, lineno, n, word_column, label_column, comment_prefix, line, separator)
        if min_columns is not None and n < min_columns:
            raise LexpInputError(
                f"{path}:{lineno}: found {n} column{'s' if n != 1 else ''} (split on separator="
                f"{_separator_name(separator)}), but this format needs at least {min_columns} "
                f"(min_columns={min_columns}). Fix the line, or describe the file's layout: "
                f"task.min_columns (now {min_columns}), task.word_column (now {word_column}) and "
                f"task.label_column (now {label_column}) all index its columns, and task.separator "
                "splits them; change every one that differs."
            )
        if expected_columns is None:
            expected_columns = (n, lineno)
            for comment_line, comment in preamble:
                _check_comment(path, comment_line, comment, separator, comment_prefix, expected_columns)
            preamble = []
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
            f"{comment_prefix!r}). Check the file, or set task.comment_prefix=null if token lines "
            "start with that prefix."
        )
    return sentences


@dataclass(frozen=True)
class ColumnLayout:
    """What the top of a column file says about its columns (see :func:`column_layout`)."""

    n_columns: int  # columns of the first token line
    first_line: int  # its 1-based line number
    header: tuple[str, ...] | None  # column names from a header comment such as "# tok:gold<TAB>sym:gold"
    header_line: int | None


#: A column-header field of a PMB export: ``tok:gold``, ``sem:silver`` ... (``# `` before the first).
_HEADER_FIELD = re.compile(r"(?:#+\s*)?([A-Za-z]+):[A-Za-z]+")


def column_layout(path: str | Path, separator: str | None, comment_prefix: str | None) -> ColumnLayout:
    """The column count of the first token line and the column names of a header comment before it.

    PMB exports carry a header comment naming every column (``# tok:gold<TAB>tok:gold<TAB>sym:gold
    ...``); it is used only when it has as many fields as the token lines. Reads only the top of
    the file.
    """
    path = Path(path)
    separator = separator_value(separator)
    comment_prefix = comment_prefix_value(comment_prefix)
    header: tuple[str, ...] | None = None
    header_line = None
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(separator) if separator is not None else line.split()
            if comment_prefix and line.startswith(comment_prefix):
                matches = [_HEADER_FIELD.fullmatch(f.strip()) for f in fields]
                if len(fields) > 1 and all(matches):
                    header = tuple(m.group(1).lower() for m in matches if m)
                    header_line = lineno
                continue
            if header is not None and len(header) != len(fields):
                header, header_line = None, None
            return ColumnLayout(len(fields), lineno, header, header_line)
    raise LexpInputError(f"{path}:1: no token line found; check the file and task.comment_prefix.")


def _check_comment(
    path: Path,
    lineno: int,
    line: str,
    separator: str | None,
    comment_prefix: str,
    expected: tuple[int, int],
) -> None:
    """A comment line must not look like a token line: then a sentence-initial token such as ``#``
    (PTB, CoNLL-2000) would be dropped as a comment without a trace."""
    columns = line.split(separator) if separator is not None else line.split()
    if len(columns) != expected[0] or any(c.isspace() for c in columns[0].strip()):
        return
    raise LexpInputError(
        f"{path}:{lineno}: this line starts with the comment prefix {comment_prefix!r} but has "
        f"{len(columns)} columns like the token lines (line {expected[1]}): {line[:60]!r}. It cannot be "
        f"told from a sentence that starts with the token {columns[0]!r}, which would be dropped. Fix: "
        "task.comment_prefix=null if the file has no comment lines (the Penn Treebank and CoNLL-2000 "
        "have '#' tokens); otherwise remove this line's ambiguity in the file."
    )


def _check_arguments(
    path: Path, word_column: int, label_column: int, separator: str | None, min_columns: int | None
) -> None:
    for name, value in (("word_column", word_column), ("label_column", label_column)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LexpInputError(f"{path}: {name} must be a 0-based column index >= 0, got {value!r}")
    if word_column == label_column:
        raise LexpInputError(f"{path}: word_column and label_column are both {word_column}; they must differ")
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
    separator: str | None,
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
        f"{path}:{lineno}: found {n} column{'s' if n != 1 else ''} (split on separator="
        f"{_separator_name(separator)}), so {' and '.join(missing)} is missing.{hint} Fix the line, "
        "or set task.word_column / task.label_column / task.separator to match the file "
        "(task.separator=tab for tab-separated files)."
    )


def _separator_name(separator: str | None) -> str:
    return "null (any whitespace)" if separator is None else repr(separator)


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
