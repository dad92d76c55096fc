"""Sweeps through ``hydra/launcher=slurm`` on a real one-node SLURM cluster (tests/slurm_cluster.py).

munged, slurmctld and slurmd are started for this module under a temporary folder and stopped at
its end (nothing left running). Skipped with the reason where slurm-wlm and munge are not installed
or the tests do not run as root (`.ci/run` installs them). Tiny jobs: a 2-layer random BERT on 20
EWT sentences, logger=none. Accounting is off, as on many small clusters: sacct fails, and the
sweep says so in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurm, missing
from test_launchers import BAD_LR
from test_launchers import TINY as LOCAL_TINY

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no SLURM cluster here: {missing()}")

# the local sweeps' tiny jobs, through the cluster
TINY = [
    *LOCAL_TINY,
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=4, memory_mb=8000)
    try:
        slurm.start()
        yield slurm
    finally:
        killed = slurm.stop()
        assert not slurm.alive() and not killed, f"daemons had to be killed: {killed}"


def _command(tmp: Path, model: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lexp.run",
        "-m",
        *TINY,
        "model.name=tiny",
        f"model.name_or_path={model}",
        f"cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        *overrides,
    ]


def _env(cluster: LocalSlurm, data_root: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {
        **cluster.env(),
        "WANDB_MODE": "disabled",
        "LEXP_DATA": str(data_root),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,  # the jobs import this checkout's lexp, as the launching process does
    }


def _results(sweep_dir: Path) -> dict[int, dict]:
    return {
        int(p.parent.name.split("_")[0]): json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")
    }


def _progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[lexp sweep]") and " · " in line]


def _job_times(cluster: LocalSlurm, job_id: str) -> list[tuple[datetime, datetime]]:
    """(start, end) of every task of an array job, from slurmctld (MinJobAge keeps finished jobs)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id],
        capture_output=True,
        text=True,
        env=cluster.env(),
        check=True,
    ).stdout
    times = []
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        times.append((datetime.fromisoformat(fields["StartTime"]), datetime.fromisoformat(fields["EndTime"])))
    return times


def _array_id(sweep_dir: Path) -> str:
    ids = {p.name.split("_")[0] for p in (sweep_dir / ".submitit").iterdir() if p.name[0].isdigit()}
    assert len(ids) == 1, ids
    return ids.pop()


def test_sweep_on_slurm_isolates_a_failure_throttles_the_array_and_shares_stores(
    cluster: LocalSlurm, tiny_model: Path, data_root: Path, tmp_path: Path
) -> None:
    """Four jobs as one job array, at most two at a time; three identical stores are built once by
    whichever job gets the lock first; the job with a bad setting is listed and the sweep exits 1."""
    started = time.time()
    proc = subprocess.run(
        _command(tmp_path, tiny_model, "probe.lr=0.01,0.01,0.02,-5", "hydra.launcher.array_parallelism=2"),
        capture_output=True,
        text=True,
        env=_env(cluster, data_root),
        timeout=400,
    )
    wall = time.time() - started
    sweep_dir = tmp_path / "sweep"
    assert proc.returncode == 1, proc.stderr[-4000:]
    results = _results(sweep_dir)
    assert sorted(results) == [0, 1, 2, 3]
    good = [results[i] for i in (0, 1, 2)]
    assert all(r["status"] == "complete" for r in good), [r["status"] for r in good]
    assert results[3]["status"].startswith(f"failed: {BAD_LR}")
    # the summary: one line per job, the failed one named by its swept value, exit 1
    assert len(_progress(proc.stderr)) == 4
    assert "[lexp sweep] 4 jobs in" in proc.stderr and "3 complete, 1 failed" in proc.stderr
    assert f"  job 3 (probe.lr=-5): {BAD_LR}" in proc.stderr
    # quiet polling: submitit's sacct warnings are one line for the whole sweep
    output = proc.stdout + proc.stderr
    assert "Bypassing sacct error" not in output
    assert output.count("[lexp sweep] sacct gives no job states") == 1
    # the job array is throttled: --array=0-3%2, and never more than two tasks ran at once
    sbatch = next((sweep_dir / ".submitit").glob(".submission_file_*.sh")).read_text()
    assert "#SBATCH --array=0-3%2" in sbatch and "#SBATCH --cpus-per-task=1" in sbatch
    times = _job_times(cluster, _array_id(sweep_dir))
    assert len(times) == 4
    running = [sum(s <= t < e for s, e in times) for t, _ in times]
    assert max(running) == 2, times  # two at once (the first two start together), never three
    # the stores: built once per split by the jobs running at the same time, under the file locks
    for split in ("train", "dev", "test"):
        assert [r["stores_reused"][split] for r in good].count(False) == 1
        assert len({r["stores"][split] for r in good}) == 1
    assert results[0]["oracle"]["dev"] == results[1]["oracle"]["dev"]  # identical settings, numbers
    assert not list((tmp_path / "cache").rglob("*.partial-*"))
    assert wall < 300, wall


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the sweep ended before {what}: {proc.stderr.read()[-4000:] if proc.stderr else ''}"
            )
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _stage_done(sweep_dir: Path, stage: str):
    def check():
        found = list(sweep_dir.glob("0_*/results.json"))
        if not found:
            return None
        try:
            data = json.loads(found[0].read_text())
        except ValueError:
            return None
        return data if stage in (data.get("timings_s") or {}) else None

    return check


def _state(cluster: LocalSlurm, job: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%T", "-j", job],
        capture_output=True,
        text=True,
        env=cluster.env(),
    )
    return out.stdout.strip()


def _signal_job(cluster: LocalSlurm, sweep_dir: Path, sig: str) -> str:
    # a one-job sweep is one plain SLURM job (no array): its id names its .submitit folder
    (job,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name[0].isdigit()]
    if sig == "KILL":  # as the OOM killer would: scancel --signal=KILL cancels the job with SIGTERM first
        out = subprocess.run(
            ["scontrol", "listpids", job], capture_output=True, text=True, env=cluster.env()
        ).stdout
        pids = [
            int(line.split()[0])
            for line in out.splitlines()[1:]
            if line.split() and line.split()[0].isdigit()
        ]
        python = [
            pid for pid in pids if "submitit" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        ]
        assert python, out
        for pid in python:
            os.kill(pid, 9)
        return job
    done = subprocess.run(
        ["scancel", f"--signal={sig}", job], env=cluster.env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return job


LONG = ["limit.train=200", "probe.epochs=200"]  # an oracle stage of ~10 s to stop the job in


@pytest.mark.parametrize(
    ("signal_name", "max_num_timeout"),
    [("USR2", 1), (None, 0), ("TERM", 1), ("KILL", 1)],
    ids=["time-limit-requeued", "timeout-min-1-no-requeue", "sigterm-preempted", "sigkill-no-result"],
)
def test_a_job_stopped_by_slurm_resumes_or_ends_killed(
    cluster: LocalSlurm,
    tiny_model: Path,
    data_root: Path,
    tmp_path: Path,
    signal_name: str | None,
    max_num_timeout: int,
) -> None:
    """SLURM warns a job of its time limit (or preemption) with USR2 (submitit's --signal=USR2@N) and
    stops it with SIGTERM. USR2 with a requeue left (hydra.launcher.max_num_timeout): submitit
    requeues the job, which resumes from lexp's complete stores and completes. A real time limit
    (timeout_min=1) without a requeue left, or SIGTERM: results.json says ``killed (...)``, the
    sweep lists the job and exits 1. Never a results.json left at ``running``, also after a SIGKILL
    (an OOM kill, the end of KillWait): lexp.slurm_watch records it from SLURM's state."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        _command(
            tmp_path,
            tiny_model,
            *LONG,
            f"hydra.launcher.max_num_timeout={max_num_timeout}",
            # the real time limit: 1 min; SLURM's own USR2 (submitit's --signal=USR2@120) comes
            # within its first minute, the job would need several (the sweep ends in ~30 s)
            *(["hydra.launcher.timeout_min=1", "probe.epochs=5000"] if signal_name is None else []),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cluster, data_root),
    )
    try:
        if signal_name is not None:
            _wait_for(_stage_done(sweep_dir, "extract"), 240, "the stores", proc)
            time.sleep(1)  # into the oracle stage
        job = _signal_job(cluster, sweep_dir, signal_name) if signal_name else ""
        if signal_name == "USR2" and max_num_timeout > 0:
            # slurmctld holds a requeued job back for two minutes (BeginTime): let it start now
            _wait_for(lambda: _state(cluster, job) == "PENDING", 60, "the requeue", proc)
            subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env(), check=True
            )
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = _results(sweep_dir)[0]
    status = result["status"]
    assert "Bypassing sacct error" not in stdout + stderr
    if signal_name == "USR2" and max_num_timeout > 0:
        assert proc.returncode == 0, stderr[-4000:]
        assert status == "complete"
        assert result["slurm"]["restarts"] == 1
        assert all(result["stores_reused"].values())  # the second start reused every store
        assert "requeued by SLURM 1x, resumed from the caches" in stderr
        assert "[lexp sweep] requeued by SLURM and resumed from the caches: job 0 (1x)" in stderr
        return
    assert proc.returncode == 1, stderr[-4000:]
    if signal_name == "TERM":
        assert status == "killed (SIGTERM)"
    elif signal_name == "KILL":  # no handler runs: the launcher records what SLURM says
        assert status.startswith("killed (SLURM: FAILED, no result; its log: "), status
        assert status.endswith("_0_log.err)")
    else:  # SLURM's USR2 before the limit; SIGTERM at the limit if slurmctld sent USR2 late
        assert status.startswith(("killed (time limit: Job not requeued", "killed (SIGTERM)")), status
    assert "1 complete" not in stderr and "0 complete, 1 failed (1 killed)" in stderr
    assert "stopped by a signal (SLURM time limit, preemption or scancel)" in stderr


def test_scancel_of_the_whole_array_lists_the_running_and_the_pending_jobs(
    cluster: LocalSlurm, tiny_model: Path, data_root: Path, tmp_path: Path
) -> None:
    """``scancel <array>`` while one job runs and one waits (array_parallelism=1): the running one
    ends ``killed (SIGTERM)``, the pending one never started; the summary counts and names both
    and the sweep ends at once (no wait for result files that cannot come)."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        _command(tmp_path, tiny_model, *LONG, "probe.lr=0.01,0.02", "hydra.launcher.array_parallelism=1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cluster, data_root),
    )
    try:
        _wait_for(_stage_done(sweep_dir, "extract"), 240, "the stores", proc)
        array = _array_id(sweep_dir)
        assert _state(cluster, f"{array}_1") == "PENDING"
        subprocess.run(["scancel", array], env=cluster.env(), check=True)
        cancelled = time.time()
        stdout, stderr = proc.communicate(timeout=120)
        after_cancel = time.time() - cancelled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr[-4000:]
    results = _results(sweep_dir)
    assert sorted(results) == [0] and results[0]["status"] == "killed (SIGTERM)"
    assert "[lexp sweep] 2 jobs in" in stderr and "0 complete, 2 failed (1 killed)" in stderr
    assert "  job 0 (probe.lr=0.01): killed (SIGTERM): stopped by a signal" in stderr
    assert "  job 1 (probe.lr=0.02): never started (SLURM: CANCELLED)" in stderr
    assert after_cancel < 30, after_cancel
