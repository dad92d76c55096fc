"""Experiment tracking: W&B (offline by default), CSV, or nothing — behind one small interface.

Every number also goes to ``results.json`` (see :mod:`lexp.report.results`), so nothing depends on
a server; the tracker only mirrors it for dashboards.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class Tracker:
    """No-op tracker; subclasses mirror metrics, tables and images to a backend."""

    kind = "none"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (flat names such as ``oracle/dev/accuracy``)."""

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a table (one row per e.g. threshold or layer)."""

    def log_image(self, name: str, path: Path) -> None:
        """Log a PNG figure written to the run directory."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run-level summary values (what a dashboard compares across runs)."""

    def lightning_logger(self) -> Any:
        """A Lightning logger writing to the same backend, or False."""
        return False

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; ``exit_code`` != 0 marks the run failed where the backend knows it."""


class CSVTracker(Tracker):
    """Append metrics to ``metrics.csv`` and tables to ``tables/<name>.csv`` in the run directory."""

    kind = "csv"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["step", "name", "value"])
            for key, value in metrics.items():
                writer.writerow([step if step is not None else "", key, value])

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        out = self.run_dir / "tables" / f"{name.replace('/', '_')}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)

    def summary(self, values: Mapping[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(dict(values), indent=2, default=str))

    def lightning_logger(self) -> Any:
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(self.run_dir), name="lightning", version="")


class WandbTracker(Tracker):
    """One W&B run per lexp run (offline unless configured otherwise), grouped by sweep."""

    kind = "wandb"

    def __init__(
        self,
        run_dir: Path,
        *,
        project: str,
        name: str,
        group: str,
        config: Mapping[str, Any],
        mode: str = "offline",
        entity: str | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if os.environ.get("WANDB_MODE"):  # the environment wins (tests and CI set disabled)
            mode = os.environ["WANDB_MODE"]
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            dir=str(run_dir),
            config=dict(config),
            mode=mode,
            tags=list(tags),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def lightning_logger(self) -> Any:
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(experiment=self.run)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)  # non-zero: W&B shows the run as failed


def make_tracker(
    logger_cfg: Mapping[str, Any], run_dir: Path, *, name: str, group: str, config: Mapping[str, Any]
) -> Tracker:
    """Build the tracker named by ``logger.kind`` (wandb | csv | none)."""
    kind = logger_cfg.get("kind", "none")
    if kind == "wandb":
        return WandbTracker(
            run_dir,
            project=logger_cfg.get("project", "lexp"),
            entity=logger_cfg.get("entity"),
            name=name,
            group=logger_cfg.get("group") or group,
            config=config,
            mode=logger_cfg.get("mode", "offline"),
            tags=logger_cfg.get("tags") or (),
        )
    if kind == "csv":
        return CSVTracker(run_dir)
    if kind == "none":
        return Tracker()
    raise ValueError(
        f"logger.kind={kind!r} is not one of wandb, csv, none (choose with logger=wandb|csv|none)"
    )
