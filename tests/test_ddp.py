"""DDP fine-tuning inside lexp.run: 2 CPU processes (gloo), inside a Hydra multirun.

``trainer.strategy=ddp trainer.devices=2`` runs as ``ddp_spawn`` (lexp.encoders.finetune.spawn_strategy):
the two ranks run only ``trainer.fit``; the job's own process saves the model, evaluates it, extracts
the [CLS] store and trains the probes once. The next job of the sweep reuses the fingerprinted model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lexp.encoders.finetune import spawn_strategy
from lexp.experiment import RunContext, config_dir
from tiny_models import save_model, tiny_bert


def test_ddp_fine_tuning_in_a_multirun(tmp_path: Path, data_root: Path) -> None:
    model = save_model(*tiny_bert(tmp_path, layers=2), tmp_path / "model")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "LEXP_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lexp.run",
            "-m",
            "task=rte",
            "analysis=oracle,layers",  # two jobs: the second reuses the fine-tuned model
            "model.name=tiny",
            f"model.name_or_path={model}",
            "limit.train=32",
            "limit.dev=16",
            "limit.test=16",
            "finetune.epochs=1",
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "probe.epochs=1",
            "progress=false",
            "logger=none",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trainer.strategy=ddp runs as ddp_spawn" in proc.stdout + proc.stderr
    assert "All distributed processes registered. Starting with 2 processes" in proc.stdout + proc.stderr
    # no duplicated output: the two jobs' dirs only, no Hydra run dir made by a re-executed rank
    assert sorted(p.name for p in sweep.iterdir()) == [
        "0_rte_tiny_oracle",
        "1_rte_tiny_layers",
        "multirun.yaml",
    ]
    assert not (tmp_path / "outputs").exists()
    assert proc.stdout.count("lexp rte · tiny · analysis=") == 2  # each job's summary once, not per rank
    first, second = (
        json.loads((sweep / d / "results.json").read_text())
        for d in ("0_rte_tiny_oracle", "1_rte_tiny_layers")
    )
    assert first["status"] == second["status"] == "complete"
    # one fine-tuning on 2 ranks, reused by the second job; its stores built once
    assert first["finetune"]["path"] == second["finetune"]["path"]
    manifest = json.loads((Path(first["finetune"]["path"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["strategy"] == "DDPStrategy (spawned ranks)"
    assert manifest["settings"]["trainer"]["devices"] == "2"  # part of the fingerprint
    assert manifest["global_step"] == 2  # 32 examples / (2 ranks x batch 8): each rank saw half
    assert manifest["timing"]["train_examples"] == 32
    assert set(manifest["metrics"]) == {"dev", "test"}  # evaluated once, in the job's process
    assert not any(first["stores_reused"].values()) and all(second["stores_reused"].values())
    assert first["rows"] == {"train": 32, "dev": 16, "test": 16}  # [CLS] rows extracted once
    assert second["layers"]["table"] and first["oracle"]["dev"] == second["oracle"]["dev"]
    ft_dir = Path(first["finetune"]["path"]).parent
    assert [p.name for p in ft_dir.iterdir() if p.is_dir()] == [Path(first["finetune"]["path"]).name]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ddp", "ddp_spawn"),
        ("ddp_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_true"),
        ("ddp_spawn", "ddp_spawn"),
        ("auto", "auto"),
        ("fsdp", "fsdp"),
    ],
)
def test_spawn_strategy(given: str, expected: str) -> None:
    kwargs, note = spawn_strategy({"strategy": given, "devices": 2, "accelerator": "cpu"})
    plugins = kwargs.pop("plugins", [])
    assert kwargs == {"strategy": expected, "devices": 2, "accelerator": "cpu"}
    assert (note is not None) == (given != expected)
    assert [type(p).__name__ for p in plugins] == (["LightningEnvironment"] if note else [])


def test_spawned_ranks_inside_a_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a one-task SLURM job (submitit), each spawned rank must get its own rank: Lightning's
    SLURM environment would give both SLURM_PROCID=0 (two rank-0 processes, a hung fit)."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    # LightningEnvironment.set_global_rank sets the process-wide rank_zero_only.rank: restore it
    # after the test, or every later fine-tune in this pytest process believes it is rank 1.
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "lexp-job",
        "SLURM_NODELIST": "node1",
        "SLURM_JOB_ID": "7",
    }
    slurm |= {"SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    given = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "logger": False}
    plain = pl.Trainer(**{**given, "strategy": "ddp_spawn"}).strategy.cluster_environment
    plain.set_global_rank(1)  # what the spawned rank 1 does
    assert type(plain).__name__ == "SLURMEnvironment" and plain.global_rank() == 0  # ignored
    kwargs, _ = spawn_strategy(given)
    trainer = pl.Trainer(**kwargs)
    env = trainer.strategy.cluster_environment
    env.set_global_rank(1)
    assert type(env).__name__ == "LightningEnvironment" and env.global_rank() == 1
    assert trainer.world_size == 2 and trainer.strategy.launcher is not None


def test_probes_get_one_process_whatever_the_fine_tuning_uses(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["device=cpu", "trainer.strategy=ddp", "trainer.devices=2"]
        )
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, report=None, tracker=None)  # type: ignore[arg-type]
    finetuning = ctx.trainer_kwargs()
    assert (finetuning["devices"], finetuning["strategy"], finetuning["accelerator"]) == (2, "ddp", "cpu")
    probes = ctx.trainer_kwargs(one_process=True)
    assert (probes["devices"], probes["strategy"], probes["accelerator"]) == (1, "auto", "cpu")
