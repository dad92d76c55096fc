"""ElasticNet probes: the loss, metrics with unseen labels, reproducibility, multi-head equivalence."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score

from lexp.errors import LexpInputError
from lexp.probes import (
    ConfusionCounts,
    ElasticNetProbe,
    FusedHeads,
    LeanAdam,
    MultiHeadProbe,
    classification_scores,
    elasticnet_penalty,
    predict,
    train_probes,
)

QUIET = {"enable_progress_bar": False}


class ArrayDataModule(pl.LightningDataModule):
    """In-memory (x, y) splits; the training order is a seeded permutation per epoch.

    ``dev_by_epoch`` (optional) swaps the dev labels per evaluation, to construct a dev curve
    whose best epoch is known.
    """

    def __init__(self, train, dev, test=None, *, n_classes, batch_size=32, seed=0, dev_by_epoch=None):
        super().__init__()
        self.train, self.dev, self.test = train, dev, test
        self.n_classes, self.batch_size, self.seed = n_classes, batch_size, seed
        self.n_features = train[0].shape[1]
        self.dev_by_epoch = dev_by_epoch

    @staticmethod
    def _ds(split):
        return TensorDataset(torch.as_tensor(split[0]), torch.as_tensor(split[1]))

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._ds(self.train), batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self):
        if self.dev_by_epoch is None:
            return DataLoader(self._ds(self.dev), batch_size=256)
        return _EpochDependent(self.dev[0], self.dev_by_epoch)

    def test_dataloader(self):
        return DataLoader(self._ds(self.dev if self.test is None else self.test), batch_size=256)


class _EpochDependent:
    """A dev 'loader' whose labels change with every pass (pass e uses labels[e])."""

    def __init__(self, x, labels):
        self.x, self.labels, self.passes = torch.as_tensor(x), labels, 0

    def __len__(self):
        return 1

    def __iter__(self):
        y = torch.as_tensor(self.labels[min(self.passes, len(self.labels) - 1)])
        self.passes += 1
        yield self.x, y


def _blobs(n, n_classes=4, n_features=12, spread=0.3, seed=0):
    """Linearly separable classes: well-separated Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(n_classes, n_features)) * 3
    y = rng.integers(0, n_classes, n)
    x = centres[y] + spread * rng.normal(size=(n, n_features))
    return x.astype(np.float32), y.astype(np.int64)


def _cfg(**overrides):
    return {"epochs": 5, "lr": 1e-2, "l1": 1e-5, "l2": 1e-5, "seed": 0, **overrides}


# ----------------------------------------------------------------------------------------- loss
def test_penalty_matches_hand_computed_values_and_is_unsquared():
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    # Σ|W| = 10, ‖W‖₂ = √30 (un-squared; the squared norm would give 30)
    assert elasticnet_penalty(w, 0.1, 0.0).item() == pytest.approx(1.0)
    assert elasticnet_penalty(w, 0.0, 0.01).item() == pytest.approx(0.01 * math.sqrt(30))
    assert elasticnet_penalty(w, 0.1, 0.01).item() == pytest.approx(1.0 + 0.01 * math.sqrt(30))
    stacked = torch.stack([w, 2 * w])  # one value per head
    assert elasticnet_penalty(stacked, 0.1, 0.01).tolist() == pytest.approx(
        [1.0 + 0.01 * math.sqrt(30), 2.0 + 0.02 * math.sqrt(30)]
    )


def test_penalty_gradient_equals_autograd_of_the_plain_formula():
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    w[0, 1, 2] = 0.0  # |w| has the subgradient 0 at 0, as in torch's abs
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: elasticnet_penalty(v, 0.3, 0.7), (w.detach().clone().requires_grad_(),)
    )
    elasticnet_penalty(w, 0.3, 0.7).sum().backward()
    plain = w.detach().clone().requires_grad_()
    (0.3 * plain.abs().sum(dim=(1, 2)) + 0.7 * plain.pow(2).sum(dim=(1, 2)).sqrt()).sum().backward()
    torch.testing.assert_close(w.grad, plain.grad)
    zero = torch.zeros(2, 3, requires_grad=True)  # ‖W‖₂ = 0: subgradient 0, never NaN
    elasticnet_penalty(zero, 0.1, 0.1).backward()
    assert torch.equal(zero.grad, torch.zeros(2, 3))


def test_training_loss_is_mean_cross_entropy_plus_penalty_on_weights_only():
    probe = ElasticNetProbe(2, 2, l1=0.1, l2=0.01, seed=0)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))
        probe.linear.bias.copy_(torch.tensor([100.0, -50.0]))  # would dominate if it were penalised
    x = torch.tensor([[0.5, 1.0], [-1.0, 0.25], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    loss = probe.loss(x, y)
    ce = F.cross_entropy(x @ probe.linear.weight.T + probe.linear.bias, y)
    assert loss.item() == pytest.approx(ce.item() + 1.0 + 0.01 * math.sqrt(30), rel=1e-6)
    loss.backward()
    bias = probe.linear.bias.detach().clone().requires_grad_()
    F.cross_entropy(x @ probe.linear.weight.detach().T + bias, y).backward()
    assert torch.allclose(probe.linear.bias.grad, bias.grad)  # no penalty gradient on the bias


# -------------------------------------------------------------------------------------- metrics
def test_classification_scores_count_unseen_labels_as_errors():
    # 3 train classes; gold ids 3 and 5 are labels unseen in train (counted in the extra class 3).
    gold = torch.tensor([0, 0, 1, 1, 2, 3, 5, 3])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 2, 2])
    counts = ConfusionCounts(n_heads=2, n_classes=3)
    counts.update(torch.stack([pred, gold.clamp(max=2)]), gold)  # head 1 is right on every seen row
    cm = counts.compute()
    assert cm.shape == (2, 4, 4) and cm[0, 3].tolist() == [1, 0, 2, 0]
    scores = classification_scores(cm[0], 3)
    assert scores["accuracy"] == pytest.approx(4 / 8)
    # class 0: tp 1, fp 1 (an unseen row), fn 1 -> 2/4; class 1: tp 2, fp 1, fn 0 -> 4/5;
    # class 2: tp 1, fp 2 (unseen rows), fn 0 -> 2/4
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.5) / 3)
    assert classification_scores(cm[1], 3)["accuracy"] == pytest.approx(5 / 8)


def test_confusion_counts_and_macro_f1_equal_torchmetrics_without_unseen_labels():
    rng = np.random.default_rng(3)
    gold, pred = torch.as_tensor(rng.integers(0, 5, 400)), torch.as_tensor(rng.integers(0, 5, 400))
    pred[pred == 4] = 3  # class 4 is never predicted, only gold
    counts = ConfusionCounts(n_heads=1, n_classes=5)
    counts.update(pred[None], gold)
    cm = counts.compute()[0]
    assert torch.equal(cm[:5, :5], MulticlassConfusionMatrix(num_classes=5)(pred, gold))
    expected = MulticlassF1Score(num_classes=5, average="macro")(pred, gold).item()
    assert classification_scores(cm, 5)["macro_f1"] == pytest.approx(expected, abs=1e-6)


def test_unseen_dev_labels_count_as_errors_and_do_not_crash():
    train = _blobs(1200, seed=1)
    xd, yd = _blobs(400, seed=2)
    yd = yd.copy()
    yd[:40] = 4  # first unseen label
    yd[40:60] = 7  # another one
    dm = ArrayDataModule(train, (xd, yd), (xd, yd), n_classes=4)
    result = train_probes(dm, None, probe_cfg=_cfg(), trainer_kwargs=QUIET)["all"]
    preds = predict(result["weights"], result["bias"], xd)
    assert preds.max() < 4
    assert result["test"]["accuracy"] == pytest.approx(float(np.mean(preds == yd)))
    assert result["test"]["accuracy"] <= 340 / 400 + 1e-9  # 60 unseen rows are always wrong
    assert result["test"]["accuracy"] >= 0.98 * 340 / 400


# ------------------------------------------------------------------------------------- training
def test_separable_multiclass_task_is_learned_with_the_paper_settings():
    train, dev, test = _blobs(3000, seed=1), _blobs(300, seed=2), _blobs(300, seed=3)
    dm = ArrayDataModule(train, dev, test, n_classes=4, batch_size=128)
    result = train_probes(dm, None, probe_cfg={"seed": 0}, trainer_kwargs=QUIET)["all"]  # 10 epochs, lr 1e-3
    assert result["dev"]["accuracy"] >= 0.98
    assert result["test"]["accuracy"] >= 0.98
    assert result["test"]["macro_f1"] >= 0.98
    assert result["weights"].shape == (4, 12) and result["bias"].shape == (4,)
    assert result["columns"].tolist() == list(range(12))
    x, y = _blobs(300, seed=3)
    assert np.mean(predict(result["weights"], result["bias"], x) == y) == pytest.approx(
        result["test"]["accuracy"]
    )


def test_regression_reaches_high_pearson():
    rng = np.random.default_rng(0)
    w = rng.normal(size=8).astype(np.float32)

    def split(n, seed):
        x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
        return x, (x @ w + 0.1 * np.random.default_rng(seed + 1).normal(size=n)).astype(np.float32)

    dm = ArrayDataModule(split(2000, 1), split(300, 2), split(300, 3), n_classes=0)
    result = train_probes(dm, None, probe_cfg=_cfg(regression=True), trainer_kwargs=QUIET)["all"]
    assert set(result["test"]) == {"pearson", "spearman", "mse"}
    assert result["dev"]["pearson"] >= 0.98
    assert result["test"]["spearman"] >= 0.97
    assert result["weights"].shape == (1, 8)
    x, y = split(300, 3)
    assert np.corrcoef(predict(result["weights"], result["bias"], x), y)[0, 1] == pytest.approx(
        result["test"]["pearson"], abs=1e-5
    )


def test_training_is_reproducible_and_seeds_matter():
    def run(seed=0, init_seed=None):
        dm = ArrayDataModule(_blobs(600, seed=1), _blobs(100, seed=2), n_classes=4, seed=seed)
        cfg = _cfg(epochs=2, init_seed=init_seed)
        return train_probes(dm, None, probe_cfg=cfg, trainer_kwargs=QUIET)["all"]["weights"]

    first = run()
    assert np.array_equal(first, run())
    assert not np.allclose(first, run(init_seed=1), atol=1e-3)  # other initialisation
    assert not np.allclose(first, run(seed=1), atol=1e-3)  # other data order


def test_train_labels_outside_the_classes_raise():
    x, y = _blobs(64, seed=1)
    y[5] = 4
    dm = ArrayDataModule((x, y), (x, y), n_classes=4)
    with pytest.raises(LexpInputError, match="label id 4"):
        train_probes(dm, None, probe_cfg=_cfg(epochs=1), trainer_kwargs=QUIET)


# ------------------------------------------------------------------------------- model selection
def test_model_selection_on_dev_returns_the_best_epoch():
    train = _blobs(800, seed=1)
    xd, yd = _blobs(200, seed=2)
    wrong = (yd + 1) % 4
    # Dev labels are the true ones only after epoch 3: the best dev epoch is 3 by construction.
    dm = ArrayDataModule(train, (xd, yd), n_classes=4, dev_by_epoch=[wrong, wrong, yd, wrong, wrong])
    result = train_probes(dm, None, probe_cfg=_cfg(), trainer_kwargs=QUIET)["all"]
    assert result["best_epoch"] == 3
    assert int(np.argmax(result["dev_history"])) == 2 and len(result["dev_history"]) == 5
    assert result["dev"]["accuracy"] == pytest.approx(result["dev_history"][2])

    # The returned weights are those after epoch 3, not after epoch 5.
    dm3 = ArrayDataModule(train, (xd, yd), n_classes=4)
    three = train_probes(dm3, None, probe_cfg=_cfg(epochs=3, select_on_dev=False), trainer_kwargs=QUIET)[
        "all"
    ]
    assert np.array_equal(result["weights"], three["weights"])
    last = train_probes(
        ArrayDataModule(train, (xd, yd), n_classes=4, dev_by_epoch=[wrong, wrong, yd, wrong, wrong]),
        None,
        probe_cfg=_cfg(select_on_dev=False),
        trainer_kwargs=QUIET,
    )["all"]
    assert last["best_epoch"] == 5
    assert not np.allclose(last["weights"], three["weights"])


# ------------------------------------------------------------------------------------ multi-head
SUBSETS = {
    "layer_0": np.arange(0, 4),
    "layer_1": np.arange(4, 8),
    "layer_2": np.arange(8, 12),  # the three equal-width heads share one batched matmul
    "layers_0-1": np.arange(0, 8),  # overlaps layer_0 and layer_1
    "scattered": np.array([11, 2, 7, 5]),  # non-contiguous, unsorted, same width as the layers
    "odd": np.array([3, 9, 1]),
    "oracle": np.arange(12),
    "oracle_again": np.arange(12),  # identical subset: trained once, reported twice
}


def test_head_initialisation_equals_the_single_probe():
    multi = MultiHeadProbe(SUBSETS, 12, 4, seed=7)
    for name in ("layer_0", "scattered", "odd", "layers_0-1"):
        single = ElasticNetProbe(12, 4, columns=SUBSETS[name], seed=7)
        weight, bias = multi._read_head(name)
        assert torch.equal(weight, single.linear.weight) and torch.equal(bias, single.linear.bias)


def _assert_each_head_has_its_own_gradient(
    fused, subsets, x, y, *, l1, l2, seed, n_features, regression=False
):
    """One fused step's loss and gradients equal those of each head alone: the autograd reference
    ElasticNetProbe on the head's columns (up to float32 rounding: the block products sum in
    another order)."""
    losses = fused.loss_and_grad(x, y, l1=l1, l2=l2, regression=regression)
    for h, cols in enumerate(subsets):
        single = ElasticNetProbe(
            n_features, 0 if regression else 4, columns=cols, l1=l1, l2=l2, seed=seed, regression=regression
        )
        loss = single.loss(x, y)
        loss.backward()
        weight_grad, bias_grad = fused.head(h, grad=True)
        assert losses[h].item() == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(weight_grad, single.linear.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias_grad, single.linear.bias.grad, rtol=1e-5, atol=1e-6)


def test_multihead_gradients_are_those_of_each_head_alone():
    """The total loss is the SUM over heads: every head's gradient equals its single-probe gradient."""
    x, y = _blobs(32, seed=5)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    multi = MultiHeadProbe(SUBSETS, 12, 4, l1=1e-3, l2=1e-3, seed=3)
    fused = multi.fused
    # columns grouped by the set of heads that read them: {0}, {1, 3}, {2}, {4, 6}, {5, 7}, {8, 10}, {9}, {11}
    assert fused.n_blocks == 8
    subsets = [SUBSETS[name] for name in multi.head_names]
    _assert_each_head_has_its_own_gradient(fused, subsets, x, y, l1=1e-3, l2=1e-3, seed=3, n_features=12)


def test_fused_heads_fall_back_to_one_block_per_head_and_stay_exact():
    """Irregular overlaps: one block per head (max_blocks), the gradients are still each head's own."""
    x, y = _blobs(24, seed=9)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    subsets = [SUBSETS[n] for n in ("scattered", "odd", "layers_0-1")]
    fused = FusedHeads(subsets, 4, seed=5, max_blocks=2)
    assert fused.n_blocks == 3
    _assert_each_head_has_its_own_gradient(fused, subsets, x, y, l1=1e-2, l2=1e-2, seed=5, n_features=12)
    # Heads on the same columns (a control head, another seed; here also in another column order)
    # share one block in the fallback, and each keeps its own gradient.
    twins = [*subsets, SUBSETS["scattered"][::-1].copy(), SUBSETS["odd"]]
    fused = FusedHeads(twins, 4, seed=5, max_blocks=2)
    assert fused.n_blocks == 3
    _assert_each_head_has_its_own_gradient(fused, twins, x, y, l1=1e-2, l2=1e-2, seed=5, n_features=12)


def test_the_block_budget_counts_distinct_subsets_not_heads():
    """Control heads on the same columns must not loosen the budget into many narrow blocks: the
    plan with twins has as many blocks as without them."""
    rng = np.random.default_rng(3)
    orders = [rng.permutation(60) for _ in range(5)]  # five seeds' rankings: irregular overlaps
    subsets = [order[:n] for order in orders for n in (10, 20, 30, 40)]
    alone = FusedHeads(subsets, 4, seed=0)
    with_control = FusedHeads([*subsets, *subsets], 4, seed=0, targets=[0] * 20 + [1] * 20)
    assert with_control.n_blocks == alone.n_blocks


def test_fine_tuning_trainer_options_do_not_change_probes(caplog):
    """The trainer config is shared with fine-tuning; its accumulation/clipping never reach a probe."""
    train, dev = _blobs(320, seed=1), _blobs(80, seed=2)
    cfg = _cfg(epochs=2)
    plain = train_probes(ArrayDataModule(train, dev, n_classes=4), None, probe_cfg=cfg, trainer_kwargs=QUIET)
    with caplog.at_level(logging.INFO, logger="lexp.probes"):
        tuned = train_probes(
            ArrayDataModule(train, dev, n_classes=4),
            None,
            probe_cfg=cfg,
            trainer_kwargs={**QUIET, "accumulate_grad_batches": 4, "gradient_clip_val": 1.0},
        )
    assert np.array_equal(plain["all"]["weights"], tuned["all"]["weights"])
    assert "accumulate_grad_batches=4" in caplog.text


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true", "16-true", "64-true"])
def test_fine_tuning_precisions_leave_the_probes_in_float32(precision, caplog):
    """trainer.precision is shared with fine-tuning: a precision the hand-written probe gradients
    cannot take (GradScaler under 16-mixed, non-float32 weights under *-true) trains in 32-true."""
    train, dev = _blobs(320, seed=1), _blobs(80, seed=2)
    cfg = _cfg(epochs=2)
    plain = train_probes(
        ArrayDataModule(train, dev, n_classes=4), SUBSETS, probe_cfg=cfg, trainer_kwargs=QUIET
    )
    with caplog.at_level(logging.INFO, logger="lexp.probes"):
        other = train_probes(
            ArrayDataModule(train, dev, n_classes=4),
            SUBSETS,
            probe_cfg=cfg,
            trainer_kwargs={**QUIET, "precision": precision},
        )
    for name in plain:
        assert np.array_equal(plain[name]["weights"], other[name]["weights"]), name
    assert f"trainer.precision={precision} is for fine-tuning" in caplog.text


def test_lean_adam_equals_torch_adam():
    """LeanAdam is torch.optim.Adam (defaults) with less Python: same trajectory, same state layout."""
    torch.manual_seed(0)
    params = [torch.randn(50, 7), torch.randn(7)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt_ours, opt_theirs = LeanAdam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2)
    for step in range(25):
        grads = [torch.randn_like(p) * (step + 1) for p in params]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert set(opt_ours.state[p]) == set(opt_theirs.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(opt_ours.state[p]["step"]) == 25


def test_train_probes_single_probe_is_fused_and_equals_the_reference():
    train, dev = _blobs(320, seed=1), _blobs(80, seed=2)
    cfg = _cfg(epochs=2, l1=1e-3, l2=1e-3)
    fused = train_probes(ArrayDataModule(train, dev, n_classes=4), None, probe_cfg=cfg, trainer_kwargs=QUIET)
    ref = train_probes(
        ArrayDataModule(train, dev, n_classes=4), None, probe_cfg=cfg, trainer_kwargs=QUIET, reference=True
    )
    np.testing.assert_allclose(fused["all"]["weights"], ref["all"]["weights"], atol=1e-5, rtol=0)
    assert fused["all"]["dev"] == pytest.approx(ref["all"]["dev"])
    with pytest.raises(LexpInputError, match="reference"):
        train_probes(
            ArrayDataModule(train, dev, n_classes=4), {"a": np.arange(3)}, probe_cfg=cfg, reference=True
        )


def test_fused_regression_gradients_equal_autograd():
    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.normal(size=(20, 6)).astype(np.float32))
    y = torch.as_tensor(rng.normal(size=20).astype(np.float32))
    subsets = [np.arange(3), np.arange(6), np.array([5, 1])]
    fused = FusedHeads(subsets, 1, seed=2)
    _assert_each_head_has_its_own_gradient(
        fused, subsets, x, y, l1=1e-2, l2=1e-2, seed=2, n_features=6, regression=True
    )


def test_multihead_equals_separately_trained_probes():
    train, dev, test = _blobs(640, seed=1), _blobs(160, seed=2), _blobs(160, seed=3)
    cfg = _cfg(epochs=3, lr=5e-2, l1=1e-3, l2=1e-3, seed=11)
    multi = train_probes(
        ArrayDataModule(train, dev, test, n_classes=4, seed=4), SUBSETS, probe_cfg=cfg, trainer_kwargs=QUIET
    )
    assert list(multi) == list(SUBSETS)
    assert multi["oracle"]["heads_in_pass"] == len(SUBSETS) - 1
    for name, cols in SUBSETS.items():
        restricted = [(split[0][:, cols], split[1]) for split in (train, dev, test)]
        dm = ArrayDataModule(*restricted, n_classes=4, seed=4)
        alone = train_probes(dm, None, probe_cfg=cfg, trainer_kwargs=QUIET, reference=True)["all"]
        np.testing.assert_allclose(multi[name]["weights"], alone["weights"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(multi[name]["bias"], alone["bias"], atol=1e-5, rtol=0)
        assert multi[name]["columns"].tolist() == cols.tolist()
        assert multi[name]["best_epoch"] == alone["best_epoch"]
        assert multi[name]["dev"] == pytest.approx(alone["dev"])
        assert multi[name]["test"] == pytest.approx(alone["test"])
    assert multi["oracle_again"]["weights"] is not multi["oracle"]["weights"]


def test_multihead_regression_equals_separately_trained_probes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6) + 0.1 * rng.normal(size=400)).astype(np.float32)
    split = ((x[:320], y[:320]), (x[320:], y[320:]))
    subsets = {"a": np.arange(3), "b": np.arange(3, 6), "all": np.arange(6)}
    cfg = _cfg(epochs=2, regression=True)
    multi = train_probes(ArrayDataModule(*split, n_classes=0), subsets, probe_cfg=cfg, trainer_kwargs=QUIET)
    for name, cols in subsets.items():
        restricted = [(part[0][:, cols], part[1]) for part in split]
        alone = train_probes(
            ArrayDataModule(*restricted, n_classes=0),
            None,
            probe_cfg=cfg,
            trainer_kwargs=QUIET,
            reference=True,
        )
        np.testing.assert_allclose(multi[name]["weights"], alone["all"]["weights"], atol=1e-5)
        assert multi[name]["dev"] == pytest.approx(alone["all"]["dev"], abs=1e-5)


def test_works_with_the_activation_datamodule(tmp_path):
    """The real batches: a float16 store, seeded per-epoch order, dev/test with an unseen label."""
    from lexp.datamodules import ActivationDataModule
    from lexp.store import StoreWriter

    def store(name, split):
        x, y = split
        with StoreWriter(
            tmp_path / name,
            n_rows=len(y),
            n_layers=3,
            hidden=4,
            dtype="float16",
            manifest={"label_vocab": list("abcd")},
        ) as writer:
            writer.write_rows(0, x)
            return writer.finish(y)

    dev = _blobs(200, seed=2)
    dev[1][:10] = 4  # unseen in train
    paths = [store("train", _blobs(800, seed=1)), store("dev", dev), store("test", dev)]
    dm = ActivationDataModule(*paths, batch_size=32, seed=3)
    layers = {f"layer_{k}": np.arange(4 * k, 4 * k + 4) for k in range(3)}
    results = train_probes(dm, {**layers, "oracle": np.arange(12)}, probe_cfg=_cfg(), trainer_kwargs=QUIET)
    assert results["oracle"]["test"]["accuracy"] == pytest.approx(
        np.mean(predict(results["oracle"]["weights"], results["oracle"]["bias"], dev[0]) == dev[1]), abs=2e-3
    )  # the store holds float16 activations
    assert 0.9 <= results["oracle"]["test"]["accuracy"] <= 190 / 200

    # Reading 5 minibatches per training batch (800 rows = 4 reads of 160 + 0) changes nothing: the
    # probe splits each read back into its 32-row Adam steps, so the weights are bit-identical.
    for subsets in ({**layers, "oracle": np.arange(12)}, None):
        steps = {}
        for read_steps in (1, 5):
            dm = ActivationDataModule(*paths, batch_size=32, seed=3, read_steps=read_steps)
            assert len(dm.train_dataloader()) == -(-800 // (32 * read_steps))
            steps[read_steps] = train_probes(dm, subsets, probe_cfg=_cfg(epochs=2), trainer_kwargs=QUIET)
        for name, result in steps[1].items():
            assert np.array_equal(result["weights"], steps[5][name]["weights"]), name
            assert result["dev"] == steps[5][name]["dev"]


def test_elasticnet_probe_columns_equal_a_restricted_datamodule():
    train, dev = _blobs(320, seed=1), _blobs(80, seed=2)
    cols = np.array([10, 0, 5])
    cfg = _cfg(epochs=2)
    picked = train_probes(
        ArrayDataModule(train, dev, n_classes=4), {"p": cols}, probe_cfg=cfg, trainer_kwargs=QUIET
    )
    restricted = ArrayDataModule((train[0][:, cols], train[1]), (dev[0][:, cols], dev[1]), n_classes=4)
    alone = train_probes(restricted, None, probe_cfg=cfg, trainer_kwargs=QUIET, reference=True)["all"]
    np.testing.assert_allclose(picked["p"]["weights"], alone["weights"], atol=1e-6)


# -------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (np.array([0, 12]), "column 12 is outside"),
        (np.array([-1, 2]), "column -1 is outside"),
        (np.array([1, 1, 2]), "column 1 occurs more than once"),
        (np.zeros(12, dtype=bool), "boolean mask"),
        (np.array([], dtype=np.int64), "non-empty 1-D integer"),
        (np.array([0.0, 1.0]), "non-empty 1-D integer"),
    ],
)
def test_bad_subsets_raise(columns, message):
    with pytest.raises(LexpInputError, match=message):
        MultiHeadProbe({"bad": columns}, 12, 4)


def test_bad_config_raises():
    dm = ArrayDataModule(_blobs(64), _blobs(32), n_classes=4)
    with pytest.raises(LexpInputError, match="unknown key"):
        train_probes(dm, None, probe_cfg={"l_1": 0.1}, trainer_kwargs=QUIET)
    with pytest.raises(LexpInputError, match="max_epochs"):
        train_probes(dm, None, probe_cfg={}, trainer_kwargs={**QUIET, "max_epochs": 3})
    with pytest.raises(LexpInputError, match="at least 2"):
        ElasticNetProbe(4, 1)


def test_determinism_flag_is_restored():
    before = torch.are_deterministic_algorithms_enabled()
    dm = ArrayDataModule(_blobs(64), _blobs(32), n_classes=4)
    train_probes(dm, None, probe_cfg=_cfg(epochs=1), trainer_kwargs=QUIET)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_predict_selects_columns_and_validates_shapes():
    w = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    x = np.array([[5.0, 9.0, 1.0], [5.0, 0.0, 7.0]], dtype=np.float16)
    assert predict(w, np.zeros(2), x, columns=np.array([2, 1])).tolist() == [1, 0]
    with pytest.raises(LexpInputError, match="columns"):
        predict(w, np.zeros(2), x)


# ------------------------------------------------------------------- resident data, bad values
def _store(path, split, dtype="float16"):
    from lexp.store import StoreWriter

    x, y = split
    with StoreWriter(
        path, n_rows=len(y), n_layers=3, hidden=4, dtype=dtype, manifest={"label_vocab": list("abcd")}
    ) as writer:
        writer.write_rows(0, x)
        return writer.finish(y)


def _corrupt_rows(path, rows):
    """0xFF over whole rows of activations.npy, in place (NaN in float16), as disk damage would."""
    acts = np.load(path / "activations.npy", mmap_mode="r")
    row_bytes, offset = acts.shape[1] * acts.dtype.itemsize, acts.offset
    del acts
    with open(path / "activations.npy", "r+b") as f:
        for r in rows:
            f.seek(offset + r * row_bytes)
            f.write(b"\xff" * row_bytes)


@pytest.fixture
def store_paths(tmp_path):
    return [
        _store(tmp_path / "train", _blobs(640, seed=1)),
        _store(tmp_path / "dev", _blobs(160, seed=2)),
        _store(tmp_path / "test", _blobs(160, seed=3)),
    ]


@pytest.mark.parametrize("reference", [False, True])
def test_resident_run_equals_the_streaming_run(store_paths, reference, monkeypatch):
    """probe.resident=true (RAM here; the GPU's memory there): the same batches, hence the same
    weights and scores as streaming from the store — for the fused heads and the autograd reference."""
    from lexp.datamodules import ActivationDataModule, ResidentBatch

    epochs_seen = []  # the ResidentBatch of every training batch: one per epoch, 640 rows
    original = ResidentBatch.minibatches
    monkeypatch.setattr(
        ResidentBatch, "minibatches", lambda self: epochs_seen.append(len(self)) or original(self)
    )
    layers = {f"layer_{k}": np.arange(4 * k, 4 * k + 4) for k in range(3)}
    subsets = None if reference else {**layers, "oracle": np.arange(12)}
    runs = {}
    for resident in (False, True):
        dm = ActivationDataModule(*store_paths, batch_size=32, seed=3, read_steps=4, resident=resident)
        runs[resident] = train_probes(
            dm,
            subsets,
            probe_cfg=_cfg(epochs=2, resident=resident),
            trainer_kwargs=QUIET,
            reference=reference,
        )
        assert dm._resident == {}  # released at teardown
    assert epochs_seen == [640, 640]
    for name, result in runs[False].items():
        np.testing.assert_allclose(result["weights"], runs[True][name]["weights"], rtol=0, atol=1e-6)
        assert result["dev"] == pytest.approx(runs[True][name]["dev"])
        assert result["test"] == pytest.approx(runs[True][name]["test"])


def test_non_finite_train_activations_stop_training_with_the_store_rows(store_paths):
    """Case 2 of issue 12: a damaged activations.npy (0xFF bytes = NaN) stops training with an error
    naming the store, the rows and the epoch — streamed or resident — never a 'complete' run."""
    from lexp.datamodules import ActivationDataModule
    from lexp.store import open_store

    _corrupt_rows(store_paths[0], [100, 101])
    train = open_store(store_paths[0])  # same size: opening does not read the rows
    ordered = ActivationDataModule(train, *store_paths[1:], batch_size=32, shuffle=False, read_steps=4)
    with pytest.raises(LexpInputError, match="non-finite activations") as err:
        train_probes(ordered, {"oracle": np.arange(12)}, probe_cfg=_cfg(epochs=2), trainer_kwargs=QUIET)
    message = str(err.value)
    assert f"{store_paths[0]}: train store rows 100-101:" in message  # both in the first read of 128
    assert "2 row(s) of training batch 1 of epoch 1" in message and "delete the store directory" in message
    # shuffled: the first batch holding one of them is named, with the store row it holds
    shuffled = ActivationDataModule(train, *store_paths[1:], batch_size=32, seed=3, read_steps=4)
    with pytest.raises(LexpInputError, match=r"train store rows 10[01]: non-finite activations"):
        train_probes(shuffled, None, probe_cfg=_cfg(epochs=1), trainer_kwargs=QUIET)
    resident = ActivationDataModule(train, *store_paths[1:], batch_size=32, seed=3, resident=True)
    with pytest.raises(LexpInputError, match=r"2 row\(s\) of the train split .* store rows 100-101"):
        train_probes(resident, None, probe_cfg=_cfg(epochs=1), trainer_kwargs=QUIET)


def test_non_finite_dev_activations_are_not_scored(store_paths):
    from lexp.datamodules import ActivationDataModule

    _corrupt_rows(store_paths[1], [150])
    dm = ActivationDataModule(*store_paths, batch_size=32, seed=3, eval_batch_size=64)
    with pytest.raises(LexpInputError, match="outputs are not finite") as err:
        train_probes(dm, None, probe_cfg=_cfg(epochs=1), trainer_kwargs=QUIET)
    assert f"{store_paths[1]}: dev store rows 150" in str(err.value)


def test_a_diverging_probe_is_an_error_not_a_result():
    """Finite inputs, an absurd learning rate: the weights overflow; the run says so and how to fix it."""
    dm = ArrayDataModule(_blobs(256, seed=1), _blobs(64, seed=2), n_classes=4)
    with pytest.raises(LexpInputError, match=r"diverged\. Lower probe\.lr \(now 1e\+38\)"):
        train_probes(dm, {"a": np.arange(12)}, probe_cfg=_cfg(epochs=2, lr=1e38), trainer_kwargs=QUIET)


def test_resident_setting_is_checked_before_training():
    dm = ArrayDataModule(_blobs(64), _blobs(32), n_classes=4)
    with pytest.raises(LexpInputError, match="resident = 'maybe'"):
        train_probes(dm, None, probe_cfg=_cfg(resident="maybe"), trainer_kwargs=QUIET)
