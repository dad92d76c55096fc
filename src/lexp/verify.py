"""Check activation stores against the checksums recorded when they were written.

    python -m lexp.verify ~/.cache/lexp                      # every store under a cache root
    python -m lexp.verify .cache/lexp/stores/minilm/train-0123456789ab

Each store is re-hashed (xxh3-128 over every byte of its ``.npy`` files and of the ``labels.npy``
of every task's label entry in its ``labels/`` folder) and its activations are scanned for NaN/inf,
one streaming pass at about 1 s per GB from the page cache. One line per store; the exit status is
0 when every store is intact, 1 when any is not (the line names it and says to delete it), 2 when
an argument holds no store at all. Stores of an older format, which lexp no longer reads, are
listed as ``old`` (delete them to free their space) and do not fail. Interrupted writes
(``*.partial-<pid>`` directories) are never read by lexp and are skipped here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lexp.store import _PARTIAL, ACTIVATIONS, MANIFEST, STORE_FORMAT_VERSION, verify_store

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


def _old_format(store: Path) -> int | None:
    """The format version of a store written by an older lexp (None: current, or unreadable)."""
    try:
        version = json.loads((store / MANIFEST).read_text(encoding="utf-8")).get("format_version")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(version, int) and not isinstance(version, bool) and version < STORE_FORMAT_VERSION:
        return version
    return None


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
            old = _old_format(store)
            if old is not None:
                print(
                    f"old     {store}: store format {old} (labels inside the store), no longer read by this "
                    f"lexp, which builds format {STORE_FORMAT_VERSION} stores shared by the tasks over the same "
                    "sentences; delete this directory to free its space",
                    flush=True,
                )
                continue
            report = verify_store(store)
            print(report.message(), file=sys.stdout if report.ok else sys.stderr, flush=True)
            failed += not report.ok
    if failed:
        print(f"lexp: {failed} store(s) failed verification", file=sys.stderr)
        return 1
    return 2 if empty else 0


if __name__ == "__main__":
    raise SystemExit(main())
