"""The probes as LightningModules: :class:`ElasticNetProbe` (the reference) and
:class:`MultiHeadProbe` (many probes in one pass), and the behaviour they share.

The training step is device-neutral: a Lightning training batch is a group of minibatches — rows
read from the store (``(x, y)``, ``read_steps`` minibatches) or a :class:`lexp.datamodules.ResidentBatch`
of a split held on the device (a whole epoch) — and each minibatch is one Adam step, with no host
synchronisation between steps. Once per training batch one check reads a value on the host: the
accumulated loss and the weights are finite, else :class:`~lexp.errors.LexpInputError` names the
store rows (non-finite activations) or says the probe diverged.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, Metric, PearsonCorrCoef, SpearmanCorrCoef

from lexp.datamodules import ResidentBatch
from lexp.device import autocast_dtype
from lexp.errors import LexpInputError
from lexp.probes.fused import FusedHeads
from lexp.probes.heads import HeadSpec, as_spec
from lexp.probes.loss import (
    _as_float32,
    _check_columns,
    _check_head_name,
    _contiguous,
    _data_loss,
    elasticnet_penalty,
    init_head_,
)
from lexp.probes.metrics import ConfusionCounts, classification_scores
from lexp.probes.optim import ElasticNetAdam, LeanAdam, _adam

__all__ = ["ALL_COLUMNS", "ElasticNetProbe", "MultiHeadProbe"]

#: Name of the head when :func:`train_probes` trains a single probe on all columns.
ALL_COLUMNS = "all"

#: The fix for non-finite activations in a store (a damaged file: the writer refuses them).
_STORE_FIX = (
    "The store's activations.npy is damaged (lexp refuses non-finite values when writing a store): "
    "delete the store directory so that lexp rebuilds it, and rerun."
)


# ------------------------------------------------------------------------------ shared behaviour
class _ProbeModule(pl.LightningModule):
    """Metrics, per-head model selection on dev and the optimiser, shared by both probes.

    Subclasses define ``_train_step(x, y)`` (one optimiser step on one minibatch), ``_outputs(x) ->
    (H, K, B)`` (all heads, in ``head_names`` order) for evaluation, and ``_read_head`` /
    ``_write_head`` (a head's ``(K, C)`` weight and bias, copied out of / into the parameters).

    Optimisation is manual: a training batch may hold several minibatches of ``batch_size`` rows
    (the datamodule reads ``read_steps`` steps at once, see ``ActivationDataModule``; a split held on
    the device gives a whole epoch as one :class:`~lexp.datamodules.ResidentBatch`) and each is one
    Adam step, so Lightning's per-batch work is paid once per read, not once per step. The last
    step of a batch goes through Lightning's optimizer wrapper, the others straight to the
    optimizer (same update): ``trainer.global_step`` counts training batches, not Adam steps.

    Non-finite data is never trained on or scored silently. Training: once per training batch (one
    host synchronisation, never one per step) the accumulated loss and the weights must be finite.
    A NaN or Inf in a column any head reads makes that head's loss, or (through its gradient) its
    weights, non-finite within the same batch, so this one check covers the inputs too; only then
    are the batch's rows examined, to name them. Evaluation: each batch's outputs are summed on the
    device and checked once per pass. (A direct ``isfinite(x).all()`` per batch was measured at
    ~44 ms per 2,048 × 2,688 float32 batch on the development CPU — most of the batch's training
    time; the sum of the outputs costs far less and misses nothing a head reads.)
    """

    def __init__(
        self,
        heads: list[str],
        n_classes: int,
        *,
        regression: bool,
        lr: float,
        select_on_dev: bool,
        batch_size: int | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise LexpInputError(f"probe batch_size = {batch_size!r} must be a positive integer")
        #: rows per optimiser step; None: every training batch is one step
        self.batch_size = None if batch_size is None else int(batch_size)
        if not regression and n_classes < 2:
            raise LexpInputError(
                f"classification probe: the train split has {n_classes} class(es); a probe needs at least 2 — "
                "check the task's label column, or set probe.regression=true for a real-valued target"
            )
        self.n_classes = int(n_classes)
        self.n_outputs = 1 if regression else self.n_classes
        self.regression = bool(regression)
        self.lr = float(lr)
        self.select_on_dev = bool(select_on_dev)
        self.head_names = list(heads)
        self.metrics = nn.ModuleDict(self._new_metrics(len(self.head_names)))
        #: sum of this epoch's minibatch losses, on the device (read on the host once per batch)
        self._epoch_loss: Tensor | None = None
        self._epoch_steps = 0
        #: per evaluation batch, whether its outputs were finite (device flags, checked per pass)
        self._eval_finite: list[Tensor] = []
        self._dev_history: dict[str, list[dict[str, float]]] = {h: [] for h in self.head_names}
        self._best: dict[str, dict[str, Any]] = {}
        self.test_metrics: dict[str, dict[str, float]] = {}

    # ---- metrics (one metric object serves all heads)
    def _new_metrics(self, n_heads: int) -> dict[str, Metric]:
        if not self.regression:
            return {"confusion": ConfusionCounts(n_heads, self.n_classes)}
        with warnings.catch_warnings():  # "will save all targets": dev/test sets are small
            warnings.filterwarnings("ignore", message=".*save all targets.*")
            spearman = SpearmanCorrCoef(num_outputs=n_heads)
        return {
            "pearson": PearsonCorrCoef(num_outputs=n_heads),
            "spearman": spearman,
            "mse": MeanSquaredError(num_outputs=n_heads),
        }

    @property
    def primary_metric(self) -> str:
        """The dev score that selects the epoch: accuracy (the paper), Pearson for regression."""
        return "pearson" if self.regression else "accuracy"

    def _update_metrics(self, outputs: Tensor, y: Tensor) -> None:
        """``outputs`` (H, K, B) of every head on one batch."""
        y = self._labels_per_head(y)  # (B,), or (H, B) when heads learn different label vectors
        if not self.regression:
            self.metrics["confusion"].update(outputs.argmax(dim=1), y)
            return
        pred = outputs[:, 0, :].t().float()  # (B, H)
        target = y.float().t() if y.ndim == 2 else y.float().unsqueeze(1).expand_as(pred)
        if pred.shape[1] == 1:  # torchmetrics wants 1-D inputs for a single output
            pred, target = pred[:, 0], target[:, 0]
        for metric in self.metrics.values():
            metric.update(pred, target)

    def _compute_metrics(self) -> dict[str, dict[str, float]]:
        if self.regression:
            values = {k: m.compute().reshape(-1).tolist() for k, m in self.metrics.items()}
            scores = {h: {k: float(v[i]) for k, v in values.items()} for i, h in enumerate(self.head_names)}
        else:
            counts = self.metrics["confusion"].compute().cpu()  # one copy, not one sync per head
            scores = {
                h: classification_scores(counts[i], self.n_classes) for i, h in enumerate(self.head_names)
            }
        for metric in self.metrics.values():
            metric.reset()
        return scores

    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        outputs = self._outputs(_as_float32(x))
        # NaN/Inf in any column a head reads makes its outputs non-finite: a sum per batch, read
        # on the host once per pass (see _check_eval_inputs)
        self._eval_finite.append(torch.isfinite(outputs.sum()))
        self._update_metrics(outputs, y)

    def _check_eval_inputs(self, split: str) -> None:
        """Raise if an evaluation batch of this pass gave non-finite outputs (naming its rows)."""
        flags, self._eval_finite = self._eval_finite, []
        if not flags:
            return
        finite = torch.stack(flags)
        if bool(finite.all()):
            return
        batch_idx = int((~finite).nonzero()[0, 0])
        raise LexpInputError(
            f"{self._describe_rows(split, batch_idx)}: the probe's outputs are not finite (NaN or Inf) on "
            f"{split} batch {batch_idx + 1}, so these activations hold non-finite values (or values too "
            f"large for float32) and every score on them would be garbage. {_STORE_FIX}"
        )

    # ---- subclass interface
    def _labels_per_head(self, y: Tensor) -> Tensor:
        """The labels each head is scored against: ``y`` (B,) for all (the default), or (H, B)."""
        if y.ndim != 1:
            raise LexpInputError(
                f"{type(self).__name__}: labels of shape {tuple(y.shape)}; this probe learns one label "
                "vector (B,). Several label vectors (the control task) need a MultiHeadProbe"
            )
        return y

    def _outputs(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _train_step(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _read_head(self, name: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _write_head(self, name: str, weight: Tensor, bias: Tensor) -> None:
        raise NotImplementedError

    def _head_columns(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # ---- training: manual optimisation, one Adam step per minibatch of the batch
    def training_step(self, batch: tuple[Tensor, Tensor] | ResidentBatch, batch_idx: int) -> None:
        """One Adam step per minibatch of the batch, then one check of the whole batch (one host sync)."""
        labels_ok: Tensor | None = None
        if isinstance(batch, ResidentBatch):  # labels checked when the split was loaded
            minibatches, n_steps = batch.minibatches(), batch.n_steps
        else:
            x, y = batch
            if y.device.type == "cpu":
                self._check_train_labels(y)  # on the host: costs nothing, raises before any step
            elif not self.regression:
                # on a device: never an out-of-range index in a kernel (a CUDA device-side assert,
                # not an error); the check is read with the loss, at the batch's one sync
                labels_ok = ((y >= 0) & (y < self.n_classes)).all()
                y = y.clamp(0, self.n_classes - 1)
            minibatches, n_steps = self._minibatches(_as_float32(x), y)
        optimizer = self.optimizers()
        for i, (xb, yb) in enumerate(minibatches):
            self._log_train_loss(self._train_step(xb, yb))
            if i == n_steps - 1:
                optimizer.step()  # through Lightning: trainer.global_step counts training batches
            else:
                self._update(optimizer.optimizer)
        self._check_training(batch, batch_idx, labels_ok)

    def _minibatches(self, x: Tensor, y: Tensor) -> tuple[Iterator[tuple[Tensor, Tensor]], int]:
        """A read of several minibatches cut back into them (views), and how many there are."""
        step = self.batch_size or len(y)
        return ((x[s : s + step], y[s : s + step]) for s in range(0, len(y), step)), -(-len(y) // step)

    def _update(self, optimizer: torch.optim.Optimizer) -> None:
        """Adam on the gradients now in ``.grad``, straight to the optimizer (no Lightning hooks)."""
        optimizer.step()

    # ---- training: checks
    def _check_train_labels(self, y: Tensor) -> None:
        if not self.regression and (y.min() < 0 or y.max() >= self.n_classes):
            bad = int(y[(y < 0) | (y >= self.n_classes)][0])
            raise LexpInputError(
                f"training batch: label id {bad} is outside the {self.n_classes} train classes; the train "
                "split's labels must be ids 0..n_classes-1 (labels unseen in train may occur only in dev/test)"
            )

    def _weights_finite(self) -> Tensor:
        """A 0-dim bool tensor on the device: every weight and bias is finite."""
        raise NotImplementedError

    def _check_training(
        self, batch: tuple[Tensor, Tensor] | ResidentBatch, batch_idx: int, labels_ok: Tensor | None = None
    ) -> None:
        """The training batch's one host synchronisation: this epoch's summed loss and the weights
        after the batch's last step must be finite (and, on a device, the labels in range). If not,
        find out why and say so."""
        ok = torch.isfinite(self._epoch_loss) & self._weights_finite()
        if labels_ok is not None:
            ok = ok & labels_ok
        if bool(ok):
            return
        if labels_ok is not None and not bool(labels_ok):
            self._check_train_labels(batch[1])
        epoch = int(self.current_epoch)
        if not isinstance(batch, ResidentBatch):  # rows read from a store: are they the cause?
            x, y = batch
            bad_rows = ~torch.isfinite(_as_float32(x)).all(dim=1)
            if self.regression:
                bad_rows |= ~torch.isfinite(y.float())
            bad = bad_rows.nonzero().flatten().cpu().numpy()
            what = "activations or targets" if self.regression else "activations"
            if bad.size:
                raise LexpInputError(
                    f"{self._describe_rows('train', batch_idx, epoch, bad)}: non-finite {what} (NaN or Inf) "
                    f"in {bad.size} row(s) of training batch {batch_idx + 1} of epoch {epoch + 1}; a probe "
                    f"trained on them would be garbage. {_STORE_FIX}"
                )
        raise LexpInputError(
            f"{self._describe_rows('train', None, epoch)}: the training loss or the weights became "
            f"non-finite (NaN or Inf) in training batch {batch_idx + 1} of epoch {epoch + 1}, although the "
            f"batch's activations are finite: the probe diverged. Lower probe.lr (now {self.lr:g}) or the "
            "scale of the activations, and rerun."
        )

    def _describe_rows(
        self, split: str, batch_idx: int | None, epoch: int = 0, positions: np.ndarray | None = None
    ) -> str:
        """Where a batch's rows come from: the store path and rows when the datamodule can say it
        (``ActivationDataModule.describe_rows``), else the datamodule's type."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        describe = getattr(datamodule, "describe_rows", None)
        if callable(describe):
            return describe(split, batch_idx, epoch=epoch, positions=positions)
        where = type(datamodule).__name__ if datamodule is not None else "the dataloader"
        return f"{split} data of {where}"

    def _log_train_loss(self, loss: Tensor) -> None:
        # Accumulated on the device, logged once per epoch: no per-step self.log / .item().
        loss = loss.detach()
        self._epoch_loss = loss if self._epoch_loss is None else self._epoch_loss + loss
        self._epoch_steps += 1

    def on_train_epoch_end(self) -> None:
        if self._epoch_steps:
            self.log("train/loss", self._epoch_loss / self._epoch_steps, prog_bar=True)
        self._epoch_loss = None
        self._epoch_steps = 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _adam(self.parameters(), self.lr)

    # ---- dev: evaluate every epoch, keep the best state of every head in memory
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._compute_metrics()
            self._eval_finite = []
            return
        self._check_eval_inputs("dev")
        scores = self._compute_metrics()
        epoch = int(self.current_epoch) + 1  # 1-based: epochs of training behind these weights
        for name in self.head_names:
            self._dev_history[name].append(scores[name])
            score = scores[name][self.primary_metric]
            score = score if np.isfinite(score) else -np.inf  # e.g. Pearson of constant predictions
            best = self._best.get(name)
            # Strictly better: the earliest epoch wins ties. Without selection: always the latest.
            if best is None or not self.select_on_dev or score > best["score"]:
                weight, bias = self._read_head(name)  # copies, not the live parameters
                self._best[name] = {
                    "score": score,
                    "epoch": epoch,
                    "dev": scores[name],
                    "weight": weight,
                    "bias": bias,
                }
        self.log_dict(
            {f"dev/{h}/{k}": v for h in self.head_names for k, v in scores[h].items()},
            prog_bar=False,
        )

    def on_fit_end(self) -> None:
        """Put the selected epoch's weights back into every head."""
        if not self._best:
            if self.select_on_dev:
                raise LexpInputError(
                    "probe.select_on_dev=true, but no dev batches were evaluated; give the datamodule a dev "
                    "split (val_dataloader) or set probe.select_on_dev=false"
                )
            return
        for name, best in self._best.items():
            self._write_head(name, best["weight"], best["bias"])

    # ---- test: the selected weights, reported only
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._check_eval_inputs("test")
        self.test_metrics = self._compute_metrics()
        self.log_dict({f"test/{h}/{k}": v for h, s in self.test_metrics.items() for k, v in s.items()})

    # ---- results
    def head_results(self) -> dict[str, dict[str, Any]]:
        """Per head: dev/test metrics, selected epoch, dev history and the weights as numpy."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.head_names:
            weight, bias = self._read_head(name)
            best = self._best.get(name)
            out[name] = {
                "dev": dict(best["dev"]) if best else {},
                "test": dict(self.test_metrics.get(name, {})),
                "best_epoch": int(best["epoch"]) if best else int(self.current_epoch),
                "dev_history": [s[self.primary_metric] for s in self._dev_history[name]],
                "weights": weight.detach().cpu().numpy().copy(),
                "bias": bias.detach().cpu().numpy().copy(),
                "columns": self._head_columns()[name].copy(),
            }
        return out


# ------------------------------------------------------------------------------- the reference
class ElasticNetProbe(_ProbeModule):
    """The paper's probe: logistic regression ``nn.Linear(n_features, n_classes)`` with ElasticNet.

    ``columns`` (optional) restricts the probe to those columns of each batch, so one datamodule
    serves probes on any neuron subset. ``regression=True`` gives one output trained with MSE.
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        l1: float = 1e-5,
        l2: float = 1e-5,
        lr: float = 1e-3,
        seed: int = 42,
        columns: np.ndarray | None = None,
        regression: bool = False,
        select_on_dev: bool = True,
        name: str = ALL_COLUMNS,
        batch_size: int | None = None,
    ):
        super().__init__(
            [name],
            n_classes,
            regression=regression,
            lr=lr,
            select_on_dev=select_on_dev,
            batch_size=batch_size,
        )
        self.save_hyperparameters(ignore=["columns"])
        self.l1, self.l2 = float(l1), float(l2)
        cols = np.arange(n_features) if columns is None else _check_columns(name, columns, n_features)
        self.register_buffer("columns", torch.from_numpy(cols), persistent=True)
        self._slice = _contiguous(cols)
        self.linear = nn.Linear(cols.size, self.n_outputs)
        init_head_(self.linear.weight, self.linear.bias, seed)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (B, K) (logits; one value per row for regression)."""
        x = x[:, self._slice] if self._slice is not None else x.index_select(1, self.columns)
        return self.linear(x)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The training loss on one minibatch, with autograd: the reference the fused heads of
        :class:`MultiHeadProbe` are tested against."""
        return _data_loss(self(_as_float32(x)), y, self.regression) + elasticnet_penalty(
            self.linear.weight, self.l1, self.l2
        )

    def _train_step(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizers().zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        self.manual_backward(loss)
        return loss.detach()

    def _outputs(self, x: Tensor) -> Tensor:
        return self(x).t().unsqueeze(0)

    def _weights_finite(self) -> Tensor:
        return torch.isfinite(self.linear.weight.detach().sum() + self.linear.bias.detach().sum())

    def _read_head(self, name: str) -> tuple[Tensor, Tensor]:
        return self.linear.weight.detach().clone(), self.linear.bias.detach().clone()

    @torch.no_grad()
    def _write_head(self, name: str, weight: Tensor, bias: Tensor) -> None:
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)

    def _head_columns(self) -> dict[str, np.ndarray]:
        return {self.head_names[0]: self.columns.cpu().numpy()}


class MultiHeadProbe(_ProbeModule):
    """One ElasticNet probe per named column subset, all trained in a single pass over the data.

    The heads live in a :class:`FusedHeads`: blocks of shared columns, one matrix product per block,
    gradients written by hand. Heads with identical columns are trained once (they would be
    identical: same seed, same data) and reported under every name. Loss = Σ_heads (data loss +
    penalty) — a sum, so each head's gradients are its own, and Adam is elementwise, so head ``h``
    equals ``ElasticNetProbe(columns=subsets[h], seed=seed)`` trained on the same batches.

    A subset may be a :class:`~lexp.probes.heads.HeadSpec`: its own init ``seed`` (``probe.seeds``)
    and ``target``, the label vector it learns (``n_targets`` of them in the batches' ``y`` (B, T):
    0 the task's labels, 1 the control task); such a head equals the single probe with that seed
    trained on that label vector (tested). Heads alias only when columns, seed and target agree.

    The arithmetic is that of training the heads one after another; what one pass saves is reading
    the data once per epoch, one product per block instead of per head, one Adam kernel and no
    autograd or Lightning work per head.
    """

    def __init__(
        self,
        subsets: Mapping[str, np.ndarray | HeadSpec],
        n_features: int,
        n_classes: int,
        *,
        l1: float = 1e-5,
        l2: float = 1e-5,
        lr: float = 1e-3,
        seed: int = 42,
        regression: bool = False,
        select_on_dev: bool = True,
        batch_size: int | None = None,
        n_targets: int = 1,
    ):
        if not subsets:
            raise LexpInputError(
                "MultiHeadProbe: no subsets given; pass {name: column indices}, e.g. {'oracle': ...}"
            )
        specs = {_check_head_name(n): as_spec(v) for n, v in subsets.items()}
        checked = {n: _check_columns(n, spec.columns, n_features) for n, spec in specs.items()}
        #: per head, its init seed and the label vector it learns (HeadSpec; defaults: seed, 0)
        self_seeds = {n: int(seed) if spec.seed is None else int(spec.seed) for n, spec in specs.items()}
        targets = {n: int(spec.target) for n, spec in specs.items()}
        bad = {n: t for n, t in targets.items() if t >= n_targets}
        if bad:
            raise LexpInputError(
                f"MultiHeadProbe: heads {sorted(bad)} learn label vector(s) {sorted(set(bad.values()))}, but the "
                f"data has {n_targets} (0 = the task's labels); give the datamodule the extra label vectors"
            )
        # Identical heads (columns, seed, target) train identically: keep the first name, alias the others.
        canonical: dict[tuple[bytes, int, int], str] = {}
        aliases = {
            name: canonical.setdefault((cols.tobytes(), self_seeds[name], targets[name]), name)
            for name, cols in checked.items()
        }
        heads = [name for name in checked if aliases[name] == name]
        super().__init__(
            heads,
            n_classes,
            regression=regression,
            lr=lr,
            select_on_dev=select_on_dev,
            batch_size=batch_size,
        )
        self.save_hyperparameters(ignore=["subsets"])
        self.aliases = aliases
        self.hparams["heads"] = list(checked)
        self.l1, self.l2 = float(l1), float(l2)
        self.subsets = checked
        self.head_seeds, self.head_targets = self_seeds, targets
        self.fused = FusedHeads(
            [checked[n] for n in heads],
            self.n_outputs,
            [self_seeds[n] for n in heads],
            targets=[targets[n] for n in heads],
        )
        self._index = {name: h for h, name in enumerate(heads)}

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``(H, K, B)`` of all heads (``head_names`` order)."""
        device = self.fused.weight.device
        dtype = autocast_dtype(device)  # bfloat16 under bf16-mixed, on the weights' device
        with torch.autocast(device.type, enabled=False):  # the precision is explicit in FusedHeads
            return self.fused(x, dtype)

    def _train_step(self, x: Tensor, y: Tensor) -> Tensor:
        device = self.fused.weight.device
        dtype = autocast_dtype(device)
        with torch.autocast(device.type, enabled=False):
            data = self.fused.loss_and_grad(
                x, y, l1=self.l1, l2=self.l2, regression=self.regression, dtype=dtype, penalty=False
            )
        # the penalty's gradient is added by ElasticNetAdam; its value, of the weights before this step:
        abs_sum, norm = self._optimizer.penalty()
        return (data + self.l1 * abs_sum + self.l2 * norm).sum()

    def _update(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.update() if isinstance(optimizer, LeanAdam) else optimizer.step()

    def _weights_finite(self) -> Tensor:
        # The penalty terms of the current weights: computed by the optimizer's last update (the
        # kernel) or cached for the next step's penalty (torch path), so this costs no extra pass.
        abs_sum, norm = self._optimizer.penalty()
        return torch.isfinite(abs_sum.sum() + norm.sum() + self.fused.bias.detach().sum())

    def _outputs(self, x: Tensor) -> Tensor:
        return self(x)  # (H, K, B)

    def _labels_per_head(self, y: Tensor) -> Tensor:
        return self.fused.labels_per_head(y)

    def _read_head(self, name: str) -> tuple[Tensor, Tensor]:
        return self.fused.head(self._index[name])

    def _write_head(self, name: str, weight: Tensor, bias: Tensor) -> None:
        self.fused.set_head(self._index[name], weight, bias)

    def _head_columns(self) -> dict[str, np.ndarray]:
        return self.subsets

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._optimizer = ElasticNetAdam(self.fused, self.lr, l1=self.l1, l2=self.l2)
        return self._optimizer

    def head_results(self) -> dict[str, dict[str, Any]]:
        """Per requested subset name (aliases included), in the order the subsets were given."""
        trained = super().head_results()
        out = {}
        for name in self.subsets:
            result = trained[self.aliases[name]]
            out[name] = result if self.aliases[name] == name else copy.deepcopy(result)
        return out
