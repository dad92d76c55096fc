"""Control tasks (Hewitt & Liang 2019) and selectivity: the control labels, the control heads that
train in the same pass as the real ones, and what analysis=layers / neurons report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lexp import kernels
from lexp.datamodules import ActivationDataModule
from lexp.errors import LexpInputError
from lexp.experiment import config_dir, run
from lexp.probes import ElasticNetProbe, FusedHeads, train_probes
from lexp.store import StoreWriter
from lexp.tasks import load_task
from lexp.tasks.base import Sentence, TaskData, control_label_ids, type_uniform
from tiny_models import save_model, tiny_bert

QUIET = {"enable_progress_bar": False}


def _blobs(n, n_classes=4, n_features=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(n_classes, n_features)) * 3
    y = rng.integers(0, n_classes, n)
    return (centres[y] + 0.3 * rng.normal(size=(n, n_features))).astype(np.float32), y.astype(np.int64)


# ------------------------------------------------------------------------------ control labels
def test_control_labels_follow_the_train_distribution_and_depend_only_on_seed_and_type() -> None:
    counts = np.array([50, 0, 30, 20])  # class 1 never occurs in train: never a control label
    words = [f"w{i}" for i in range(20000)]
    ids = control_label_ids(words, counts, seed=7)
    share = np.bincount(ids, minlength=4) / ids.size
    np.testing.assert_allclose(share, counts / counts.sum(), atol=0.012)  # 20,000 draws: ±3.5 sd
    assert share[1] == 0
    # one label per type, wherever it occurs (another split, unseen types too): nothing is stored
    again = control_label_ids(["w5", "w3", "w5", "w19999"], counts, seed=7)
    assert again.tolist() == [ids[5], ids[3], ids[5], ids[19999]]
    # the inverse CDF of the draw: u in [0.5, 0.8) is class 2, [0.8, 1) class 3
    for word in words[:200]:
        u = type_uniform(word, 7)
        assert 0 <= u < 1
        expected = 0 if u < 0.5 else 2 if u < 0.8 else 3
        assert control_label_ids([word], counts, 7)[0] == expected
    other = control_label_ids(words[:1000], counts, seed=8)
    assert 0.3 < np.mean(other != ids[:1000]) < 0.8  # another seed: another control task
    with pytest.raises(ValueError, match="positive sum"):
        control_label_ids(["a"], np.zeros(3), 0)


def _sentences(rows: list[str], labels: list[str]) -> Sentence:
    return Sentence(tuple(rows), tuple(labels), "x:1")


def test_task_control_labels_are_per_type_across_splits() -> None:
    task = TaskData(
        name="toy",
        kind="labelling",
        splits={
            "train": [
                _sentences(["the", "dog", "runs"], ["D", "N", "V"]),
                _sentences(["the", "cat"], ["D", "N"]),
            ],
            "dev": [_sentences(["a", "dog", "the", "unseen"], ["D", "N", "D", "X"])],
        },
        labels=["D", "N", "V"],
        files=[],
    )
    train, dev = task.control_labels("train", 3), task.control_labels("dev", 3)
    assert train.shape == (5,) and dev.shape == (4,)
    assert train[0] == train[3] == dev[2]  # "the", in both splits
    assert train[1] == dev[1]  # "dog"
    counts = np.array([2, 2, 1])  # train tokens per class: D D N N V
    assert dev.tolist() == control_label_ids(["a", "dog", "the", "unseen"], counts, 3).tolist()
    sentence_task = TaskData("s", "classification", {"train": []}, ["a", "b"], [])
    with pytest.raises(ValueError, match="word-level"):
        sentence_task.control_labels("train", 0)


def test_task_config_control_key(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("the D\ndog N\n\nthe D\ncat N\n")
    cfg = {
        "name": "toy",
        "reader": "columns",
        "data_dir": str(tmp_path),
        "files": {"train": "train.txt", "dev": "train.txt", "test": None},
        "word_column": 0,
        "label_column": 1,
        "control": True,
    }
    assert load_task(cfg).splits["train"][0].words == ("the", "dog")
    with pytest.raises(LexpInputError, match="true or false"):
        load_task({**cfg, "control": "yes"})
    glue = {"name": "sst2", "reader": "glue", "files": {}, "control": True}
    with pytest.raises(LexpInputError, match="word-level tasks"):
        load_task(glue)


# ---------------------------------------------------------------------- heads on two targets
@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch", "kernels"])
def test_fused_heads_on_two_label_vectors_have_each_heads_own_gradient(use_kernels: bool) -> None:
    """Heads learning the control labels (target 1) beside the real ones (target 0), in one
    FusedHeads sharing blocks: each head's loss and gradient are those of a probe alone on its labels."""
    if use_kernels and not kernels.available():
        pytest.skip("no C compiler: the compiled kernels are not available")
    x, y = _blobs(40, seed=5)
    control = np.random.default_rng(1).integers(0, 4, 40)
    x, y2 = torch.as_tensor(x), torch.as_tensor(np.stack([y, control], axis=1))
    subsets = [np.arange(4), np.arange(12), np.array([5, 1, 9])]
    heads = subsets + subsets  # the same columns: shared blocks, other labels
    fused = FusedHeads(heads, 4, seed=[3, 3, 3, 4, 4, 4], targets=[0, 0, 0, 1, 1, 1], kernels=use_kernels)
    assert fused.n_targets == 2 and fused.use_kernels() == use_kernels
    losses = fused.loss_and_grad(x, y2, l1=1e-3, l2=1e-3, regression=False)
    for h, cols in enumerate(heads):
        target, seed = (0, 3) if h < 3 else (1, 4)
        single = ElasticNetProbe(12, 4, columns=cols, l1=1e-3, l2=1e-3, seed=seed)
        loss = single.loss(x, y2[:, target])
        loss.backward()
        weight_grad, bias_grad = fused.head(h, grad=True)
        assert losses[h].item() == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(weight_grad, single.linear.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias_grad, single.linear.bias.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(LexpInputError, match="label vectors"):
        fused.loss_and_grad(x, y2[:, 0], l1=1e-3, l2=1e-3, regression=False)


def _store(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    with StoreWriter(
        path, n_rows=len(y), n_layers=3, hidden=4, dtype="float32", manifest={"label_vocab": list("abcd")}
    ) as writer:
        writer.write_rows(0, x)
        return writer.finish(y)


def test_control_heads_equal_probes_trained_on_the_control_labels(tmp_path: Path) -> None:
    """The one pass (real + control heads, labels (B, 2)) gives each control head exactly the probe
    trained alone on a store whose labels are the control labels; selectivity = score − control."""
    splits = {"train": _blobs(400, seed=1), "dev": _blobs(100, seed=2), "test": _blobs(100, seed=3)}
    rng = np.random.default_rng(0)
    control = {s: rng.integers(0, 4, len(y)) for s, (_, y) in splits.items()}
    real = {s: _store(tmp_path / s, x, y) for s, (x, y) in splits.items()}
    relabelled = {s: _store(tmp_path / f"c_{s}", x, control[s]) for s, (x, _) in splits.items()}
    subsets = {"layer_0": np.arange(4), "layer_2": np.arange(8, 12), "oracle": np.arange(12)}
    cfg = {"epochs": 3, "lr": 1e-2, "seed": 0}
    dm = ActivationDataModule(
        real["train"], real["dev"], real["test"], batch_size=32, seed=5, extra_labels=control
    )
    assert dm.n_targets == 2
    both = train_probes(dm, subsets, probe_cfg=cfg, trainer_kwargs=QUIET, control=True)
    alone = train_probes(
        ActivationDataModule(
            relabelled["train"], relabelled["dev"], relabelled["test"], batch_size=32, seed=5
        ),
        subsets,
        probe_cfg=cfg,
        trainer_kwargs=QUIET,
    )
    plain = train_probes(
        ActivationDataModule(real["train"], real["dev"], real["test"], batch_size=32, seed=5),
        subsets,
        probe_cfg=cfg,
        trainer_kwargs=QUIET,
    )
    for name in subsets:
        result = both[name]
        np.testing.assert_allclose(result["weights"], plain[name]["weights"], atol=1e-6)  # the real head
        assert result["dev"] == pytest.approx(plain[name]["dev"])
        assert result["control"]["dev"] == pytest.approx(alone[name]["dev"])
        assert result["control"]["test"] == pytest.approx(alone[name]["test"])
        assert result["control"]["best_epoch"] == alone[name]["best_epoch"]
        for split in ("dev", "test"):
            assert result["selectivity"][split]["accuracy"] == pytest.approx(
                result[split]["accuracy"] - result["control"][split]["accuracy"]
            )
        assert result["heads_in_pass"] == 6
    # separable blobs, random labels: the probe learns the task, not the control task
    assert both["oracle"]["selectivity"]["dev"]["accuracy"] > 0.5
    with pytest.raises(LexpInputError, match="no control labels"):
        train_probes(
            ActivationDataModule(real["train"], real["dev"]),
            subsets,
            probe_cfg=cfg,
            trainer_kwargs=QUIET,
            control=True,
        )


def test_extra_labels_are_checked(tmp_path: Path) -> None:
    x, y = _blobs(50)
    train, dev = _store(tmp_path / "train", x, y), _store(tmp_path / "dev", x[:20], y[:20])
    ok = {"train": np.zeros(50, np.int64), "dev": np.zeros(20, np.int64)}
    with pytest.raises(LexpInputError, match="no 'dev' entry"):
        ActivationDataModule(train, dev, extra_labels={"train": ok["train"]})
    with pytest.raises(LexpInputError, match="the dev store has 20 rows"):
        ActivationDataModule(train, dev, extra_labels={**ok, "dev": np.zeros(21, np.int64)})
    with pytest.raises(LexpInputError, match=r"class ids in \[0, 4\)"):
        ActivationDataModule(train, dev, extra_labels={**ok, "train": np.full(50, 4)})
    dm = ActivationDataModule(train, dev, batch_size=8, shuffle=False, extra_labels=ok)
    xb, yb = next(iter(dm.train_dataloader()))
    assert yb.shape == (8, 2) and yb[:, 0].tolist() == y[:8].tolist() and yb[:, 1].tolist() == [0] * 8


# ------------------------------------------------------------------------------ end to end
def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    return save_model(*tiny_bert(tmp, layers=2, seed=0), tmp / "model")


def test_layers_and_neurons_report_control_accuracy_and_selectivity(
    tiny: Path, tmp_path: Path, data_root: Path
) -> None:
    """task.control=true on real EWT with a tiny BERT: Table 7 gains control/selectivity per layer
    and for the oracle, the minimal set its selected neurons' selectivity, and lexp.tables shows them."""
    from lexp.tables import load_tables

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
        "task.control=true",
    ]
    out = run(_cfg([*common, "analysis=layers"]), tmp_path / "layers")
    block = out["layers"]
    assert out["control_task"]["seed"] == 42
    for row in block["table"]:
        for key in ("control_dev", "control_test", "selectivity_dev", "selectivity_test"):
            assert 0 <= abs(row[key]) <= 1, key
        assert row["selectivity_dev"] == pytest.approx(row["dev"] - row["control_dev"])
    assert block["oracle_selectivity_dev"] == pytest.approx(block["oracle_dev"] - block["oracle_control_dev"])
    assert out["oracle"]["control"]["dev"]["accuracy"] == block["oracle_control_dev"]
    assert out["oracle"]["heads_in_pass"] == 2 * (3 + 3 - 1)  # (layers + prefixes + oracle) × 2 targets
    tables = {t.key: t for t in load_tables([tmp_path / "layers"], warn=lambda m: None)}
    assert "selectivity dev" in [c.name for c in tables["layers"].columns]

    out = run(_cfg([*common, "analysis=neurons", "analysis.grid.step=40"]), tmp_path / "neurons")
    neurons = out["neurons"]
    assert neurons["selectivity_dev"] == pytest.approx(neurons["reduced_dev"] - neurons["control_dev"])
    assert neurons["probe"]["control"]["dev"]["accuracy"] == neurons["control_dev"]
    saved = json.loads((tmp_path / "neurons" / "results.json").read_text())
    assert saved["neurons"]["selectivity_test"] == pytest.approx(neurons["selectivity_test"])


def test_figure_4_draws_the_control_scores_under_the_bars(tmp_path: Path, monkeypatch) -> None:
    """With task.control the per-layer figure shows the control scores as a line (selectivity is the
    gap to the bar); without it, no such line."""
    from lexp.report import figures

    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    scores, control = [0.80, 0.90, 0.85], [0.60, 0.50, 0.40]
    figures.layer_scores(scores, None, 0.9, 0.99, tmp_path / "a.png", "t", control=control)
    figures.layer_scores(scores, None, 0.9, 0.99, tmp_path / "b.png", "t")
    with_control, without = (
        [ln for ln in f.axes[0].lines if ln.get_label().startswith("control")] for f in drawn
    )
    assert len(with_control) == 1 and without == []
    np.testing.assert_allclose(with_control[0].get_ydata(), [60.0, 50.0, 40.0])
    assert drawn[0].axes[0].get_ylim()[0] <= 40.0  # the lowest control score is inside the axes
    assert (tmp_path / "a.png").stat().st_size > 1000
