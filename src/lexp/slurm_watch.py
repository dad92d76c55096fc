"""How a sweep follows its SLURM jobs: without ``sacct`` (accounting off), and jobs lost by SLURM.

submitit (under ``hydra/launcher=slurm``) asks ``sacct`` for the state of the sweep's jobs at every
poll. On a cluster without accounting (no slurmdbd, as on many small clusters) each call fails:
sacct prints "Slurm accounting storage is disabled" and submitit logs "Bypassing sacct error ...,
status may be inaccurate" three times, about twenty lines per job; and a job that SLURM ended
without a result (killed at its time limit, cancelled) stays "UNKNOWN", so the sweep never ends.

:class:`QuietSlurmWatcher` is submitit's own watcher with one change: when sacct fails it says so
once per sweep and asks ``squeue`` (which slurmctld answers without accounting) for the states
instead.

A job that SLURM ended without a result (SIGKILL after its time limit's grace period, an OOM kill,
a node failure) makes submitit raise in the launching process, which would end the sweep with a
traceback, no summary, and the job's results.json still at ``running``. While a sweep waits, such
a job's results.json says ``killed (SLURM: <state>, no result; its log: ...)`` instead and the sweep goes
on; its summary lists the job.

:func:`follow_slurm_jobs` puts both in place for the time of a sweep (:class:`lexp.sweep.SweepCallback`
does, in the launching process, for ``hydra/launcher=slurm`` and ``submitit_slurm``).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

__all__ = ["QuietSlurmWatcher", "follow_slurm_jobs"]

log = logging.getLogger("lexp")

#: the longest pause between two asks for the sweep's job states (sacct, else squeue)
REFRESH_S = 30


class QuietSlurmWatcher(SlurmInfoWatcher):
    """submitit's SlurmInfoWatcher; states from ``squeue -t all`` when sacct fails (said once)."""

    def __init__(self, notice: Callable[[str], None], delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self._notice = notice
        self.sacct_failures = 0
        #: (Hydra job number, overrides, why) of the jobs SLURM ended before lexp started
        self.never_started: list[tuple[int | None, list[str], str]] = []

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        proc = subprocess.run(command, capture_output=True, timeout=120)
        if proc.returncode == 0:
            self._info_dict.update(self.read_info(proc.stdout))
        else:
            self.sacct_failures += 1
            if self.sacct_failures == 1:
                why = (
                    proc.stderr.decode(errors="replace").strip().splitlines() or [f"exit {proc.returncode}"]
                )[0]
                self._notice(why)
            self._info_dict.update(self._squeue_states())
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _squeue_states(self) -> dict[str, dict[str, str]]:
        """``{"123_4": {"State": "RUNNING"}, ...}`` for the jobs still followed. slurmctld keeps a
        finished job for MinJobAge (300 s by default): its final state (COMPLETED, TIMEOUT,
        CANCELLED...); a job it no longer knows is over ("GONE")."""
        pending = self._registered - self._finished
        arrays = sorted({job_id.split("_")[0] for job_id in pending})
        if not arrays:
            return {}
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            return {}  # slurmctld busy or unreachable: ask again at the next poll
        listed = dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)
        return {job_id: {"JobID": job_id, "State": listed.get(job_id, "GONE")} for job_id in pending}


@contextmanager
def follow_slurm_jobs(sweep_dir: Path, notice: Callable[[str], None]) -> Iterator[QuietSlurmWatcher]:
    """Inside the block, every SlurmJob of this process polls through a :class:`QuietSlurmWatcher`,
    and a job without a result is recorded as killed (see the module's docstring)."""
    from submitit.core import core, utils

    previous = SlurmJob.watcher
    # submitit asks at most every 600 s once its jobs are old: a job killed without a result (it
    # has no result file to be seen by) would keep a long sweep waiting for up to 10 minutes
    watcher = QuietSlurmWatcher(notice, delay_s=min(previous._delay_s, REFRESH_S))
    real_results = core.Job.results

    def results(job: Any) -> list[Any]:
        if isinstance(job, SlurmJob):
            job.wait()
            if job.watcher.get_state(job.job_id, mode="cache") not in ("COMPLETED", "UNKNOWN"):
                # over without success (cancelled before it started, killed): its result file, if
                # any, is there by now; submitit would wait 15 s for each such job, one by one
                job._results_timeout_s = 2
        try:
            return real_results(job)
        except (utils.UncompletedJobError, utils.FailedJobError):
            if not isinstance(job, SlurmJob):
                raise
            return [_lost(job, sweep_dir, watcher)]

    SlurmJob.watcher = watcher
    core.Job.results = results  # type: ignore[method-assign]  # what the plugin's launch() waits on
    try:
        yield watcher
    finally:
        SlurmJob.watcher = previous
        core.Job.results = real_results  # type: ignore[method-assign]


def _lost(job: SlurmJob, sweep_dir: Path, watcher: QuietSlurmWatcher) -> Any:
    """Record the end of a job that left no result; the sweep goes on (a completed JobReturn: the
    job's results.json carries the outcome, as for every lexp job). A job that never started
    (cancelled while pending) has no job directory: ``watcher.never_started`` names it."""
    from hydra.core.utils import JobReturn, JobStatus

    from lexp.sweep import RESULTS, _final, _read, job_info, write_status

    try:
        overrides, _, job_num, *_ = job.submission().args
    except Exception:  # no submission pickle: nothing to name the job by
        overrides, job_num = [], None
    state = job.watcher.get_state(job.job_id, mode="cache")
    for hydra_dir in sorted(Path(sweep_dir).glob("*/.hydra")):
        job_dir = hydra_dir.parent
        if job_info(job_dir)["num"] != job_num:
            continue
        if not _final((_read(job_dir / RESULTS) or {}).get("status")):  # else lexp finished its record
            status = f"killed (SLURM: {state}, no result; its log: {job.paths.stderr})"
            write_status(job_dir, None, status)
            log.warning("job %s (SLURM job %s): %s", job_num, job.job_id, status)
        break
    else:
        watcher.never_started.append((job_num, list(overrides), f"never started (SLURM: {state})"))
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)
