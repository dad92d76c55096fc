"""Tag new text with a reduced extractor: ``python -m lexp.predict <run dir> --input sentences.txt``.

Input: one sentence per line, words separated by spaces (sentence tasks: one sentence per line,
or a sentence pair separated by a tab), UTF-8. Output: ``word<TAB>label`` lines with a blank line
between sentences (sentence tasks: one label per line), on stdout or ``--output``.

Every failure (a missing or undecodable input, an incomplete extractor, an output folder that does
not exist, a sentence longer than the model maximum) is one ``lexp: error:`` line with the fix and
exit code 2. ``--device auto|cpu|cuda|cuda:N`` picks where the encoder and the probe run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lexp.errors import LexpInputError, LexpModelError

LONG_SENTENCES = ("error", "window")


def _read_lines(path: Path) -> list[str]:
    """The file's lines, decoded as UTF-8; a missing file or a bad byte is a LexpInputError."""
    from lexp.fs import file_problem

    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise LexpInputError(f"{path}: {problem}. Fix: --input <a file with one sentence per line>")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LexpInputError(
            f"{path}:{line}: the file is not valid UTF-8 ({exc.reason} at byte {exc.start}). Fix: convert "
            "it, e.g. `iconv -f latin1 -t utf-8 in.txt > in.utf8.txt`."
        ) from None
    return text.splitlines()


def read_sentences(path: Path, lines: list[str] | None = None) -> list[list[str]]:
    """Whitespace-tokenised sentences; empty lines are an error (they would shift the output)."""
    sentences = []
    for number, line in enumerate(_read_lines(path) if lines is None else lines, start=1):
        words = line.split()
        if not words:
            raise LexpInputError(
                f"{path}:{number}: empty line; give one sentence per line (remove blank lines)"
            )
        sentences.append(words)
    if not sentences:
        raise LexpInputError(f"{path}: no sentences; give one sentence per line, words separated by spaces")
    return sentences


def _check_output(path: Path | None) -> None:
    """Fail before loading anything when the output cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise LexpInputError(
            f"--output {path} is a directory. Fix: give a file name, e.g. --output {path / 'tags.tsv'}"
        )
    if not path.parent.is_dir():
        raise LexpInputError(
            f"--output {path}: the folder {path.parent} does not exist. Fix: create it (mkdir -p {path.parent}) "
            "or write elsewhere."
        )


def _long_sentence_hint(exc: LexpInputError, policy: str) -> LexpInputError:
    """Extraction names the run's setting (extract.long_sentences); here the fix is a flag."""
    message = str(exc)
    if policy == "error" and "longer than the model maximum" in message:
        message = message.replace("(extract.long_sentences=window)", "(--long-sentences window)")
        if "--long-sentences window" not in message:
            message += " In lexp.predict: --long-sentences window."
    return LexpInputError(message)


def unknown_words_warning(tokenizer: Any, sentences: list[list[str]], sources: list[str]) -> str | None:
    """One ``lexp: warning:`` line naming the words the tokenizer turns into its unknown token only
    (their tag is a guess from context: the model sees no trace of the word), or None."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    vocab = sorted({w for words in sentences for w in words})
    if not vocab:
        return None
    ids = tokenizer(vocab, add_special_tokens=False)["input_ids"]
    unknown = {w for w, wi in zip(vocab, ids, strict=True) if wi and all(i == unk for i in wi)}
    if not unknown:
        return None
    hits = [(w, src) for words, src in zip(sentences, sources, strict=True) for w in words if w in unknown]
    shown = ", ".join(f"{w!r} ({src})" for w, src in hits[:_SHOW_UNK])
    return (
        f"lexp: warning: {len(hits)} word(s) became the unknown token {tokenizer.unk_token!r} (the model has no "
        f"subword for them), so their tags are guesses from the context: {shown}"
        f"{' ...' if len(hits) > _SHOW_UNK else ''}"
    )


_SHOW_UNK = 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lexp.predict", description=__doc__.splitlines()[0])
    parser.add_argument(
        "extractor", type=Path, help="run directory of analysis=pipeline, or its extractor/ folder"
    )
    parser.add_argument("--input", type=Path, required=True, help="one sentence per line (UTF-8)")
    parser.add_argument("--output", type=Path, default=None, help="default: stdout")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--long-sentences",
        choices=LONG_SENTENCES,
        default="error",
        help="sentences longer than the model maximum: error (stop and name them) or window "
        "(encode them in overlapping windows)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise LexpInputError(f"--batch-size {args.batch_size} must be >= 1. Fix: e.g. --batch-size 32")
        _check_output(args.output)
        lines = _read_lines(args.input)  # before the model: a bad input costs no load
        from lexp.extractor import ReducedExtractor

        tagger = ReducedExtractor.load(args.extractor, device=args.device)
        if tagger.kind == "labelling":
            sentences = read_sentences(args.input, lines)
            sources = [f"{args.input}:{i}" for i in range(1, len(sentences) + 1)]
            warning = unknown_words_warning(tagger.tokenizer, sentences, sources)
            if warning is not None:
                print(warning, file=sys.stderr, flush=True)
            try:
                tags = tagger.tag(
                    sentences, args.batch_size, long_sentences=args.long_sentences, sources=sources
                )
            except LexpInputError as exc:
                raise _long_sentence_hint(exc, args.long_sentences) from None
            text = "".join(
                "".join(f"{w}\t{t}\n" for w, t in zip(words, labels, strict=True)) + "\n"
                for words, labels in zip(sentences, tags, strict=True)
            )
        else:
            pairs = [
                (parts[0], parts[1] if len(parts) > 1 else None)
                for parts in (line.split("\t", 1) for line in lines if line.strip())
            ]
            if not pairs:
                raise LexpInputError(
                    f"{args.input}: no sentences; give one sentence (or a tab-separated pair) per line"
                )
            text = "".join(f"{label}\n" for label in tagger.classify(pairs, args.batch_size))
        if args.output is None:
            sys.stdout.write(text)
        else:
            try:
                args.output.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise LexpInputError(
                    f"--output {args.output}: cannot write ({exc.strerror}). Fix: choose a writable path"
                ) from None
    except (LexpInputError, LexpModelError) as exc:
        print(f"lexp: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
