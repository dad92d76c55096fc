"""Sentence tasks end to end: fine-tune (cached) → [CLS] store → probes, with STS-B as regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp.experiment import config_dir, run
from lexp.store import open_store

QUICK = [
    "limit.train=96",
    "limit.dev=32",
    "limit.test=32",
    "finetune.epochs=1",
    "probe.epochs=20",
    "probe.lr=0.01",
    "probe.batch_size=16",
    "progress=false",
    "logger=none",
]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_stsb_is_regression_end_to_end(data_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(
        [
            f"data_root={data_root}",
            f"cache_dir={cache}",
            "task=stsb",
            "analysis=neurons",
            "analysis.grid.counts=[5,50]",
            *QUICK,
        ]
    )
    out = run(cfg, tmp_path / "run")
    assert out["status"] == "complete" and out["task_kind"] == "regression"
    assert out["rows"] == {"train": 96, "dev": 32, "test": 32}  # one [CLS] row per example
    assert set(out["oracle"]["dev"]) >= {"pearson", "spearman"}
    assert out["oracle"]["metric"] == "pearson"
    assert out["neurons"]["metric"] == "pearson"
    assert out["neurons"]["n_neurons"] in (5, 50, 2688)
    store = open_store(out["stores"]["train"])
    assert store.labels.dtype == np.float32 and 0.0 <= store.labels.min() and store.labels.max() <= 5.0
    assert Path(out["finetune"]["path"]).is_dir()
    # a second run (another analysis) reuses the fine-tuned model and the stores
    again = run(
        _cfg(
            [
                f"data_root={data_root}",
                f"cache_dir={cache}",
                "task=stsb",
                "analysis=pipeline",
                "analysis.timing.enabled=false",
                *QUICK,
            ]
        ),
        tmp_path / "run2",
    )
    assert again["finetune"]["path"] == out["finetune"]["path"]
    assert all(again["stores_reused"].values())
    # The saved extractor scores the raw test pairs like the pipeline reported (float32 features
    # here, float16 store there: Pearson within a few 1e-4).
    extractor = again["extractor"]
    # (the reported probe is the CCFS set retrained alone: equal to its grid head up to float32 rounding)
    assert extractor["test_pearson_reported"] == pytest.approx(again["pipeline"]["ccfs_test"], abs=1e-5)
    assert abs(extractor["test_pearson_reloaded"] - extractor["test_pearson_reported"]) < 2e-3
