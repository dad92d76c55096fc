"""Sweeps under every launcher: failure isolation, progress lines, shared caches, SLURM settings.

Real sweeps (``python -m lexp.run -m``) with a tiny BERT on a tiny slice of EWT: the basic launcher
(the default), joblib (parallel processes on one missing store) and submitit_local (the SLURM
submission path on this machine). A failing job never stops the others; each job's results.json
holds its status; the sweep prints a line per finished job, lists the failures and exits 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lexp.experiment import config_dir
from lexp.sweep import SweepCallback, progress_line

TINY = [
    "task=pos",
    "limit.train=20",
    "limit.dev=10",
    "limit.test=10",
    "probe.epochs=1",
    "progress=false",
    "logger=none",
    "threads.extract=1",
    "threads.clustering=1",
]
BAD_LR = "lexp: error: probe.lr=-5 is invalid"


def _sweep(
    tmp: Path, model: Path, data_root: Path, *overrides: str, cache: Path | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "LEXP_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lexp.run",
            "-m",
            *TINY,
            "model.name=tiny",
            f"model.name_or_path={model}",
            f"cache_dir={cache or tmp / 'cache'}",
            f"hydra.sweep.dir={sweep_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, sweep_dir


def _results(sweep_dir: Path) -> dict[int, dict]:
    return {
        int(p.parent.name.split("_")[0]): json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")
    }


def _progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[lexp sweep]") and " · " in line]


def test_basic_launcher_runs_every_job_and_lists_the_failed_one(
    tmp_path: Path, tiny_model: Path, data_root: Path
) -> None:
    """The issue's case: probe.lr=0.001,-5,0.002 used to stop before the third job."""
    proc, sweep_dir = _sweep(tmp_path, tiny_model, data_root, "probe.lr=0.01,-5,0.02")
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = _results(sweep_dir)
    assert sorted(results) == [0, 1, 2]  # the job after the failing one ran
    assert results[0]["status"] == results[2]["status"] == "complete"
    assert results[1]["status"].startswith(f"failed: {BAD_LR}")
    assert results[1]["task"] == "pos" and results[1]["model"] == "tiny"
    assert results[1]["config"]["probe"]["lr"] == -5  # the failed job's settings, as run() records them
    # one progress line per job as it finishes, then the summary naming the swept value
    lines = _progress(proc.stderr)
    assert len(lines) == 3 and sum("FAILED" in line for line in lines) == 1
    assert any(
        line.startswith("[lexp sweep] 1 done, job 0 · pos · tiny · oracle · complete") for line in lines
    )
    assert "oracle dev accuracy" in lines[0] and lines[0].endswith(" s")
    assert "[lexp sweep] 3 jobs in" in proc.stderr and "2 complete, 1 failed" in proc.stderr
    assert f"  job 1 (probe.lr=-5): {BAD_LR}" in proc.stderr
    assert "Traceback" not in proc.stderr
    # lexp.tables reads the sweep: the failed job is named and left out, the model keeps its name
    tables = subprocess.run(
        [sys.executable, "-m", "lexp.tables", str(sweep_dir)], capture_output=True, text=True, timeout=120
    )
    assert tables.returncode == 0 and "· model tiny\n" in tables.stdout
    assert "probe.lr=0.01" in tables.stdout and "probe.lr=0.02" in tables.stdout
    assert "1_pos_tiny_oracle/results.json: status 'failed: lexp: error:" in tables.stderr
    # no launcher configured: Hydra's basic launcher, in this process
    assert "BasicLauncher" in OmegaConf.load(sweep_dir / "multirun.yaml").hydra.launcher._target_


def test_joblib_jobs_on_one_missing_store_build_it_once(
    tmp_path: Path, tiny_model: Path, data_root: Path
) -> None:
    """Two identical jobs at once (and a failing third): one extraction per split, the same numbers.
    (tests/test_locks.py starts more processes at once on the same caches.)"""
    proc, sweep_dir = _sweep(
        tmp_path,
        tiny_model,
        data_root,
        "probe.lr=0.01,0.01,-5",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=3",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = _results(sweep_dir)
    assert sorted(results) == [0, 1, 2]
    good = [results[0], results[1]]
    assert all(r["status"] == "complete" for r in good)
    assert results[2]["status"].startswith(f"failed: {BAD_LR}")
    for split in ("train", "dev", "test"):
        assert [r["stores_reused"][split] for r in good].count(False) == 1  # exactly one build
        assert len({r["stores"][split] for r in good}) == 1
    assert len({json.dumps(r["oracle"]["dev"]) for r in good}) == 1  # identical results
    store_root = tmp_path / "cache" / "stores" / "tiny"
    assert not [p for p in store_root.rglob("*") if ".partial-" in p.name]
    assert len(_progress(proc.stderr)) == 3 and "2 complete, 1 failed" in proc.stderr
    assert "JoblibLauncher" in OmegaConf.load(sweep_dir / "multirun.yaml").hydra.launcher._target_


def test_submitit_local_runs_the_cluster_submission_path(
    tmp_path: Path, tiny_model: Path, data_root: Path
) -> None:
    """submitit_local pickles and starts each job exactly as submitit_slurm would; a job failing at
    run time (a missing data file) is isolated like one failing the config check."""
    proc, sweep_dir = _sweep(
        tmp_path,
        tiny_model,
        data_root,
        f"task.files.train=en_ewt-ud-train.conllu,{tmp_path / 'missing.conllu'}",
        "hydra/launcher=local",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = _results(sweep_dir)
    assert sorted(results) == [0, 1]
    assert results[0]["status"] == "complete" and results[0]["oracle"]["dev"]["accuracy"] >= 0
    assert (
        results[1]["status"].startswith("failed: lexp: error:") and "missing.conllu" in results[1]["status"]
    )
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2  # two submitted jobs
    assert len(_progress(proc.stderr)) == 2
    assert "missing.conllu" in proc.stderr.split("[lexp sweep] 2 jobs in", 1)[1]
    multirun = OmegaConf.load(sweep_dir / "multirun.yaml")
    assert multirun.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert multirun.hydra.launcher.timeout_min == 1440  # lexp's conf/hydra/launcher/local.yaml


def test_single_run_keeps_exit_2_and_one_line(tmp_path: Path, data_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lexp.run", "probe.lr=-5", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "LEXP_DATA": str(data_root)},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[0]]
    assert proc.stderr.startswith(BAD_LR)


# ------------------------------------------------------------------------------------ launcher configs
def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("joblib", "JoblibLauncher"),
        ("submitit_local", "LocalLauncher"),
        ("submitit_slurm", "SlurmLauncher"),
        ("local", "LocalLauncher"),
        ("slurm", "SlurmLauncher"),
    ],
)
def test_launcher_configs_compose_and_instantiate(name: str, target: str, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = _hydra_cfg(f"hydra/launcher={name}", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=lexp")
    assert cfg.hydra.launcher._target_.endswith(target)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == target


class _Submitted(Exception):
    pass


def test_slurm_overrides_reach_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """partition / time / gpus / cpus given on the command line end up as #SBATCH lines (the
    plugin's own launch(), stopped at the submission; a stand-in srun makes submitit accept it)."""
    import submitit
    from hydra.utils import instantiate

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = _hydra_cfg(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.cpus_per_task=6",
        "hydra.launcher.account=mylab",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.job.name=run",
    )
    seen = {}

    def map_array(self, fn, *iterables):
        seen["sbatch"] = self._executor._make_submission_file_text("python -m submitit.core._submit", "x")
        raise _Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    with pytest.raises(_Submitted):
        launcher.launch([["task=pos"], ["task=sem"]], initial_job_idx=0)
    text = seen["sbatch"]
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --account=mylab",
        "#SBATCH --mem=32GB",
        "#SBATCH --job-name=lexp-run",
    ):
        assert line in text, text


def test_a_missing_launcher_plugin_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from lexp import run

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "joblib_launcher" in name else real(name, *a)
    )
    message = run.launcher_problem(["task=pos", "hydra/launcher=joblib"])
    assert message is not None and message.startswith("lexp: error: hydra/launcher=joblib needs")
    assert "pip install 'hydra-joblib-launcher==1.2.0'" in message
    assert run.launcher_problem(["hydra/launcher=submitit_local"]) is None  # installed
    assert run.launcher_problem(["task=pos"]) is None  # the basic launcher needs nothing


# ---------------------------------------------------------------------------------- progress, summary
def _job(sweep: Path, num: int, status: str | None, overrides: list[str], **extra) -> Path:
    job = sweep / f"{num}_pos_tiny_oracle"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), job / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if status is not None:
        data = {"status": status, "task": "pos", "model": "tiny", "analysis": "oracle", **extra}
        (job / "results.json").write_text(json.dumps(data))
    return job


def test_sweep_summary_names_killed_and_unstarted_jobs(tmp_path: Path) -> None:
    import io

    sweep = tmp_path / "sweep"
    oracle = {"metric": "accuracy", "dev": {"accuracy": 0.875}}
    _job(sweep, 0, "complete", ["task=pos", "seed=1"], oracle=oracle, timings_s={"total": 12.25})
    _job(sweep, 1, "running", ["task=pos", "seed=2"])  # killed: SLURM time limit, OOM
    _job(sweep, 2, None, ["task=pos", "seed=3"])  # died before lexp wrote anything
    _job(sweep, 3, "failed: lexp: error: bad\nsecond line", ["task=pos", "seed=4"])
    out = io.StringIO()
    callback = SweepCallback(poll_s=0.05, stream=out)
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_end(OmegaConf.create({}))
    assert exit_info.value.code == 1
    text = out.getvalue()
    assert (
        "[lexp sweep] 1 done, job 0 · pos · tiny · oracle · complete · oracle dev accuracy 0.8750 · 12.2 s"
        in text
    )
    assert "4 jobs in" in text and "1 complete, 3 failed" in text
    assert "  job 1 (seed=2): results.json still says 'running': the job was killed" in text
    assert "  job 2 (seed=3): no results.json: the job died before lexp started" in text
    assert "  job 3 (seed=4): lexp: error: bad\n" in text and "second line" not in text


def test_a_sweep_without_failures_ends_normally(tmp_path: Path) -> None:
    import io

    sweep = tmp_path / "sweep"
    job = _job(sweep, 0, "complete", ["seed=1"], oracle={"dev": {"accuracy": 0.5}}, timings_s={"total": 1.0})
    out = io.StringIO()
    callback = SweepCallback(poll_s=0.05, stream=out)
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    callback.on_multirun_end(OmegaConf.create({}))  # no SystemExit
    assert out.getvalue().count("job 0 · pos") == 1  # printed once, by the watcher or the final scan
    assert "1 complete, 0 failed" in out.getvalue()
    line = progress_line(job, json.loads((job / "results.json").read_text()))
    assert line == "[lexp sweep] job 0 · pos · tiny · oracle · complete · oracle dev accuracy 0.5000 · 1.0 s"


def test_a_failed_run_is_marked_failed_in_wandb(tmp_path: Path, data_root: Path, monkeypatch) -> None:
    from lexp.errors import LexpInputError
    from lexp.experiment import run
    from lexp.report import tracking

    codes: list[int] = []
    real = tracking.WandbTracker.finish

    def finish(self, exit_code: int = 0) -> None:
        codes.append(exit_code)
        real(self, exit_code=exit_code)  # wandb's Run.finish(exit_code=1): the run shows as failed

    monkeypatch.setattr(tracking.WandbTracker, "finish", finish)

    def wandb_cfg(*overrides: str):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    f"data_root={data_root}",
                    f"cache_dir={tmp_path / 'cache'}",
                    "logger=wandb",
                    *overrides,
                ],
            )

    cfg = wandb_cfg(f"task.files.train={tmp_path / 'missing.conllu'}")
    # A run that fails its checks (before the tracker starts, so a bad setting costs seconds, not
    # the ~10 s of Lightning imports) opens no W&B run; results.json records the failure.
    with pytest.raises(LexpInputError, match="missing.conllu"):
        run(cfg, tmp_path / "run")
    assert codes == []
    status = json.loads((tmp_path / "run" / "results.json").read_text())["status"]
    assert status.startswith("failed: LexpInputError:") and "missing.conllu" in status
    # A run that fails after the tracker started is marked failed there.
    import lexp.experiment as experiment

    def broken_stores(ctx) -> None:
        raise LexpInputError(f"{tmp_path / 'store.npy'}: unreadable")

    monkeypatch.setattr(experiment, "build_stores", broken_stores)
    cfg = wandb_cfg("limit.train=20", "limit.dev=10", "limit.test=10")
    with pytest.raises(LexpInputError, match="store.npy"):
        run(cfg, tmp_path / "run2")
    assert codes == [1]
    status = json.loads((tmp_path / "run2" / "results.json").read_text())["status"]
    assert status.startswith("failed: LexpInputError:") and "store.npy" in status
