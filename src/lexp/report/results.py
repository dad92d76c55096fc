"""``results.json``: every number of a run, machine-readable, rewritten after each stage.

Writing after every stage (atomically) means an interrupted run still leaves what it measured.
The file starts with ``schema_version`` (:data:`lexp.report.results_schema.SCHEMA_VERSION`); its
keys, units and naming rule are documented in :mod:`lexp.report.results_schema`, whose
:func:`~lexp.report.results_schema.load_results` is how every consumer reads it back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lexp.report.results_schema import SCHEMA_VERSION


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths and non-finite floats into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


class Report:
    """Accumulates a run's results and keeps ``<run_dir>/results.json`` up to date.

    The blocks it is given must follow the naming rule of :mod:`lexp.report.results_schema`
    (written as schema version :data:`SCHEMA_VERSION`).
    """

    def __init__(self, run_dir: Path, **header: Any) -> None:
        if "schema_version" in header:
            raise ValueError("Report sets schema_version itself; do not pass it in the header")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "results.json"
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            **header,
            "timings_s": {},
            "figures": [],
        }
        self.save()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def update(self, values: Mapping[str, Any]) -> None:
        self.data.update(values)
        self.save()

    def timing(self, stage: str, seconds: float) -> None:
        self.data["timings_s"][stage] = round(float(seconds), 4)
        self.save()

    def figure(self, path: Path) -> None:
        self.data["figures"].append(str(Path(path).relative_to(self.run_dir)))
        self.save()

    def save(self) -> None:
        """Write results.json atomically (a temp file renamed over it). When the disk refuses the
        write, the temp file is removed, and a final status (complete/failed/killed) is still
        recorded: a short record overwrites results.json in place, which needs no new disk blocks."""
        tmp = self.path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(to_jsonable(self.data), indent=2, sort_keys=False) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if self.data.get("status") != "running":
                self._status_in_place()
            raise

    def _status_in_place(self) -> None:
        """Overwrite results.json with its header and final status, if that fits in its blocks."""
        keys = ("schema_version", "status", "task", "model", "analysis", "lexp_version", "command")
        record = {k: self.data[k] for k in keys if k in self.data}
        record["note"] = "the disk refused the full results; only this record was kept"
        text = json.dumps(to_jsonable(record), indent=2).encode("utf-8") + b"\n"
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY)
            try:
                if os.fstat(fd).st_size >= len(text):
                    os.pwrite(fd, text, 0)
                    os.ftruncate(fd, len(text))
                    os.fsync(fd)
            finally:
                os.close(fd)
