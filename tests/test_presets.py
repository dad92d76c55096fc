"""The paper as experiment presets (conf/experiment/): each composes, sweeps the expected jobs, combines
with a launcher, and a real (tiny) preset sweep gives the paper's tables through lexp.tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lexp.experiment import config_dir
from lexp.schema import check_config
from tiny_models import save_model, tiny_bert

LABELLING = ["pos", "sem", "ccg", "chunking"]
ALL_TASKS = LABELLING + ["sst2", "mrpc", "mnli", "qnli", "qqp", "rte", "stsb"]
CTS = [round(0.1 * i, 1) for i in range(10)]
PRESETS = {  # preset -> (analyses, tasks)
    "table6": (["general"], LABELLING),
    "table7": (["layers"], ALL_TASKS),
    "table8": (["neurons"], ALL_TASKS),
    "tables3_9_10": (["pipeline"], ALL_TASKS),
    "paper": (["general", "layers", "neurons", "pipeline"], ALL_TASKS),
}


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def sweep_jobs(command_line: list[str]) -> list[list[str]]:
    """The jobs ``python -m lexp.run -m <command_line>`` runs: the overrides of each, in order, as
    Hydra's BasicSweeper computes them (the preset's hydra.sweeper.params, then the command line)."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(command_line) if not o.is_sweep_override()]
    cfg = _compose(fixed, hydra=True)  # the config the sweeper reads its params from
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    overrides = parser.parse_overrides(params + command_line)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_composes_and_sweeps_the_expected_jobs(preset: str, data_root: Path) -> None:
    analyses, tasks = PRESETS[preset]
    jobs = sweep_jobs([f"+experiment={preset}"])
    assert len(jobs) == len(analyses) * len(tasks)
    seen = set()
    # every job of table6; a sample of the others (composing costs ~0.3 s a job on a busy machine),
    # the job list itself is checked whole below
    step = {"table6": 1, "paper": 5}.get(preset, 4)
    for job in jobs[::step]:
        cfg = _compose([*job, f"data_root={data_root}"])
        check_config(cfg, device=False)  # every setting a job gets is valid
        seen.add((cfg.analysis.name, cfg.task.name))
        assert cfg.analysis.name in analyses and cfg.task.name in tasks
        if cfg.analysis.name == "general":
            assert list(cfg.analysis.ct) == CTS  # Table 6's thresholds, all cut in the one job
        else:
            assert "ct" not in cfg.analysis or cfg.analysis.name == "pipeline"
    if preset == "table6":
        assert seen == {(a, t) for a in analyses for t in tasks}
    swept = [tuple(sorted(j for j in job if j.startswith(("+paper=", "task=")))) for job in jobs]
    assert len(set(swept)) == len(jobs)  # each combination once
    assert {j.removeprefix("task=") for job in jobs for j in job if j.startswith("task=")} == set(tasks)
    hydra = _compose([f"+experiment={preset}"], hydra=True).hydra
    assert str(hydra.sweep.dir).endswith(f"_{preset}")


def test_the_command_line_narrows_a_preset(data_root: Path) -> None:
    assert [
        j for job in sweep_jobs(["+experiment=table7", "task=pos,sem"]) for j in job if j.startswith("task=")
    ] == [
        "task=pos",
        "task=sem",
    ]
    jobs = sweep_jobs(["+experiment=paper", "+paper=table6,table8", "task=pos"])
    assert sorted(j[0] for j in jobs) == ["+paper=table6", "+paper=table8"]
    model_sweep = sweep_jobs(["+experiment=table6", "model=minilm,bert"])
    assert len(model_sweep) == 8  # 4 tasks x 2 models


@pytest.mark.parametrize("launcher", ["joblib", "local", "slurm"])
def test_presets_combine_with_a_launcher(launcher: str) -> None:
    cfg = _compose(["+experiment=paper", f"hydra/launcher={launcher}"], hydra=True)
    assert "Launcher" in cfg.hydra.launcher._target_ and "Basic" not in cfg.hydra.launcher._target_
    assert set(cfg.hydra.sweeper.params) == {"+paper", "task"}
    assert cfg.hydra.callbacks.lexp_sweep._target_ == "lexp.sweep.SweepCallback"


def test_a_preset_sweep_gives_the_paper_table(tmp_path: Path, data_root: Path) -> None:
    """+experiment=table6 on two tasks with a tiny model, then python -m lexp.tables on the sweep."""
    model = save_model(*tiny_bert(tmp_path, layers=2), tmp_path / "model")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "LEXP_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    small = ["limit.train=30", "limit.dev=15", "limit.test=15", "probe.epochs=1", "progress=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "lexp.run", "-m", "+experiment=table6", "task=pos,sem", "model.name=tiny"]
        + [f"model.name_or_path={model}", f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
        + ["logger=none", "threads.clustering=1", *small],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.glob("*_tiny_general")) == [
        "0_pos_tiny_general",
        "1_sem_tiny_general",
    ]
    multirun = OmegaConf.load(sweep / "multirun.yaml")
    assert list(multirun.analysis.ct) == CTS
    tables = subprocess.run(
        [sys.executable, "-m", "lexp.tables", str(sweep), "--paper"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tables.returncode == 0, tables.stderr
    text = tables.stdout
    assert "Table 6" in text and "| pos" in text.replace("|pos", "| pos") and "sem" in text
    for ct in ("0.0", "0.5", "0.9"):
        assert ct in text
