"""Write an extraction into a store from a background thread, so the forward does not wait for each write.

`write_extraction` hands each forward batch's rows to a thread that calls
`StoreWriter.write_rows` (the float16 cast, the finiteness check and the page-cache write happen
there; numpy releases the GIL for them). The queue between them holds at most ``max_batches``
batches, which bounds host memory: the forward waits only when the writer is more than that many
batches behind (then the writer is the bottleneck and no buffering could help). Rows are placed by their row offset, exactly as a synchronous loop would place
them, so the store's bytes do not depend on thread timing. An exception in the thread (a NaN row,
a full disk) is raised again in the caller, with its type and message, at the next batch handed
over or at the end.

Only `StoreWriter`'s public API is used (``write_rows`` here; ``finish`` stays with the caller).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["BackgroundWriter", "report_counts", "write_extraction"]

log = logging.getLogger(__name__)

_STOP = None


class BackgroundWriter:
    """A thread feeding ``writer.write_rows(offset, rows)`` from a bounded queue of batches.

    Use as a context manager around the producing loop; ``put`` a list of ``(row_offset, rows)``
    per batch; ``close()`` waits until everything is written and re-raises the thread's error.
    Leaving the ``with`` block on an exception stops the thread without raising its error over
    the caller's.
    """

    def __init__(self, writer: Any, max_batches: int = 3) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        self.writer = writer
        self._queue: queue.Queue[list[tuple[int, np.ndarray]] | None] = queue.Queue(maxsize=max_batches)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="lexp-store-writer", daemon=True)
        self._closed = False

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self._closed:
            self.close()
        else:  # the caller's own error wins; an explicit close() already raised the thread's
            self._stop()

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            if self._error is not None:
                continue  # keep draining, so a producer blocked on a full queue is released
            try:
                for offset, rows in batch:
                    self.writer.write_rows(offset, rows)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:  # kept set: the thread writes nothing after a failure
            raise self._error

    def put(self, batch: Sequence[tuple[int, np.ndarray]]) -> None:
        """Queue one batch (blocks while ``max_batches`` are waiting); raises the thread's error."""
        if self._closed:
            raise RuntimeError("BackgroundWriter.put after close()")
        self._raise()
        self._queue.put(list(batch))

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()

    def close(self) -> None:
        """Wait for every queued batch to be written; raise the thread's error if it had one."""
        self._stop()
        self._raise()


def write_extraction(
    extraction: Any, writer: Any, row_offsets: np.ndarray | Sequence[int], *, max_batches: int = 3
) -> None:
    """Write every ``(index, rows)`` of an `Extraction` at ``row_offsets[index]``, from a thread.

    ``extraction`` is what `extract_words`/`extract_cls` return (its ``batches()`` is used when it
    has one, else each item is a batch of its own); ``writer`` a `StoreWriter` inside its ``with``
    block. Returns when every row is written; the caller then calls ``writer.finish``.
    """
    batches: Iterable[Sequence[tuple[int, np.ndarray]]] = (
        extraction.batches() if hasattr(extraction, "batches") else ([item] for item in extraction)
    )
    with BackgroundWriter(writer, max_batches=max_batches) as background:
        for batch in batches:
            background.put([(int(row_offsets[index]), np.atleast_2d(rows)) for index, rows in batch])


def report_counts(split: str, counts: Mapping[str, Any] | None, reused: bool) -> dict[str, Any]:
    """A store manifest's ``extraction`` counts (`ExtractionStats.as_dict` + settings) for
    results.json, with one warning on every run — reused store or not — when words were encoded
    as the unknown token, sentences were windowed or examples truncated, so no run hides them.
    A store written without counts gives ``{"recorded": False}``."""
    if not counts:
        return {"recorded": False}
    out = dict(counts)
    unk, windowed, truncated = (int(out.get(k) or 0) for k in ("n_unk_words", "n_windowed", "n_truncated"))
    parts = []
    if unk:
        parts.append(f"{unk} word(s) with zero subwords encoded as the unknown token")
    if windowed:
        parts.append(f"{windowed} long sentence(s) encoded in {out.get('n_windows')} overlapping windows")
    if truncated:
        parts.append(f"{truncated} example(s) truncated to max_length")
    if parts:
        log.warning(
            "%s store%s: %s (results.json: extraction.%s)",
            split,
            " (reused)" if reused else "",
            "; ".join(parts),
            split,
        )
    return out
