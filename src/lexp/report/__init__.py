"""results.json writer and reader, tables, figures, HTML report; ``results_frame`` for notebooks."""

from __future__ import annotations

from typing import Any


def results_frame(*args: Any, **kwargs: Any) -> Any:
    """One pandas.DataFrame row per run (settings + headline numbers): :func:`lexp.report.frames.results_frame`."""
    from lexp.report.frames import results_frame as frame

    return frame(*args, **kwargs)
