"""Tag new text with a reduced extractor: ``python -m lexp.predict <run dir> --input sentences.txt``.

Input: one sentence per line, words separated by spaces (sentence tasks: one sentence per line,
or a sentence pair separated by a tab). Output: ``word<TAB>label`` lines with a blank line between
sentences (sentence tasks: one label per line), on stdout or ``--output``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lexp.errors import LexpInputError, LexpModelError


def read_sentences(path: Path) -> list[list[str]]:
    """Whitespace-tokenised sentences; empty lines are an error (they would shift the output)."""
    sentences = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            words = line.split()
            if not words:
                raise LexpInputError(
                    f"{path}:{number}: empty line; give one sentence per line (remove blank lines)"
                )
            sentences.append(words)
    if not sentences:
        raise LexpInputError(f"{path}: no sentences; give one sentence per line, words separated by spaces")
    return sentences


def main(argv: list[str] | None = None) -> int:
    from lexp.extractor import ReducedExtractor

    parser = argparse.ArgumentParser(prog="python -m lexp.predict", description=__doc__.splitlines()[0])
    parser.add_argument(
        "extractor", type=Path, help="run directory of analysis=pipeline, or its extractor/ folder"
    )
    parser.add_argument("--input", type=Path, required=True, help="one sentence per line")
    parser.add_argument("--output", type=Path, default=None, help="default: stdout")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        tagger = ReducedExtractor.load(args.extractor)
        out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
        if tagger.kind == "labelling":
            sentences = read_sentences(args.input)
            for words, tags in zip(sentences, tagger.tag(sentences, args.batch_size), strict=True):
                out.write("".join(f"{w}\t{t}\n" for w, t in zip(words, tags, strict=True)) + "\n")
        else:
            lines = [line.rstrip("\n") for line in args.input.open(encoding="utf-8") if line.strip()]
            pairs = [
                (parts[0], parts[1] if len(parts) > 1 else None)
                for parts in (ln.split("\t", 1) for ln in lines)
            ]
            for label in tagger.classify(pairs, args.batch_size):
                out.write(f"{label}\n")
        if args.output:
            out.close()
    except (LexpInputError, LexpModelError) as exc:
        print(f"lexp.predict: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
