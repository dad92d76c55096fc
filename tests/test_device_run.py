"""`lexp.run` end to end on each device (cpu always, cuda where present) with tiny BERT and XLNet.

The CUDA half is what `pytest -m gpu` runs on a GPU machine: extraction, fine-tuning, [CLS]
extraction, every probe, the covariance pass, the pipeline's timings and the reduced extractor on
the GPU, with the device recorded in results.json. A GPU asked for where there is none is one
clear error before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from tiny_models import save_model, tiny_bert, tiny_xlnet

SMALL = [
    "limit.train=40",
    "limit.dev=20",
    "limit.test=20",
    "probe.epochs=2",
    "progress=false",
    "logger=none",
]
PIPELINE = [
    "analysis=pipeline",
    "analysis.grid.step=8",
    "analysis.timing.sentences=8",
    "analysis.timing.repeats=1",
    "analysis.timing.classifier_rows=512",
    "analysis.timing.classifier_features=[8]",
    "analysis.timing.classifier_epochs=1",
    "analysis.timing.classifier_steps=4",
]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module", params=["bert", "xlnet"])
def tiny_model(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build = tiny_bert if request.param == "bert" else tiny_xlnet
    model, tokenizer = build(tmp, layers=2)
    return request.param, save_model(model, tokenizer, tmp / "model")


def _overrides(tiny_model: tuple[str, Path], device: torch.device, cache: Path, data_root: Path) -> list[str]:
    name, path = tiny_model
    return [
        f"data_root={data_root}",
        f"cache_dir={cache}",
        f"model.name=tiny-{name}",
        f"model.name_or_path={path}",
        f"device={device.type}",
        *SMALL,
    ]


def _check_device(results: dict, device: torch.device) -> None:
    assert results["status"] == "complete"
    assert results["device"]["type"] == device.type and results["device"]["name"]


def test_pipeline_end_to_end_on_the_device(tiny_model, device, tmp_path: Path, data_root: Path) -> None:
    """Word-level task, analysis=pipeline: every stage of a run on ``device``."""
    cfg = _cfg(_overrides(tiny_model, device, tmp_path / "cache", data_root) + PIPELINE)
    results = run(cfg, tmp_path / "run")
    _check_device(results, device)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["device"] == results["device"]
    assert results["pipeline_timing"]["device"] == str(
        torch.device(device.type, 0) if device.type == "cuda" else device
    )
    assert results["pipeline_timing"]["classifier"][0]["train_steps_timed"] == 4
    assert 0.0 <= results["oracle"]["dev"]["accuracy"] <= 1.0
    extractor = results["extractor"]
    # the saved extractor, reloaded, tags the test set exactly as the run reported
    assert extractor["test_accuracy_reloaded"] == pytest.approx(extractor["test_accuracy_reported"], abs=1e-9)


def test_finetuned_sentence_task_on_the_device(tiny_model, device, tmp_path: Path, data_root: Path) -> None:
    """Sentence task: fine-tuning, the [CLS] store and the oracle on ``device``."""
    overrides = _overrides(tiny_model, device, tmp_path / "cache", data_root) + [
        "task=sst2",
        "finetune.epochs=1",
        "finetune.batch_size=8",
    ]
    results = run(_cfg(overrides), tmp_path / "run")
    _check_device(results, device)
    assert Path(results["finetune"]["path"]).is_dir()
    assert results["rows"]["train"] == 40 and results["oracle"]["dev"]["accuracy"] >= 0.0


def test_a_missing_gpu_is_one_clear_error_before_any_work(tmp_path: Path, data_root: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for override in ("device=cuda", "trainer=gpu", "device=cuda:1"):
        cfg = _cfg([f"data_root={data_root}", f"cache_dir={tmp_path / 'cache'}", *SMALL, override])
        with pytest.raises(LexpInputError, match="asks for a GPU"):
            run(cfg, tmp_path / "run")
        assert not (tmp_path / "cache").exists()  # nothing was read, extracted or cached
    with pytest.raises(LexpInputError, match="contradicts"):
        run(_cfg([f"cache_dir={tmp_path / 'cache'}", "device=cpu", "trainer=gpu"]), tmp_path / "run")


def test_a_full_disk_stops_before_the_first_extraction(
    tiny_model, tmp_path: Path, data_root: Path, monkeypatch
) -> None:
    """The stores still to build are summed and checked against the free space up front: the train
    split is not extracted only for dev to fail on a full disk."""
    import lexp.experiment as experiment
    import lexp.store as store
    from lexp.store import StoreSpaceError

    loaded = []
    monkeypatch.setattr(store, "_free_bytes", lambda directory: 10_000)
    monkeypatch.setattr(experiment, "_load_encoder", lambda *a, **k: loaded.append(1))
    cfg = _cfg(_overrides(tiny_model, torch.device("cpu"), tmp_path / "cache", data_root))
    with pytest.raises(StoreSpaceError, match="bytes"):
        run(cfg, tmp_path / "run")
    assert not loaded and not list((tmp_path / "cache").rglob("manifest.json"))
