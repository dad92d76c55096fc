"""How a sweep follows its SLURM jobs where ``sacct`` does not answer (accounting off).

submitit (under ``hydra/launcher=slurm``) asks ``sacct`` for the state of the sweep's jobs at every
poll. On a cluster without accounting (no slurmdbd, as on many small clusters) each call fails:
sacct prints "Slurm accounting storage is disabled" and submitit logs "Bypassing sacct error ...,
status may be inaccurate" three times, about twenty lines per job; and a job that SLURM ended
without a result (killed at its time limit, cancelled) stays "UNKNOWN", so the sweep never ends.

:class:`QuietSlurmWatcher` is submitit's own watcher with one change: when sacct fails it says so
once per sweep and asks ``squeue`` (which slurmctld answers without accounting) for the states
instead. :func:`quiet_slurm_watcher` puts it in place for the time of a sweep
(:class:`lexp.sweep.SweepCallback` does, in the launching process).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

__all__ = ["QuietSlurmWatcher", "quiet_slurm_watcher"]


class QuietSlurmWatcher(SlurmInfoWatcher):
    """submitit's SlurmInfoWatcher; states from ``squeue -t all`` when sacct fails (said once)."""

    def __init__(self, notice: Callable[[str], None], delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self._notice = notice
        self.sacct_failures = 0

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
def quiet_slurm_watcher(notice: Callable[[str], None]) -> Iterator[QuietSlurmWatcher]:
    """Every SlurmJob of this process polls through a :class:`QuietSlurmWatcher` inside the block."""
    previous = SlurmJob.watcher
    watcher = QuietSlurmWatcher(notice, delay_s=previous._delay_s)
    SlurmJob.watcher = watcher
    try:
        yield watcher
    finally:
        SlurmJob.watcher = previous
