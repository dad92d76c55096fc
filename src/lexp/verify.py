"""Check activation stores against the checksums recorded when they were written.

    python -m lexp.verify ~/.cache/lexp                      # every store under a cache root
    python -m lexp.verify .cache/lexp/stores/minilm/pos/train-0123456789ab

Each store is re-hashed (xxh3-128 over every byte of its three ``.npy`` files) and its activations
are scanned for NaN/inf, one streaming pass at about 1 s per GB from the page cache. One line per
store; the exit status is 0 when every store is intact, 1 when any is not (the line names it and
says to delete it), 2 when an argument holds no store at all. Interrupted writes
(``*.partial-<pid>`` directories) are never read by lexp and are skipped here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lexp.store import _PARTIAL, ACTIVATIONS, MANIFEST, verify_store

__all__ = ["find_stores", "main"]


def find_stores(root: Path) -> list[Path]:
    """``root`` itself when it holds a manifest, else every store directory below it (sorted).

    Below a root, a store is a directory with both ``manifest.json`` and ``activations.npy`` (the
    cache also holds fine-tuned models and extractors with manifests of their own).
    """
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(
        m.parent
        for m in root.rglob(MANIFEST)
        if (m.parent / ACTIVATIONS).is_file()
        and not any(_PARTIAL in part for part in m.parent.relative_to(root).parts)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lexp.verify",
        description="Re-hash activation stores and count their non-finite values.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="a store directory or a cache root")
    args = parser.parse_args(argv)
    failed = empty = 0
    for root in args.paths:
        root = root.expanduser()
        stores = find_stores(root) if root.is_dir() else []
        if not stores:
            print(
                f"lexp: error: {root}: no activation store here (no {MANIFEST} in it or below it); pass a "
                "store directory or the cache root (cache_dir, LEXP_CACHE)",
                file=sys.stderr,
            )
            empty += 1
            continue
        for store in stores:
            report = verify_store(store)
            print(report.message(), file=sys.stdout if report.ok else sys.stderr, flush=True)
            failed += not report.ok
    if failed:
        print(f"lexp: {failed} store(s) failed verification", file=sys.stderr)
        return 1
    return 2 if empty else 0


if __name__ == "__main__":
    raise SystemExit(main())
