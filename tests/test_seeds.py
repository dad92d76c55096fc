"""probe.seeds: the same probe under several init seeds as extra heads of the one pass, mean ± std
in every table, and the decisions (minimal set, LayerSelector + CCFS) per seed in lock-step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lexp.datamodules import ActivationDataModule
from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.probes import HeadSpec, Variants, train_probes
from lexp.redundancy.selection import ccfs_many, minimal_set, minimal_sets, neuron_grid
from lexp.store import StoreWriter
from test_selection import ccfs_task, correlation_cluster, run_ccfs
from tiny_models import save_model, tiny_bert

QUIET = {"enable_progress_bar": False}


# ---------------------------------------------------------------------------------- variants
def test_variants_name_every_head_and_fold_results_into_mean_std_and_selectivity() -> None:
    cols = np.arange(3)
    variants = Variants((1, 2, 3), control=True)
    heads = variants.expand({"a": cols, "b": HeadSpec(cols, seed=9)})
    assert {n: (h.seed, h.target) for n, h in heads.items()} == {
        "a": (1, 0),
        "a~s1": (2, 0),
        "a~s2": (3, 0),
        "a~control": (1, 1),
        "a~control~s1": (2, 1),
        "a~control~s2": (3, 1),
        "b": (9, 0),  # a spec with its own seed: that seed only
        "b~control": (9, 1),
    }

    def result(acc: float, epoch: int = 1) -> dict:
        return {
            "dev": {"accuracy": acc},
            "test": {"accuracy": acc / 2},
            "best_epoch": epoch,
            "weights": acc,
            "bias": 0,
        }

    raw = {
        "a": result(0.5, 2),
        "a~s1": result(0.6),
        "a~s2": result(0.7),
        "a~control": result(0.2),
        "a~control~s1": result(0.2),
        "a~control~s2": result(0.5),
        "b": result(0.9),
        "b~control": result(0.4),
    }
    folded = variants.collect(raw, {"a": cols, "b": HeadSpec(cols, seed=9)})
    a = folded["a"]
    assert a["dev"]["accuracy"] == pytest.approx(0.6) and a["dev"]["accuracy_std"] == pytest.approx(
        0.1
    )  # ddof=1
    assert a["test"]["accuracy"] == pytest.approx(0.3) and a["test"]["accuracy_std"] == pytest.approx(0.05)
    assert a["weights"] == 0.5 and a["best_epoch"] == 2  # the first seed's probe
    assert a["seeds"] == [1, 2, 3] and [p["dev"]["accuracy"] for p in a["per_seed"]] == [0.5, 0.6, 0.7]
    assert a["seed_weights"] == [0.5, 0.6, 0.7]
    assert a["control"]["dev"]["accuracy"] == pytest.approx(0.3)
    assert a["control"]["dev"]["accuracy_std"] == pytest.approx(np.std([0.2, 0.2, 0.5], ddof=1))
    # selectivity per seed (0.3, 0.4, 0.2), then mean ± std
    assert a["selectivity"]["dev"]["accuracy"] == pytest.approx(0.3)
    assert a["selectivity"]["dev"]["accuracy_std"] == pytest.approx(0.1)
    b = folded["b"]
    assert b["dev"] == {"accuracy": 0.9} and "per_seed" not in b  # one seed: no spread
    assert b["selectivity"]["dev"]["accuracy"] == pytest.approx(0.5)
    with pytest.raises(LexpInputError, match="repeats a seed"):
        Variants((1, 1))
    with pytest.raises(LexpInputError, match="reserved"):
        variants.expand({"a~b": cols})


# ------------------------------------------------------------------------- seeds in one pass
def _blobs(n, n_classes=4, n_features=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(n_classes, n_features)) * 3
    y = rng.integers(0, n_classes, n)
    return (centres[y] + 1.5 * rng.normal(size=(n, n_features))).astype(np.float32), y.astype(np.int64)


def _store(path: Path, split) -> Path:
    x, y = split
    with StoreWriter(
        path, n_rows=len(y), n_layers=3, hidden=4, dtype="float32", manifest={"label_vocab": list("abcd")}
    ) as writer:
        writer.write_rows(0, x)
        return writer.finish(y)


def test_seed_heads_equal_probes_trained_alone_with_that_init_seed(tmp_path: Path) -> None:
    """probe.seeds=[3, 4]: seed 4's heads are the probes of a run with init_seed=4 (same batch
    order: probe.seed); the reported score is the mean of the two with its sample std."""
    paths = [
        _store(tmp_path / s, _blobs(n, seed=i))
        for i, (s, n) in enumerate([("tr", 400), ("dev", 200), ("te", 200)])
    ]
    subsets = {"layer_0": np.arange(4), "oracle": np.arange(12)}
    cfg = {"epochs": 2, "lr": 1e-2, "seed": 0}

    def dm() -> ActivationDataModule:
        return ActivationDataModule(*paths, batch_size=32, seed=5)

    both = train_probes(dm(), subsets, probe_cfg={**cfg, "seeds": [3, 4]}, trainer_kwargs=QUIET)
    alone = {
        s: train_probes(dm(), subsets, probe_cfg={**cfg, "init_seed": s}, trainer_kwargs=QUIET)
        for s in (3, 4)
    }
    for name in subsets:
        result = both[name]
        assert result["heads_in_pass"] == 4
        for i, seed in enumerate((3, 4)):
            np.testing.assert_allclose(result["seed_weights"][i], alone[seed][name]["weights"], atol=1e-6)
            assert result["per_seed"][i]["dev"] == pytest.approx(alone[seed][name]["dev"])
        np.testing.assert_allclose(result["weights"], alone[3][name]["weights"], atol=1e-6)
        accs = [alone[s][name]["dev"]["accuracy"] for s in (3, 4)]
        assert result["dev"]["accuracy"] == pytest.approx(np.mean(accs))
        assert result["dev"]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert both["layer_0"]["dev"]["accuracy_std"] > 0  # two inits, two probes
    with pytest.raises(LexpInputError, match="non-empty list of integers"):
        train_probes(dm(), subsets, probe_cfg={**cfg, "seeds": [1.5]}, trainer_kwargs=QUIET)


# ---------------------------------------------------------------------- decisions per seed
def test_minimal_sets_run_in_lock_step_and_equal_separate_searches() -> None:
    """Three searches (own ordering and target each) hand every round's candidates to one call;
    each result is what minimal_set gives alone."""
    rng = np.random.default_rng(0)
    orderings = {k: rng.permutation(40) for k in range(3)}
    targets = {0: 0.3, 1: 0.75, 2: 2.0}  # search 2 never reaches its target: the best is reported

    def score(key: int, n: int) -> float:
        return n / 40 - 0.01 * key

    calls = []

    def evaluate(candidates):
        calls.append({k: sorted(v) for k, v in candidates.items()})
        return {k: {name: score(k, len(cols)) for name, cols in v.items()} for k, v in candidates.items()}

    grid = lambda n: neuron_grid(n, step=5)  # noqa: E731
    together = minimal_sets(orderings, grid, evaluate, targets, batch=2)
    for key in orderings:
        alone = minimal_set(
            orderings[key],
            grid(40),
            lambda subsets, key=key: {name: score(key, len(cols)) for name, cols in subsets.items()},
            targets[key],
            batch=2,
        )
        got = together[key]
        assert (got.n, got.reached, got.evaluated) == (alone.n, alone.reached, alone.evaluated)
        assert got.columns.tolist() == alone.columns.tolist()
    assert together[0].n == 15 and together[1].n == 35 and not together[2].reached
    assert calls[0] == {0: ["top10", "top5"], 1: ["top10", "top5"], 2: ["top10", "top5"]}
    assert set(calls[2]) == {1, 2}  # search 0 is done after round 2
    assert len(calls) == 4  # 8 candidates, 2 a round: search 2 needs all four rounds


def test_ccfs_many_is_ccfs_per_seed_with_one_call_per_step() -> None:
    tasks = {0: ccfs_task(), 1: ccfs_task(test_labels_shuffled=True)}
    hidden, calls = 6, []

    def train(subsets):
        calls.append(sorted(subsets))
        return {k: tasks[k].train(v) for k, v in subsets.items()}

    probes = {
        k: t.train({f"0..{i}": np.arange((i + 1) * hidden) for i in range(4)}) for k, t in tasks.items()
    }
    oracles = {k: t.train({"oracle": np.arange(4 * hidden)})["oracle"] for k, t in tasks.items()}
    clustered = []

    def cluster(columns, ct):
        clustered.append(len(columns))
        return correlation_cluster(tasks[0].X[tasks[0].tr])(columns, ct)

    results = ccfs_many(
        oracles=oracles,
        incrementals={k: [probes[k][f"0..{i}"] for i in range(4)] for k in tasks},
        hidden=hidden,
        cluster=cluster,
        train=train,
        grid=lambda n: neuron_grid(n, step=1),
        batch=4,
    )
    for key, task in tasks.items():
        alone = run_ccfs(task)
        got = results[key]
        for field in ("ls_layer", "cc_n_neurons", "ccfs_n_neurons", "ccfs_dev", "ccfs_test", "fs_evaluated"):
            assert getattr(got, field) == getattr(alone, field), field
    assert clustered == [12]  # both seeds keep layers 0..1: one clustering
    assert all(c == [0, 1] for c in calls)  # every step of both seeds in one call


# ------------------------------------------------------------------------------ end to end
def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    return save_model(*tiny_bert(tmp, layers=2, seed=0), tmp / "model")


def test_runs_report_mean_std_and_decisions_per_seed(tiny: Path, tmp_path: Path, data_root: Path) -> None:
    """probe.seeds=[1,2] on real EWT with a tiny BERT: Table 7 rows carry ± std, the minimal set
    and LS report n and the LS layers per seed, and lexp.tables prints them (mean ± std, agreement)."""
    from lexp.tables import format_markdown, load_tables

    common = [
        f"data_root={data_root}",
        f"cache_dir={tmp_path / 'cache'}",
        "model.name=tiny",
        f"model.name_or_path={tiny}",
        "device=cpu",
        "limit.train=60",
        "limit.dev=20",
        "limit.test=20",
        "probe.epochs=2",
        "progress=false",
        "logger=none",
        "probe.seeds=[1,2]",
    ]
    layers = run(_cfg([*common, "analysis=layers"]), tmp_path / "layers")
    row = layers["layers"]["table"][1]
    assert row["dev"] == pytest.approx(
        np.mean([p["dev"]["accuracy"] for p in layers["layers"]["heads"]["layer_1"]["per_seed"]])
    )
    assert row["dev_std"] >= 0 and "incremental_dev_std" in row and len(row["redundant_per_seed"]) == 2
    assert layers["oracle"]["dev"]["accuracy_std"] >= 0 and layers["layers"]["seeds"] == [1, 2]

    neurons = run(_cfg([*common, "analysis=neurons", "analysis.grid.step=40"]), tmp_path / "neurons")[
        "neurons"
    ]
    per_seed = neurons["n_neurons_per_seed"]
    assert len(per_seed) == 2 and neurons["n_neurons"] == pytest.approx(np.mean(per_seed))
    assert [p["seed"] for p in neurons["per_seed"]] == [1, 2]
    assert neurons["reduced_dev"] == pytest.approx(np.mean([p["reduced_dev"] for p in neurons["per_seed"]]))

    pipeline = run(
        _cfg(
            [
                *common,
                "analysis=pipeline",
                "analysis.grid.step=20",
                "analysis.timing.enabled=false",
                "analysis.save_extractor=false",
            ]
        ),
        tmp_path / "pipeline",
    )["pipeline"]
    assert len(pipeline["ls_n_layers_per_seed"]) == 2 and pipeline["extractor_seed"] == 1
    assert pipeline["ls_n_layers"] == pytest.approx(np.mean(pipeline["ls_n_layers_per_seed"]))

    text = format_markdown(load_tables([tmp_path], warn=lambda m: None))
    assert " ± " in text and "#neurons same across seeds" in text and "LS layers same across seeds" in text
