"""End to end: `lexp.run` on a small slice of real EWT data with the real MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp.experiment import config_dir, run
from lexp.store import open_store

SLICE = ["limit.train=300", "limit.dev=100", "limit.test=100", "probe.epochs=3", "progress=false"]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _slice_cfg(data_root: Path, cache: Path, *extra: str, logger: str = "none"):
    """The real-data slice every run here shares (one cache, so stores are reused), plus ``extra``."""
    return _cfg([f"data_root={data_root}", f"cache_dir={cache}", f"logger={logger}", *SLICE, *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def first_run(cache: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("run")
    cfg = _slice_cfg(data_root, cache, logger="csv")
    return run(cfg, run_dir) | {"run_dir": str(run_dir)}


def test_results_json_is_complete_and_correct(first_run: dict) -> None:
    results = json.loads((Path(first_run["run_dir"]) / "results.json").read_text())
    assert results["status"] == "complete"
    assert (results["task"], results["model"]) == ("pos", "minilm")
    assert (results["n_layers"], results["hidden"], results["n_neurons"]) == (7, 384, 2688)
    assert results["counts"]["train"]["sentences"] == 300 and results["counts"]["dev"]["sentences"] == 100
    assert results["rows"]["train"] == results["counts"]["train"]["tokens"]
    assert results["n_labels"] == 49
    assert set(results["unseen_label_counts"]) == {"train", "dev", "test"}
    # MiniLM on 300 sentences already tags most tokens right; chance is ~1/49
    assert results["oracle"]["dev"]["accuracy"] > 0.8 and results["oracle"]["test"]["accuracy"] > 0.8
    assert results["oracle"]["metric"] == "accuracy"
    for stage in ("read", "extract", "oracle", "total"):
        assert results["timings_s"][stage] >= 0
    for split in ("train", "dev", "test"):
        assert Path(results["stores"][split]).is_dir()
    assert (Path(first_run["run_dir"]) / "metrics.csv").exists()  # logger=csv mirrors the numbers


def test_store_rows_match_the_task_and_labels(first_run: dict) -> None:
    store = open_store(first_run["stores"]["dev"])
    assert store.activations.shape == (first_run["rows"]["dev"], 2688)
    assert store.labels.shape == (store.n_rows,)
    assert store.offsets[-1] == store.n_rows and len(store.offsets) == 101
    assert np.isfinite(np.asarray(store.activations[:50], dtype=np.float32)).all()


def test_rerun_reuses_stores_and_gives_same_numbers(
    first_run: dict, cache: Path, data_root: Path, tmp_path: Path
) -> None:
    cfg = _slice_cfg(data_root, cache)
    again = run(cfg, tmp_path)
    assert again["stores_reused"] == {"train": True, "dev": True, "test": True}
    assert again["stores"] == first_run["stores"]
    assert again["oracle"]["dev"] == first_run["oracle"]["dev"]  # deterministic: same seed, same numbers


def test_changed_setting_builds_a_new_store(
    first_run: dict, cache: Path, data_root: Path, tmp_path: Path
) -> None:
    cfg = _slice_cfg(
        data_root,
        cache,
        "limit.test=50",
        "analysis=layers",
    )
    out = run(cfg, tmp_path)
    assert out["stores_reused"]["train"] and not out["stores_reused"]["test"]
    assert out["stores"]["test"] != first_run["stores"]["test"]
    table = out["layers"]["table"]
    assert [r["layer"] for r in table] == list(range(7))
    # the incremental probe on all layers is the oracle itself
    assert table[-1]["incremental_dev"] == out["oracle"]["dev"]["accuracy"]
    assert (tmp_path / "figures" / "layers.png").stat().st_size > 1000


def test_cli_runs_and_bad_input_gives_one_clear_error(
    first_run: dict, cache: Path, data_root: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "LEXP_DATA": str(data_root), "LEXP_CACHE": str(cache)}
    ok = subprocess.run(
        [sys.executable, "-m", "lexp.run", *SLICE, "logger=wandb", f"hydra.run.dir={tmp_path / 'cli'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (
        "oracle" in ok.stdout
        and json.loads((tmp_path / "cli" / "results.json").read_text())["status"] == "complete"
    )
    bad_file = tmp_path / "broken.conllu"
    bad_file.write_text("1\tThe\tthe\tDET\tDT\t_\t2\tdet\t_\t_\n2\tcat\n\n")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lexp.run",
            *SLICE,
            "logger=none",
            f"task.files.train={bad_file}",
            f"hydra.run.dir={tmp_path / 'bad'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode == 2
    assert "broken.conllu" in bad.stderr and ":2" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_general_analysis_writes_table6_and_figures(
    first_run: dict, cache: Path, data_root: Path, tmp_path: Path
) -> None:
    cfg = _slice_cfg(
        data_root,
        cache,
        "analysis=general",
        "analysis.ct=[0.0,0.5,0.9]",
    )
    out = run(cfg, tmp_path)
    rows = out["general"]["table6"]
    assert [r["ct"] for r in rows] == [0.0, 0.5, 0.9]
    assert (
        rows[0]["n_neurons"] > rows[1]["n_neurons"] > rows[2]["n_neurons"] > 0
    )  # coarser cut, fewer clusters
    assert all(0.0 < r["dev"] <= 1.0 for r in rows)
    cka = np.asarray(out["general"]["cka"])
    assert cka.shape == (7, 7) and np.allclose(np.diag(cka), 1.0) and np.allclose(cka, cka.T)
    for name in ("cka.png", "reduction_vs_score.png", "cluster_makeup.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    # a second threshold sweep reuses the cached linkage instead of recomputing the correlations
    again = run(
        _slice_cfg(
            data_root,
            cache,
            "analysis=general",
            "analysis.ct=0.7",
            "analysis.evaluate=false",
        ),
        tmp_path / "again",
    )
    assert again["general"]["cache_reused"] and again["general"]["cache"] == out["general"]["cache"]


def test_pipeline_saves_an_extractor_that_reproduces_its_test_score(
    first_run: dict, cache: Path, data_root: Path, tmp_path: Path
) -> None:
    cfg = _slice_cfg(
        data_root,
        cache,
        "analysis=pipeline",
        "analysis.grid.step=100",
        "analysis.batch=64",
        "analysis.timing.sentences=16",
        "analysis.timing.classifier_rows=2000",
        "analysis.timing.classifier_features=[50]",
        "analysis.timing.classifier_epochs=1",
        "analysis.timing.repeats=1",
    )
    out = run(cfg, tmp_path)
    p = out["pipeline"]
    assert 0 <= p["ls_layer"] <= 6 and p["ls_dev"] >= p["ls_target"]
    assert p["ccfs_n_neurons"] <= p["cc_n_neurons"] <= p["ls_n_neurons"]
    assert out["extractor"]["test_accuracy_reloaded"] == pytest.approx(
        out["extractor"]["test_accuracy_reported"]
    )
    speed = out["pipeline_timing"]
    assert speed["forward"][0]["speedup"] == pytest.approx(1.0)
    text = tmp_path / "sentences.txt"
    text.write_text("The cat sat on the mat .\nDogs bark loudly\n")
    done = subprocess.run(
        [sys.executable, "-m", "lexp.predict", str(tmp_path), "--input", str(text)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    tags = [line.split("\t")[1] for line in done.stdout.splitlines() if line]
    assert len(tags) == 10 and set(tags) <= set(out["labels"])
