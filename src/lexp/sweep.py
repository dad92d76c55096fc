"""Sweeps under any Hydra launcher: one progress line per finished job, failures listed at the end.

Hydra runs the jobs of ``python -m lexp.run -m ...`` in this process (basic launcher), in worker
processes (``hydra/launcher=joblib``) or as separate jobs (``submitit_local``, ``submitit_slurm``),
so the parent sees neither the jobs' return values nor, under submitit, their output. What every
launcher shares is the sweep directory: each job writes ``results.json`` with its ``status``
(``complete`` or ``failed: <message>``). :class:`SweepCallback` (a Hydra callback, configured
under ``hydra.callbacks`` in ``conf/config.yaml``) therefore watches that directory from the
parent: it prints one line per job as soon as the job's results.json is final, and at the end of
the sweep the jobs that failed, each with its one-line lexp error, then exits with status 1.

A failing job never stops the others: in a multirun, ``lexp.run`` records the failure in the job's
results.json and returns instead of raising (Hydra's sweepers re-raise a job's exception after
the batch, which would skip this summary). The job's own log (``<job dir>/*.log``, the submitit
``.out``/``.err`` files) keeps the traceback of an unexpected error.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

RESULTS = "results.json"

#: seconds between two looks at the sweep directory
POLL_S = 2.0

__all__ = [
    "SweepCallback",
    "failure_record",
    "headline",
    "job_info",
    "progress_line",
    "update_results",
    "write_failure",
    "write_status",
]


def _final(status: Any) -> bool:
    """complete, ``failed: ...`` or ``killed (...)`` (SIGTERM, a SLURM time limit); ``running`` and
    ``requeued (...)`` (SLURM starts the job again) are not."""
    return isinstance(status, str) and (status == "complete" or status.startswith(("failed", "killed")))


def headline(data: Mapping[str, Any]) -> str:
    """The number a sweep is read by: the oracle's dev score (or the analysis' own result)."""
    if data.get("analysis") == "compare":
        block = data.get("compare") or {}
        diag = block.get("diagonal")
        if diag:
            return f"mean layer-to-layer CKA {sum(diag) / len(diag):.4f}"
        return f"CKA over {block.get('rows', '?')} rows"
    oracle = data.get("oracle") or {}
    metric = oracle.get("metric") or ("pearson" if data.get("task_kind") == "regression" else "accuracy")
    value = (oracle.get("dev") or {}).get(metric)
    text = f"oracle dev {metric} {value:.4f}" if isinstance(value, (int, float)) else "no oracle score"
    extra = {
        "neurons": lambda b: f", {b['n_neurons']} neurons" if "n_neurons" in b else "",
        "general": lambda b: f", {len(b.get('table6') or [])} ct" if b.get("table6") else "",
    }.get(str(data.get("analysis")))
    if extra is not None:
        text += extra(data.get(str(data["analysis"])) or {})
    return text


def job_info(job_dir: Path) -> dict[str, Any]:
    """Hydra's job number and overrides, from ``<job dir>/.hydra/`` (None when not written)."""
    info: dict[str, Any] = {"num": None, "overrides": []}
    hydra_dir = job_dir / ".hydra"
    try:
        from omegaconf import OmegaConf

        if (hydra_dir / "hydra.yaml").exists():
            info["num"] = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.get("num")
        if (hydra_dir / "overrides.yaml").exists():
            info["overrides"] = list(OmegaConf.load(hydra_dir / "overrides.yaml"))
    except Exception:  # a half-written file: the line goes without it
        pass
    if info["num"] is None:
        head = job_dir.name.split("_", 1)[0]
        info["num"] = int(head) if head.isdigit() else None
    return info


def progress_line(job_dir: Path, data: Mapping[str, Any], done: int | None = None) -> str:
    """``[lexp sweep] job 3 · pos · minilm · general · complete · oracle dev accuracy 0.9312 · 41.2 s``."""
    num = job_info(job_dir)["num"]
    seconds = (data.get("timings_s") or {}).get("total")
    if seconds is None:  # a failed job: from the job's start (Hydra's config) to its last write
        start = job_dir / ".hydra" / "config.yaml"
        ref = start if start.exists() else job_dir
        seconds = max(0.0, (job_dir / RESULTS).stat().st_mtime - ref.stat().st_mtime)
    status = str(data.get("status"))
    what = headline(data) if status == "complete" else _one_line(status)
    restarts = (data.get("slurm") or {}).get("restarts")
    parts = [
        f"job {num if num is not None else job_dir.name}",
        str(data.get("task", "?")),
        str(data.get("model", "?")),
        str(data.get("analysis", "?")),
        "complete" if status == "complete" else ("KILLED" if status.startswith("killed") else "FAILED"),
        what,
        f"{float(seconds):.1f} s",
    ]
    if restarts:
        parts.append(f"requeued by SLURM {restarts}x, resumed from the caches")
    count = f" {done} done," if done is not None else ""
    return f"[lexp sweep]{count} " + " · ".join(parts)


def failure_record(cfg: Any, message: str) -> dict[str, Any]:
    """What results.json holds for a job that failed before :func:`lexp.experiment.run` started."""

    def name(group: str) -> Any:
        try:
            return cfg[group]["name"]
        except Exception:
            return None

    from omegaconf import OmegaConf

    try:  # the job's settings, as run() records them (lexp.tables compares runs by them)
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a config that does not resolve is what failed: keep it as written
        config = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else None
    if isinstance(config, dict):
        config.pop("hydra", None)
    from lexp.report.results_schema import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "status": f"failed: {message}",
        "task": name("task"),
        "model": name("model"),
        "analysis": name("analysis"),
        "config": config,
        "timings_s": {},
        "figures": [],
    }


def write_failure(run_dir: Path, cfg: Any, message: str) -> None:
    """Set ``status: failed: <message>`` in a job's results.json (the one run() wrote, else a new one)."""
    write_status(run_dir, cfg, f"failed: {message}")


def write_status(run_dir: Path, cfg: Any, status: str) -> None:
    """Set ``status`` in a job's results.json (the one run() wrote, else a new one from ``cfg``)."""
    path = Path(run_dir) / RESULTS
    try:
        data = json.loads(path.read_text()) if path.exists() else failure_record(cfg, status)
    except ValueError:
        data = failure_record(cfg, status)
    data["status"] = status
    _write(path, data)


def update_results(run_dir: Path, values: Mapping[str, Any]) -> None:
    """Add top-level keys to a job's finished results.json."""
    path = Path(run_dir) / RESULTS
    data = json.loads(path.read_text())
    data.update(values)
    _write(path, data)


def _write(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _one_line(status: str) -> str:
    """``failed: lexp: error: ...`` -> ``lexp: error: ...`` (first line only); ``killed (...)`` stays."""
    text = status.removeprefix("failed:").strip()
    return text.splitlines()[0] if text else status


def _require_writable(folder: Any, key: str) -> None:
    from lexp.fs import writable_problem

    problem = writable_problem(Path(str(folder)), key)
    if problem is not None:
        print(f"lexp: error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.lexp_sweep`` in conf/config.yaml) for multiruns.

    ``on_multirun_start`` starts a thread that prints a line per finished job; ``on_multirun_end``
    prints the lines not yet printed, then the failed jobs, and raises ``SystemExit(1)`` if any.
    Single runs are left alone.
    """

    def __init__(self, poll_s: float = POLL_S, stream: Any = None) -> None:
        self.poll_s = float(poll_s)
        self.stream = stream
        self._seen: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sweep_dir: Path | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Launchers pickle Hydra's context, callbacks included, into every job: a job gets an
        idle copy (no thread, nothing seen); only the launching process watches the sweep."""
        return {"poll_s": self.poll_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(poll_s=state["poll_s"])  # type: ignore[misc]

    # Hydra calls these (the names and signatures of hydra.experimental.callback.Callback)
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        """A single run: its directory must take a write before Hydra saves its config there (a
        full or read-only disk is then one ``lexp: error:`` line and exit 2, not Hydra's traceback)."""
        _require_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _require_writable(config.hydra.sweep.dir, "hydra.sweep.dir")
        self._sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self._started = time.time()
        self._watcher = None
        self._slurm = None
        from omegaconf import OmegaConf

        if str(OmegaConf.select(config, "hydra.launcher._target_", default="")).endswith("SlurmLauncher"):
            from contextlib import ExitStack

            from lexp.slurm_watch import follow_slurm_jobs

            self._watcher = ExitStack()
            self._slurm = self._watcher.enter_context(follow_slurm_jobs(self._sweep_dir, self._sacct_notice))
        self._thread = threading.Thread(target=self._watch, name="lexp-sweep-progress", daemon=True)
        self._thread.start()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if getattr(self, "_watcher", None) is not None:
            self._watcher.close()
        if self._sweep_dir is None:
            return
        self._scan()
        failed = self.failures()
        jobs = self.job_dirs()
        out = self.stream or sys.stderr
        complete = sum(1 for d in jobs if self._seen.get(d) == "complete")
        killed = sum(1 for d in jobs if str(self._seen.get(d, "")).startswith("killed"))
        unstarted = list(getattr(self._slurm, "never_started", None) or [])  # cancelled while pending
        total, n_failed = len(jobs) + len(unstarted), len(failed) + len(unstarted)
        print(
            f"[lexp sweep] {total} jobs in {time.time() - self._started:.1f} s: {complete} complete, "
            f"{n_failed} failed{f' ({killed} killed)' if killed else ''} ({self._sweep_dir})",
            file=out,
            flush=True,
        )
        requeued = {d: (_read(d / RESULTS) or {}).get("slurm") or {} for d in jobs}
        requeued = {d: r["restarts"] for d, r in requeued.items() if r.get("restarts")}
        if requeued:
            names = ", ".join(f"job {job_info(d)['num']} ({n}x)" for d, n in requeued.items())
            print(
                f"[lexp sweep] requeued by SLURM and resumed from the caches: {names}", file=out, flush=True
            )
        if failed or unstarted:
            infos = {d: job_info(d) for d in jobs}
            # name a job by the overrides that tell it from the others (the swept ones)
            every = [set(i["overrides"]) for i in infos.values()] + [set(o) for _, o, _ in unstarted]
            common = set.intersection(*every) if every else set()
            for job_dir, message in failed:
                info = infos.get(job_dir) or job_info(job_dir)
                own = " ".join(o for o in info["overrides"] if o not in common) or job_dir.name
                print(f"  job {info['num']} ({own}): {message}", file=out, flush=True)
            for num, overrides, why in unstarted[:10]:
                own = " ".join(o for o in overrides if o not in common)
                print(f"  job {num} ({own}): {why}", file=out, flush=True)
            if len(unstarted) > 10:
                print(f"  ... and {len(unstarted) - 10} more jobs that never started", file=out, flush=True)
            raise SystemExit(1)

    # ------------------------------------------------------------------------------------ internals
    def _sacct_notice(self, error: str) -> None:
        """One line per sweep instead of submitit's sacct warnings at every poll (lexp.slurm_watch)."""
        print(
            f"[lexp sweep] sacct gives no job states ({error}): following the jobs with squeue",
            file=self.stream or sys.stderr,
            flush=True,
        )

    def job_dirs(self) -> list[Path]:
        """Every job directory of the sweep (Hydra writes ``.hydra/`` when a job starts)."""
        assert self._sweep_dir is not None
        if not self._sweep_dir.is_dir():
            return []
        dirs = {p.parent.parent for p in self._sweep_dir.rglob(".hydra/overrides.yaml")}
        dirs |= {p.parent for p in self._sweep_dir.rglob(RESULTS)}
        return sorted((d for d in dirs if ".submitit" not in d.parts), key=_job_order)

    def failures(self) -> list[tuple[Path, str]]:
        """(job dir, one-line message) of every job whose results.json is not ``complete``."""
        out = []
        for job_dir in self.job_dirs():
            status = self._seen.get(job_dir)
            if status == "complete":
                continue
            if status is None:
                data = _read(job_dir / RESULTS)
                status = str(data.get("status")) if data else None
            if status is None:
                message = "no results.json: the job died before lexp started (see its log)"
            elif status.startswith("killed"):
                message = f"{status}: stopped by a signal (SLURM time limit, preemption or scancel)"
            elif not status.startswith("failed"):
                message = f"results.json still says {status!r}: the job was killed (see its log)"
            else:
                message = _one_line(status)
            out.append((job_dir, message))
        return out

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._scan()

    def _scan(self) -> None:
        with self._lock:
            if self._sweep_dir is None or not self._sweep_dir.is_dir():
                return
            for path in sorted(self._sweep_dir.rglob(RESULTS), key=lambda p: _job_order(p.parent)):
                job_dir = path.parent
                if job_dir in self._seen or ".submitit" in job_dir.parts:
                    continue
                data = _read(path)
                if data is None or not _final(data.get("status")):
                    continue
                self._seen[job_dir] = str(data["status"])
                line = progress_line(job_dir, data, done=len(self._seen))
                print(line, file=self.stream or sys.stderr, flush=True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _job_order(job_dir: Path) -> tuple[int, str]:
    head = job_dir.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, str(job_dir))
