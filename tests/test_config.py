"""The configs compose for every task, model, analysis and logger, from a checkout or an install."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lexp.experiment import config_dir

TASKS = ["pos", "chunking", "sem", "ccg", "sst2", "mrpc", "mnli", "qnli", "qqp", "rte", "stsb"]
ANALYSES = ["oracle", "general", "layers", "neurons", "pipeline"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_config_dir_is_the_checkout_conf() -> None:
    assert (config_dir() / "config.yaml").is_file()


def test_defaults_are_the_paper_defaults() -> None:
    cfg = _compose([])
    assert cfg.task.name == "pos" and cfg.model.name == "minilm" and cfg.analysis.name == "oracle"
    assert cfg.probe.epochs == 10 and cfg.probe.lr == pytest.approx(1e-3) and cfg.probe.batch_size == 128
    assert cfg.probe.l1 == pytest.approx(1e-5) and cfg.probe.l2 == pytest.approx(1e-5)
    assert cfg.task.max_train_tokens == 150_000
    assert cfg.extract.subword == "last"
    assert cfg.logger.kind == "wandb" and cfg.logger.mode == "offline"


@pytest.mark.parametrize("task", TASKS)
def test_every_task_resolves(task: str, data_root) -> None:
    cfg = _compose([f"task={task}", f"data_root={data_root}"])
    resolved = OmegaConf.to_container(cfg.task, resolve=True)
    assert resolved["name"] == task
    assert str(data_root) in str(resolved.get("data_dir", ""))


@pytest.mark.parametrize("analysis", ANALYSES)
def test_every_analysis_composes(analysis: str) -> None:
    cfg = _compose([f"analysis={analysis}"])
    assert cfg.analysis.name == analysis


@pytest.mark.parametrize("model", ["minilm", "bert", "xlnet"])
def test_every_model_composes(model: str) -> None:
    cfg = _compose([f"model={model}"])
    assert cfg.model.name == model


@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
def test_every_logger_composes(logger: str) -> None:
    assert _compose([f"logger={logger}"]).logger.kind == logger


def test_sweep_overrides_compose() -> None:
    cfg = _compose(["analysis=general", "analysis.ct=[0.0,0.1,0.9]", "probe.epochs=3"])
    assert list(cfg.analysis.ct) == [0.0, 0.1, 0.9] and cfg.probe.epochs == 3


def test_schema_table_documents_every_key() -> None:
    """`python -m lexp.schema` prints every checked key with its allowed values."""
    from lexp.schema import ANALYSIS_KEYS, SCHEMA, TASK_KEYS, describe

    table = describe()
    for key in SCHEMA:
        assert f"`{key}`" in table
    for keys, prefix in [
        *((k, "analysis.") for k in ANALYSIS_KEYS.values()),
        *((k, "task.") for k in TASK_KEYS.values()),
    ]:
        for key in keys:
            assert f"`{prefix}{key}`" in table
    assert "| `probe.epochs` | an integer >= 1 |" in table
