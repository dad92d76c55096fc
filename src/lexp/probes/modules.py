"""ElasticNet probes (Section 3.2 of the paper) as LightningModules, and one pass that trains many.

The probe is a logistic regression, one ``nn.Linear`` from neurons to classes, trained with

    loss = mean cross-entropy + l1 · Σ|W| + l2 · ‖W‖₂

where ‖W‖₂ is the *un-squared* Frobenius norm of the weight matrix (as in the published code,
NeuroX ``l2_penalty``); the bias is never penalised. Adam, lr 1e-3, 10 epochs, batch 128,
l1 = l2 = 1e-5. STS-B is a regression: one output, MSE instead of cross-entropy, same penalties.

Two modules share one implementation of the loss, the metrics and model selection on dev:

* :class:`ElasticNetProbe` — the reference: one ``nn.Linear`` on all (or given) columns.
* :class:`MultiHeadProbe` — many probes on named column subsets (per layer, layers 0..k, the
  oracle, top-n neurons ...) trained in **one pass over the activations**. The heads share no
  parameters and the total loss is the *sum* of the per-head losses, so every head receives exactly
  the gradients it would receive alone; Adam is elementwise, so one Adam over all heads equals one
  Adam per head. Each head is initialised from ``seed`` alone, exactly like an
  :class:`ElasticNetProbe` of the same width, hence head ``h`` equals
  ``ElasticNetProbe(columns=subsets[h], seed=seed)`` trained on the same batches.

:func:`train_probes` is the shell: it runs ``Trainer.fit`` (dev evaluated after every epoch, the best
epoch kept in memory per head), ``Trainer.test``, and returns plain numbers and numpy arrays.

Classification labels of dev/test rows may be ids ``>= n_classes`` (labels unseen in train, see
``TaskData.encode_labels``). A probe cannot predict them, so they count as errors: accuracy is
``mean(pred == y)`` over *all* rows, and macro-F1 averages over the train classes with such rows
counted as false positives of whatever class was predicted.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torchmetrics import MeanSquaredError, Metric, PearsonCorrCoef, SpearmanCorrCoef

from lexp import kernels as compiled
from lexp.errors import LexpInputError

__all__ = [
    "ALL_COLUMNS",
    "ConfusionCounts",
    "ElasticNetProbe",
    "FusedHeads",
    "ElasticNetAdam",
    "LeanAdam",
    "MultiHeadProbe",
    "PROBE_DEFAULTS",
    "classification_scores",
    "elasticnet_penalty",
    "init_head_",
    "predict",
    "train_probes",
]

#: The paper's settings (Section 3.2); ``conf/probe/elasticnet.yaml`` holds the same values.
PROBE_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 128,
    "l1": 1e-5,
    "l2": 1e-5,
    "seed": 42,
    "init_seed": None,
    "select_on_dev": True,
    "regression": None,
    "read_steps": 16,
}
_CONFIG_KEYS = {*PROBE_DEFAULTS, "name"}

#: Name of the head when :func:`train_probes` trains a single probe on all columns.
ALL_COLUMNS = "all"


# ------------------------------------------------------------------------------------ the maths
def elasticnet_penalty(weight: Tensor, l1: float, l2: float) -> Tensor:
    """``l1·Σ|W| + l2·‖W‖₂`` over the last two dims (one value per head for stacked heads).

    The L2 term is the un-squared Frobenius norm, as in the published code. Pass the weight
    matrix only: the bias is not penalised.
    """
    return _ElasticNetPenalty.apply(weight, float(l1), float(l2))


class _ElasticNetPenalty(torch.autograd.Function):
    """The penalty with a hand-fused backward: the gradient autograd would give for
    ``l1·|W|.sum() + l2·W.pow(2).sum().sqrt()`` — ``l1·sign(W) + l2·W/‖W‖₂`` (sign(0) = 0) —
    in three passes over W instead of about eight. It runs on every step of every head."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, l1: float, l2: float) -> Tensor:
        dims = (-2, -1)
        norm2 = torch.linalg.vector_norm(weight, 2, dim=dims)
        ctx.save_for_backward(weight, norm2)
        ctx.l1, ctx.l2 = l1, l2
        # abs().sum(): torch's ord-1 vector_norm kernel is several times slower on CPU
        return l1 * weight.abs().sum(dim=dims) + l2 * norm2

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, norm2 = ctx.saved_tensors
        g = grad[..., None, None]
        out = torch.sign(weight).mul_(ctx.l1 * g)
        # ‖W‖₂ = 0 only if W = 0, where W/‖W‖₂ has the subgradient 0 (the clamp keeps it 0, not NaN)
        out.addcmul_(weight, ctx.l2 * g / norm2.clamp_min(torch.finfo(norm2.dtype).tiny)[..., None, None])
        return out, None, None


def _data_loss(outputs: Tensor, y: Tensor, regression: bool) -> Tensor:
    """Batch-mean cross-entropy (or MSE); one value per head.

    ``outputs`` has the classes in dim 1: ``(B, K)`` for one probe, ``(G, K, B)`` for G stacked
    heads (torch's "K-dimensional" cross-entropy layout, which needs no transposed copy).
    """
    outputs = outputs.float()  # bf16-mixed precision: the loss itself stays in float32
    if regression:
        pred = outputs.squeeze(1)
        return F.mse_loss(pred, y.to(pred.dtype).expand_as(pred), reduction="none").mean(dim=-1)
    target = y if outputs.ndim == 2 else y.expand(outputs.shape[0], y.shape[0])
    return F.cross_entropy(outputs, target, reduction="none").mean(dim=-1)


@torch.no_grad()
def init_head_(weight: Tensor, bias: Tensor, seed: int) -> None:
    """Initialise one head in place from ``seed`` alone (PyTorch's ``nn.Linear`` distribution).

    ``U(-1/√C, 1/√C)`` for weight (K, C) and bias; drawn from a private generator so the result
    depends on nothing but the seed and the shape — a head of a :class:`MultiHeadProbe` therefore
    starts exactly where an :class:`ElasticNetProbe` of the same width starts.
    """
    generator = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / float(np.sqrt(weight.shape[-1]))
    weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))
    bias.copy_(torch.empty(bias.shape).uniform_(-bound, bound, generator=generator))


def classification_scores(confusion: Tensor, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 from a ``(K+1) × (K+1)`` confusion matrix (rows = gold, cols = predicted).

    Row/column ``K`` collects every gold label unseen in train; the probe never predicts it, so
    those rows are never on the diagonal (errors for accuracy) and count as false positives of the
    predicted class. Macro-F1 averages over the train classes that occur in gold or predictions
    (the same convention as scikit-learn and torchmetrics).
    """
    cm = confusion.to(torch.float64)
    total = cm.sum()
    tp = cm.diagonal()[:n_classes]
    fp = cm[:, :n_classes].sum(dim=0) - tp
    fn = cm[:n_classes, :].sum(dim=1) - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return {
        "accuracy": float(cm.diagonal().sum() / total) if total > 0 else float("nan"),
        "macro_f1": float(f1.mean()) if present.any() else float("nan"),
    }


class ConfusionCounts(Metric):
    """Confusion counts of H heads at once: ``(H, K+1, K+1)``, rows = gold, columns = predicted.

    Class ``K`` collects gold labels unseen in train (ids ``>= K``). One ``torch.bincount`` per batch
    for all heads — torchmetrics' own confusion matrix falls back to a ``(B, K²)`` comparison when
    deterministic algorithms are on (as in every probe run), which cost more than training.
    """

    full_state_update = False

    def __init__(self, n_heads: int, n_classes: int):
        super().__init__()
        self.n_heads, self.size = int(n_heads), int(n_classes) + 1
        self.add_state(
            "counts", default=torch.zeros(self.n_heads * self.size**2, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds`` (H, B) predicted class ids; ``target`` (B,) gold ids (unseen labels allowed)."""
        gold = target.long().clamp(max=self.size - 1)
        heads = torch.arange(self.n_heads, device=preds.device).unsqueeze(1) * self.size**2
        index = heads + gold.unsqueeze(0) * self.size + preds.long()
        self.counts += torch.bincount(index.flatten(), minlength=self.counts.numel())

    def compute(self) -> Tensor:
        return self.counts.view(self.n_heads, self.size, self.size)


def _adam(params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam with torch defaults; the fused CPU kernel when this torch has it (same update rule)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # older torch: no fused Adam on CPU
        return torch.optim.Adam(params, lr=lr, foreach=True)


class LeanAdam(torch.optim.Optimizer):
    """``torch.optim.Adam`` with its defaults (betas 0.9/0.999, eps 1e-8, no weight decay), with
    less Python around each step: one call of torch's fused Adam kernel for all parameters.

    Why: a :class:`MultiHeadProbe` step is ~4 ms, and ``torch.optim.Adam.step`` spent ~0.23 ms of
    it in Python (grouping tensors by device and dtype, hooks) — 5% of the layer step. The state
    (``step``, ``exp_avg``, ``exp_avg_sq``) is laid out as ``torch.optim.Adam``'s; the update is the
    same kernel (tested equal to ``torch.optim.Adam``). Without ``torch._fused_adam_`` it falls
    back to torch's single-tensor update written out.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3):
        super().__init__(params, {"lr": float(lr), "betas": (0.9, 0.999), "eps": 1e-8})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update()
        return loss

    @torch.no_grad()
    def update(self) -> None:
        """One Adam step on the current gradients: :meth:`step` without a closure, and without
        the hooks torch wraps around every optimizer's ``step`` (called thousands of times an epoch)."""
        for group in self.param_groups:
            self._adam([p for p in group["params"] if p.grad is not None], group)

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    def _adam(self, params: list[Tensor], group: dict[str, Any]) -> None:
        if not params:
            return
        states = [self._state(p) for p in params]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        if hasattr(torch, "_fused_adam_"):
            torch._fused_adam_(
                params,
                [p.grad for p in params],
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [],
                steps,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
            for p in params:  # the fused kernel does not count as an in-place write
                increment_version(p)
            return
        for p, st in zip(params, states, strict=True):  # torch's single-tensor Adam
            t = float(st["step"])
            st["exp_avg"].lerp_(p.grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1**t))


class ElasticNetAdam(LeanAdam):
    """Adam on (data loss + ElasticNet penalty) of a :class:`FusedHeads`, the penalty's subgradient
    added inside the update — as Adam's ``weight_decay`` adds its L2 term.

    ``.grad`` of the weight holds the data gradient only (``FusedHeads.loss_and_grad(...,
    penalty=False)``); the update adds ``l1·sign(W) + l2·W/‖W_h‖₂`` per head and takes torch's Adam
    step. With :mod:`lexp.kernels` that is one pass over the weights, which also sums the new
    weights' ``|w|`` and ``w²`` per segment: the next step's penalty (:meth:`penalty`) costs no
    pass. Without the kernels, torch operations do the same. The bias is not penalised.

    Why: at 640K weights every pass over them is a measurable part of a probe step; the data
    gradient, the penalty, Adam and the next penalty's sums took eight.
    """

    def __init__(self, heads: FusedHeads, lr: float = 1e-3, *, l1: float, l2: float, chunk: int = 4096):
        super().__init__([heads.weight, heads.bias], lr)
        self.heads, self.l1, self.l2 = heads, float(l1), float(l2)
        start, length, head = (t.tolist() for t in heads.segments())
        self._chunks = compiled.chunks(
            list(zip(start, length, head, strict=True)), heads.weight.numel(), chunk
        )
        #: (weight version, Σ|W_h|, ‖W_h‖₂) of the weights the kernel last wrote
        self._terms: tuple[int, Tensor, Tensor] | None = None

    def penalty(self) -> tuple[Tensor, Tensor]:
        """Per head ``Σ|W_h|`` and ``‖W_h‖₂`` of the current weights (float32, ``(H,)``)."""
        w = self.heads.weight
        if self._terms is not None and self._terms[0] == w._version:
            return self._terms[1], self._terms[2]
        # changed by anything but the kernel (first step, a reload, set_head): count again
        abs_sum, norm = self.heads.penalty_terms()
        self._terms = (w._version, abs_sum, norm)
        return abs_sum, norm

    @torch.no_grad()
    def update(self) -> None:
        w, b = self.heads.weight, self.heads.bias
        if w.grad is None:
            super().update()
            return
        _, norm = self.penalty()
        if not self.heads.use_kernels():
            if self.l1 > 0:
                w.grad.add_(torch.sign(w.detach()), alpha=self.l1)
            self.heads.add_scaled_(w.grad, w.detach(), self.heads.segment_scale(norm, self.l2))
            super().update()
            return
        group = self.param_groups[0]
        if b.grad is not None:  # the bias is not penalised: plain Adam
            self._adam([b], group)
        state = self._state(w)
        state["step"] += 1
        t = float(state["step"])
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        low = self.heads.low_weight()
        terms = compiled.adam_elasticnet(
            w.detach(),
            w.grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            self._chunks,
            norm.float(),
            l1=self.l1,
            l2=self.l2,
            step_size=lr / (1 - beta1**t),
            beta1=beta1,
            beta2=beta2,
            bc2_sqrt=math.sqrt(1 - beta2**t),
            eps=eps,
            w_low=low,
        )
        increment_version(w)  # written through a pointer: tell autograd's version counter
        self._terms = (w._version, *terms)
        if low is not None:
            self.heads.low_weight_written(w._version)


# --------------------------------------------------------------------------------- input checks
def _check_columns(name: str, columns: Any, n_features: int) -> np.ndarray:
    cols = np.asarray(columns)
    fix = f"pass a 1-D array of distinct integer column indices in [0, {n_features})"
    if cols.dtype == bool:
        raise LexpInputError(f"probe subset {name!r}: got a boolean mask; {fix} (e.g. np.flatnonzero(mask))")
    if cols.ndim != 1 or cols.size == 0 or not np.issubdtype(cols.dtype, np.integer):
        raise LexpInputError(
            f"probe subset {name!r}: expected a non-empty 1-D integer array, got dtype {cols.dtype} "
            f"and shape {cols.shape}; {fix}"
        )
    if cols.min() < 0 or cols.max() >= n_features:
        bad = int(cols[(cols < 0) | (cols >= n_features)][0])
        raise LexpInputError(
            f"probe subset {name!r}: column {bad} is outside the batch's {n_features} columns; {fix}"
        )
    if np.unique(cols).size != cols.size:
        dup = int(cols[np.flatnonzero(np.bincount(cols - cols.min()) > 1)[0] + cols.min()])
        raise LexpInputError(f"probe subset {name!r}: column {dup} occurs more than once; {fix}")
    return cols.astype(np.int64)


def _check_head_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise LexpInputError(
            f"probe subset name {name!r}: use a non-empty string such as 'layer_3' or 'oracle'"
        )
    return name


def _contiguous(columns: np.ndarray) -> slice | None:
    """The slice equal to ``columns`` when they are one increasing run (a view, no gather copy)."""
    start = int(columns[0])
    if np.array_equal(columns, np.arange(start, start + columns.size)):
        return slice(start, start + columns.size)
    return None


# ------------------------------------------------------------------------------ shared behaviour
class _ProbeModule(pl.LightningModule):
    """Metrics, per-head model selection on dev and the optimiser, shared by both probes.

    Subclasses define ``_train_step(x, y)`` (one optimiser step on one minibatch), ``_outputs(x) ->
    (H, K, B)`` (all heads, in ``head_names`` order) for evaluation, and ``_read_head`` /
    ``_write_head`` (a head's ``(K, C)`` weight and bias, copied out of / into the parameters).

    Optimisation is manual: a training batch may hold several minibatches of ``batch_size`` rows
    (the datamodule reads ``read_steps`` steps at once, see ``ActivationDataModule``) and each is one
    Adam step, so Lightning's per-batch work is paid once per read, not once per step. The last
    step of a batch goes through Lightning's optimizer wrapper, the others straight to the
    optimizer (same update): ``trainer.global_step`` counts training batches, not Adam steps.
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
        self._epoch_loss = torch.zeros(())
        self._epoch_steps = 0
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
        if not self.regression:
            self.metrics["confusion"].update(outputs.argmax(dim=1), y)
            return
        pred = outputs[:, 0, :].t().float()  # (B, H)
        target = y.float().unsqueeze(1).expand_as(pred)
        if pred.shape[1] == 1:  # torchmetrics wants 1-D inputs for a single output
            pred, target = pred[:, 0], target[:, 0]
        for metric in self.metrics.values():
            metric.update(pred, target)

    def _compute_metrics(self) -> dict[str, dict[str, float]]:
        if self.regression:
            values = {k: m.compute().reshape(-1).tolist() for k, m in self.metrics.items()}
            scores = {h: {k: float(v[i]) for k, v in values.items()} for i, h in enumerate(self.head_names)}
        else:
            counts = self.metrics["confusion"].compute()
            scores = {
                h: classification_scores(counts[i], self.n_classes) for i, h in enumerate(self.head_names)
            }
        for metric in self.metrics.values():
            metric.reset()
        return scores

    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        self._update_metrics(self._outputs(_as_float32(x)), y)

    # ---- subclass interface
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
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self._check_train_labels(y)
        x = _as_float32(x)
        step = self.batch_size or len(y)
        optimizer = self.optimizers()
        last = (len(y) - 1) // step * step
        for start in range(0, len(y), step):
            self._log_train_loss(self._train_step(x[start : start + step], y[start : start + step]))
            if start == last:
                optimizer.step()  # through Lightning: trainer.global_step counts training batches
            else:
                self._update(optimizer.optimizer)

    def _update(self, optimizer: torch.optim.Optimizer) -> None:
        """Adam on the gradients now in ``.grad``, straight to the optimizer (no Lightning hooks)."""
        optimizer.step()

    # ---- training
    def _check_train_labels(self, y: Tensor) -> None:
        if not self.regression and (y.min() < 0 or y.max() >= self.n_classes):
            bad = int(y[(y < 0) | (y >= self.n_classes)][0])
            raise LexpInputError(
                f"training batch: label id {bad} is outside the {self.n_classes} train classes; the train "
                "split's labels must be ids 0..n_classes-1 (labels unseen in train may occur only in dev/test)"
            )

    def _log_train_loss(self, loss: Tensor) -> None:
        # Accumulated, logged once per epoch: no per-step self.log / .item().
        self._epoch_loss = self._epoch_loss + loss.detach()
        self._epoch_steps += 1

    def on_train_epoch_end(self) -> None:
        if self._epoch_steps:
            self.log("train/loss", self._epoch_loss / self._epoch_steps, prog_bar=True)
        self._epoch_loss = torch.zeros(())
        self._epoch_steps = 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _adam(self.parameters(), self.lr)

    # ---- dev: evaluate every epoch, keep the best state of every head in memory
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._compute_metrics()
            return
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


def _as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


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

    def _read_head(self, name: str) -> tuple[Tensor, Tensor]:
        return self.linear.weight.detach().clone(), self.linear.bias.detach().clone()

    @torch.no_grad()
    def _write_head(self, name: str, weight: Tensor, bias: Tensor) -> None:
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)

    def _head_columns(self) -> dict[str, np.ndarray]:
        return {self.head_names[0]: self.columns.cpu().numpy()}


# ------------------------------------------------------------------------------ many in one pass
def _blocks(subsets: list[np.ndarray], max_blocks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split the heads' columns into blocks ``(columns, heads)``: each column of a block is used by
    exactly the heads ``heads``.

    For the layer step (per-layer, layers 0..k, oracle) the blocks are the L layers; for nested
    top-n candidates they are the differences of consecutive candidates. Every head is then a sum of
    block products, with no column gathered twice and no zero padding: the arithmetic is exactly
    that of training each head alone, in L wide matrix products instead of H narrow ones. When the
    subsets overlap so irregularly that this would give more than ``max_blocks`` blocks, each head
    is its own block instead (same arithmetic, one product per head).
    """
    union = np.unique(np.concatenate(subsets))
    member = np.zeros((union.size, len(subsets)), dtype=bool)
    for h, cols in enumerate(subsets):
        member[np.searchsorted(union, cols), h] = True
    patterns, first, inverse = np.unique(member, axis=0, return_index=True, return_inverse=True)
    if len(patterns) > max_blocks:
        return [(cols, np.array([h])) for h, cols in enumerate(subsets)]
    inverse = inverse.reshape(-1)
    return [(union[inverse == p], np.flatnonzero(patterns[p])) for p in np.argsort(first, kind="stable")]


class FusedHeads(nn.Module):
    """H linear heads on overlapping column subsets, trained with hand-written gradients.

    The pure numerical core of :class:`MultiHeadProbe` (no Lightning). The heads' columns are split
    into blocks of shared columns (see :func:`_blocks`); block ``b`` holds a ``(m_b·K, C_b)`` matrix
    stacking the slices of the ``m_b`` heads that read it. A training step is, per block, one matrix
    product forward and one backward (``addmm_`` adds it to the penalty gradient); everything else
    is a handful of whole-tensor operations: all blocks live in one flat parameter, ordered by width
    so that the per-head "segments" (one head's ``K·C_b`` weights in one block) of equal length form
    one ``(n_segments, K·C)`` matrix for the penalty. No autograd: at these sizes its bookkeeping,
    and a kernel per head, cost more than the arithmetic.

    :meth:`head` / :meth:`set_head` convert between the blocks and each head's ``(K, C_h)`` weight in
    the head's own column order; head ``h`` starts where :func:`init_head_` with ``seed`` starts it.
    """

    def __init__(
        self,
        subsets: list[np.ndarray],
        n_outputs: int,
        seed: int,
        max_blocks: int | None = None,
        *,
        kernels: bool | None = None,
    ):
        super().__init__()
        #: compiled kernels (lexp.kernels) for the element-wise work: None = when available
        self._kernels = kernels
        self.n_heads, self.n_outputs = len(subsets), int(n_outputs)
        self.widths = [int(c.size) for c in subsets]
        k = self.n_outputs
        blocks = _blocks(subsets, max_blocks if max_blocks is not None else max(2 * len(subsets), 16))
        blocks.sort(key=lambda block: block[0].size)  # stable: equal widths stay in column order
        #: per block: column slice (or index), head ids, per head the positions in its own columns,
        #: (rows, cols) and its start in the flat weight and in the stacked products
        self._cols: list[slice | Tensor] = []
        self._heads: list[Tensor] = []
        self._positions: list[list[Tensor]] = []
        self._shapes: list[tuple[int, int]] = []
        self._offsets: list[int] = []
        self._product_rows: list[slice] = []
        self._slots: list[list[tuple[int, int]]] = [[] for _ in subsets]  # head -> [(block, slot)]
        segment_heads: list[int] = []
        segment_starts: list[int] = []
        #: runs of segments of one length: (first segment, number of segments, length)
        self._groups: list[tuple[int, int, int]] = []
        offset = row = 0
        orders = [np.argsort(c, kind="stable") for c in subsets]  # to find columns in a head's order
        for b, (cols, heads) in enumerate(blocks):
            contiguous = _contiguous(cols)
            self._cols.append(
                contiguous if contiguous is not None else torch.from_numpy(cols.astype(np.int64))
            )
            self._heads.append(torch.from_numpy(heads.astype(np.int64)))
            self._shapes.append((heads.size * k, cols.size))
            self._offsets.append(offset)
            self._product_rows.append(slice(row, row + heads.size * k))
            offset += heads.size * k * cols.size
            row += heads.size * k
            if self._groups and self._groups[-1][2] == k * cols.size:
                first, count, length = self._groups[-1]
                self._groups[-1] = (first, count + heads.size, length)
            else:
                self._groups.append((len(segment_heads), heads.size, k * cols.size))
            positions = []
            for slot, h in enumerate(heads):
                # position of each block column in head h's own column order
                where = orders[h][np.searchsorted(subsets[h], cols, sorter=orders[h])]
                positions.append(torch.from_numpy(where.astype(np.int64)))
                self._slots[h].append((b, slot))
                segment_heads.append(int(h))
                segment_starts.append(self._offsets[b] + slot * k * cols.size)
            self._positions.append(positions)
        self.weight = nn.Parameter(torch.empty(offset))
        self.bias = nn.Parameter(torch.empty(self.n_heads, k))
        self._segment_heads = torch.tensor(segment_heads, dtype=torch.int64)
        self._seg_start = torch.tensor(segment_starts, dtype=torch.int64)
        self._seg_len = torch.tensor(
            [length for _, count, length in self._groups for _ in range(count)], dtype=torch.int64
        )
        #: per head, the first stacked product row of each of its K-row slots (for lexp.kernels)
        self._slot_table = compiled.head_slots(
            [[self._product_rows[b].start + slot * k for b, slot in slots] for slots in self._slots], row, k
        )
        #: output row (of the H·K outputs) of every row of the stacked block products
        self._out_index = torch.cat(
            [(heads[:, None] * k + torch.arange(k)).reshape(-1) for heads in self._heads]
        )
        self._view_cache: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}
        self._base_cache: dict[int, Tensor] = {}
        self._low_buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self._low_version: dict[torch.dtype, int] = {}  # weight version each low copy equals
        for h, cols in enumerate(subsets):
            weight, bias = torch.empty(k, cols.size), torch.empty(k)
            init_head_(weight, bias, seed)
            self.set_head(h, weight, bias)

    @property
    def n_blocks(self) -> int:
        return len(self._shapes)

    def _block(self, flat: Tensor, b: int) -> Tensor:
        start = self._offsets[b]
        rows, cols = self._shapes[b]
        return flat[start : start + rows * cols].view(rows, cols)

    def _views(self, flat: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The ``(m_b·K, C_b)`` matrix of every block and the ``(n_segments, length)`` matrix of every
        group, as views of ``flat`` — cached per storage (Adam updates in place, so a step reuses
        them; a step would otherwise make ~20 views)."""
        key = (flat.data_ptr(), flat.numel())
        cached = self._view_cache.get(key)
        if cached is None:
            matrices = [self._block(flat, b) for b in range(self.n_blocks)]
            start, groups = 0, []
            for _, count, length in self._groups:
                groups.append(flat[start : start + count * length].view(count, length))
                start += count * length
            cached = self._view_cache[key] = (matrices, groups)
            while len(self._view_cache) > 6:  # weight and grad (+ bfloat16 copies), old storages
                self._view_cache.pop(next(iter(self._view_cache)))
        return cached

    # ---- conversion between blocks and heads
    def _rows(self, slot: int) -> slice:
        return slice(slot * self.n_outputs, (slot + 1) * self.n_outputs)

    @torch.no_grad()
    def head(self, h: int, *, grad: bool = False) -> tuple[Tensor, Tensor]:
        """Head ``h``'s weight ``(K, C_h)`` (its own column order) and bias, as new tensors; with
        ``grad=True`` their gradients instead."""
        flat = self.weight.grad if grad else self.weight
        weight = torch.empty(self.n_outputs, self.widths[h])
        for b, slot in self._slots[h]:
            weight[:, self._positions[b][slot]] = self._block(flat, b)[self._rows(slot)]
        bias = self.bias.grad[h] if grad else self.bias[h]
        return weight, bias.detach().clone()

    @torch.no_grad()
    def set_head(self, h: int, weight: Tensor, bias: Tensor) -> None:
        for b, slot in self._slots[h]:
            self._block(self.weight, b)[self._rows(slot)] = weight[:, self._positions[b][slot]]
        self.bias[h] = bias

    # ---- the maths
    def _inputs(self, x: Tensor, dtype: torch.dtype | None = None) -> list[Tensor]:
        """Each block's columns of ``x`` (cast to ``dtype`` first, once, when given): a view for a
        contiguous range, else a gathered copy (made once per step, used by the forward and the
        backward product)."""
        if dtype is not None:
            x = x.to(dtype)
        return [x[:, cols] if isinstance(cols, slice) else x.index_select(1, cols) for cols in self._cols]

    def _low(self, name: str, dtype: torch.dtype) -> Tensor:
        """A reused flat buffer of the weight's size in ``dtype`` (its views stay cached)."""
        buf = self._low_buffers.get((name, dtype))
        if buf is None or buf.numel() != self.weight.numel():
            buf = self._low_buffers[(name, dtype)] = torch.empty(self.weight.shape, dtype=dtype)
            self._low_version.pop(dtype, None)
        return buf

    def low_weight(self) -> Tensor | None:
        """The bfloat16 copy of the weight that bfloat16 products read, once there is one:
        :class:`ElasticNetAdam` refreshes it in its update pass instead of a cast per step."""
        return self._low_buffers.get(("weight", torch.bfloat16))

    def low_weight_written(self, version: int) -> None:
        """The bfloat16 copy equals the weight at ``version`` (of the weight's version counter)."""
        self._low_version[torch.bfloat16] = version

    def _low_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype``, cast again only when it changed since the last cast/refresh."""
        low, version = self._low("weight", dtype), self.weight._version
        if self._low_version.get(dtype) != version:
            low.copy_(self.weight.detach())
            self._low_version[dtype] = version
        return low

    def _products(self, xs: list[Tensor], dtype: torch.dtype | None) -> Tensor:
        """Every block's ``W_b @ x_bᵀ`` from the block inputs ``xs`` (see :meth:`_inputs`, in
        ``dtype``), stacked into one ``(Σ m_b·K, B)`` float32 buffer. With ``dtype`` the products
        are rounded to ``dtype`` (mixed precision)."""
        n = xs[0].shape[0]
        flat = self.weight.detach()
        if dtype is not None:
            flat = self._low_weight(dtype)
        out = torch.empty(self._out_index.numel(), n, dtype=flat.dtype)
        for b, (wb, xb) in enumerate(zip(self._views(flat)[0], xs, strict=True)):
            torch.mm(wb, xb.t(), out=out[self._product_rows[b]])
        return out if dtype is None else out.float()

    def _sum_heads(self, products: Tensor) -> Tensor:
        """Outputs ``(H, K, B)``: bias + the stacked products added to their heads' outputs."""
        n = products.shape[1]
        z = torch.empty(self.n_heads * self.n_outputs, n)
        z.copy_(self.bias.detach().reshape(-1, 1).expand(-1, n))
        z.index_add_(0, self._out_index, products)
        return z.view(self.n_heads, self.n_outputs, n)

    @torch.no_grad()
    def forward(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Outputs ``(H, K, B)`` of all heads on float32 rows ``x`` (B, N). ``dtype=torch.bfloat16``
        computes the products in bfloat16 (mixed precision), summed in float32."""
        return self._sum_heads(self._products(self._inputs(x, dtype), dtype))

    def use_kernels(self) -> bool:
        """Whether the compiled kernels (:mod:`lexp.kernels`) do this module's element-wise work:
        when they are available and the weights are on the CPU."""
        if self._kernels is None:
            self._kernels = compiled.available()
        return self._kernels and self.weight.is_cpu

    @torch.no_grad()
    def loss_and_grad(
        self,
        x: Tensor,
        y: Tensor,
        *,
        l1: float,
        l2: float,
        regression: bool,
        dtype: torch.dtype | None = None,
        penalty: bool = True,
    ) -> Tensor:
        """Per-head loss ``(H,)`` — mean cross-entropy (or MSE) + ``l1·Σ|W_h| + l2·‖W_h‖₂`` — and its
        gradient written to ``.grad`` of both parameters (the values autograd gives for each head
        alone; see the tests). ``penalty=False``: the data loss and its gradient only — for
        :class:`ElasticNetAdam`, which adds the penalty's gradient inside its update."""
        n = x.shape[0]
        xs = self._inputs(x, dtype)
        products = self._products(xs, dtype)  # (Σ m_b·K, B), float32
        if not regression and self.use_kernels():
            y = y.to(torch.int64).contiguous()
            low, high = torch.aminmax(y)
            if low < 0 or high >= self.n_outputs:
                raise LexpInputError(
                    f"FusedHeads: class ids must be in [0, {self.n_outputs}), got {int(low)}..{int(high)}"
                )
            dp, data, bias_grad = compiled.xent_heads(products, self.bias.detach(), y, self._slot_table)
            alpha = 1.0  # the kernel's gradient includes the 1/n of the mean
        else:
            z = self._sum_heads(products)
            # dz is the output gradient times n: the 1/n of the mean goes into the products' alpha.
            if regression:
                diff = z[:, 0, :] - y.to(z.dtype)  # (H, B)
                data = diff.pow(2).mean(dim=1)
                dz, alpha = diff.unsqueeze(1), 2.0 / n
            else:
                logp = torch.log_softmax(z, dim=1)
                # flat index of (h, y_b, b) in (H, K, B): every head's target entries
                target = (self._head_base(n) + (y.view(1, n) * n + torch.arange(n))).view(-1)
                data = torch.take(logp, target).view(self.n_heads, n).mean(dim=1).neg_()
                dz = logp.exp_()  # softmax; minus one at the targets:
                dz.view(-1).index_add_(0, target, torch.full((target.numel(),), -1.0))
                alpha = 1.0 / n
            dz = dz.view(-1, n)  # (H·K, B)
            bias_grad = dz.sum(dim=1).mul_(alpha).view(self.n_heads, self.n_outputs)
            dp = dz.index_select(0, self._out_index)  # (Σ m_b·K, B): each block's output gradient
        self.bias.grad = bias_grad

        w = self.weight.detach()
        grad = self.weight.grad
        if grad is None or grad.shape != w.shape:
            grad = torch.empty_like(w)  # then reused: Adam reads it, the next step overwrites it
        beta, value = 0.0, data
        if penalty:
            # Per head Σ|W_h| and ‖W_h‖₂ (un-squared) over its segments; the gradient
            # l1·sign(W) + l2·W/‖W_h‖₂ (‖W_h‖₂ = 0 only if W_h = 0, where the subgradient is 0, not
            # NaN), written as c·(sign(W)·l1/c + W·l2/(c‖W_h‖₂)) with c = l1 (or 1 without L1): c
            # is the beta of the product that adds the data gradient — one pass over W fewer.
            abs_sum, norm = self.penalty_terms(w)
            c = l1 if l1 > 0 else 1.0
            if l1 > 0:
                torch.sign(w, out=grad)
            else:
                grad.zero_()
            self.add_scaled_(grad, w, self.segment_scale(norm, l2 / c))
            beta, value = c, data + l1 * abs_sum + l2 * norm
        if dtype is None:
            for gb, xb, rows in zip(self._views(grad)[0], xs, self._product_rows, strict=True):
                gb.addmm_(dp[rows], xb, beta=beta, alpha=alpha)
        else:  # products in dtype into a reused buffer, then added in float32
            dp_low, low = dp.to(dtype), self._low("grad", dtype)
            for gb, xb, rows in zip(self._views(low)[0], xs, self._product_rows, strict=True):
                torch.mm(dp_low[rows], xb, out=gb)
            if beta == 0:
                grad.copy_(low)
                if alpha != 1.0:
                    grad.mul_(alpha)
            else:
                grad.mul_(beta).add_(low, alpha=alpha)
        self.weight.grad = grad
        return value

    # ---- the penalty, by segment (one head's weights in one block)
    def segments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(start, length, head)`` of every segment of the flat weight, in order."""
        return self._seg_start, self._seg_len, self._segment_heads

    def penalty_terms(self, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per head ``Σ|W_h|`` and ``‖W_h‖₂`` (``(H,)``) of the flat weight ``w`` (default: the weight)."""
        groups = self._views(self.weight.detach() if w is None else w)[1]
        seg_abs = torch.cat([v.abs().sum(dim=1) for v in groups])
        seg_sq = torch.cat([torch.linalg.vector_norm(v, 2, dim=1) for v in groups]).square_()
        return self.per_head(seg_abs), self.per_head(seg_sq).sqrt_()

    def per_head(self, per_segment: Tensor) -> Tensor:
        """Sum a per-segment value over each head's segments."""
        return torch.zeros(self.n_heads, dtype=per_segment.dtype).index_add_(
            0, self._segment_heads, per_segment
        )

    def segment_scale(self, norm: Tensor, l2: float) -> Tensor:
        """``l2 / ‖W_h‖₂`` for every segment (float32; 0 where ``W_h = 0``, the subgradient there)."""
        return (l2 / norm.float().clamp_min(torch.finfo(torch.float32).tiny))[self._segment_heads]

    def add_scaled_(self, grad: Tensor, w: Tensor, scale: Tensor) -> None:
        """``grad += scale[segment] · w`` for flat ``grad`` and ``w``, a group of segments at a time."""
        start = 0
        for g, v in zip(self._views(grad)[1], self._views(w)[1], strict=True):
            g.addcmul_(v, scale[start : start + len(v)].unsqueeze(1))
            start += len(v)

    def _head_base(self, n: int) -> Tensor:
        """``(H, 1)`` start of every head in a flat ``(H, K, n)`` tensor (cached per ``n``)."""
        base = self._base_cache.get(n)
        if base is None:
            base = self._base_cache[n] = torch.arange(self.n_heads).view(-1, 1) * (self.n_outputs * n)
        return base


class MultiHeadProbe(_ProbeModule):
    """One ElasticNet probe per named column subset, all trained in a single pass over the data.

    The heads live in a :class:`FusedHeads`: blocks of shared columns, one matrix product per block,
    gradients written by hand. Heads with identical columns are trained once (they would be
    identical: same seed, same data) and reported under every name. Loss = Σ_heads (data loss +
    penalty) — a sum, so each head's gradients are its own, and Adam is elementwise, so head ``h``
    equals ``ElasticNetProbe(columns=subsets[h], seed=seed)`` trained on the same batches.

    The arithmetic is that of training the heads one after another; what one pass saves is reading
    the data once per epoch, one product per block instead of per head, one Adam kernel and no
    autograd or Lightning work per head.
    """

    def __init__(
        self,
        subsets: Mapping[str, np.ndarray],
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
    ):
        if not subsets:
            raise LexpInputError(
                "MultiHeadProbe: no subsets given; pass {name: column indices}, e.g. {'oracle': ...}"
            )
        checked = {_check_head_name(n): _check_columns(n, c, n_features) for n, c in subsets.items()}
        # Identical subsets train identically: keep the first name, alias the others to it.
        canonical: dict[bytes, str] = {}
        aliases = {name: canonical.setdefault(cols.tobytes(), name) for name, cols in checked.items()}
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
        self.fused = FusedHeads([checked[n] for n in heads], self.n_outputs, seed)
        self._index = {name: h for h, name in enumerate(heads)}

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``(H, K, B)`` of all heads (``head_names`` order)."""
        dtype = _autocast_dtype()
        with torch.autocast("cpu", enabled=False):  # the precision is explicit in FusedHeads
            return self.fused(x, dtype)

    def _train_step(self, x: Tensor, y: Tensor) -> Tensor:
        dtype = _autocast_dtype()
        with torch.autocast("cpu", enabled=False):
            data = self.fused.loss_and_grad(
                x, y, l1=self.l1, l2=self.l2, regression=self.regression, dtype=dtype, penalty=False
            )
        # the penalty's gradient is added by ElasticNetAdam; its value, of the weights before this step:
        abs_sum, norm = self._optimizer.penalty()
        return (data + self.l1 * abs_sum + self.l2 * norm).sum()

    def _update(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.update() if isinstance(optimizer, LeanAdam) else optimizer.step()

    def _outputs(self, x: Tensor) -> Tensor:
        return self(x)  # (H, K, B)

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


def _autocast_dtype() -> torch.dtype | None:
    """bfloat16 under Lightning's ``bf16-mixed`` precision (CPU autocast), else None (float32)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


# ----------------------------------------------------------------------------------- the shell
def _settings(probe_cfg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(probe_cfg) - _CONFIG_KEYS
    if unknown:
        raise LexpInputError(
            f"probe config: unknown key(s) {sorted(unknown)}; known keys are {sorted(_CONFIG_KEYS)} "
            "(see conf/probe/elasticnet.yaml)"
        )
    cfg = {**PROBE_DEFAULTS, **dict(probe_cfg)}
    for key in ("epochs", "seed"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, np.integer)):
            raise LexpInputError(f"probe config: {key} = {cfg[key]!r} must be an integer")
    if cfg["epochs"] < 1:
        raise LexpInputError(f"probe config: epochs = {cfg['epochs']} must be at least 1")
    for key in ("lr", "l1", "l2"):
        value = cfg[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not np.isfinite(value)
            or value < 0
        ):
            raise LexpInputError(f"probe config: {key} = {value!r} must be a finite number >= 0")
    if cfg["init_seed"] is None:
        cfg["init_seed"] = cfg["seed"]
    return cfg


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's per-Trainer banners (GPU/TPU availability, tips): a minimal-set search
    builds dozens of Trainers. Warnings still show."""
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            # In-memory batches need no worker processes; Lightning's hint does not apply.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # The train loss is logged once per epoch, so a short epoch loses nothing to this.
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _restore_determinism() -> Iterator[None]:
    """``Trainer(deterministic=True)`` switches torch's global flag on; switch it back afterwards so
    that code running later in the same process (a notebook, other stages) is unaffected."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


#: Trainer options that only fine-tuning uses, with Lightning's defaults.
_FINETUNE_ONLY: dict[str, Any] = {
    "accumulate_grad_batches": 1,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
}


def _trainer(epochs: int, trainer_kwargs: Mapping[str, Any] | None, logger: Any) -> pl.Trainer:
    kwargs = dict(trainer_kwargs or {})
    if "max_epochs" in kwargs:
        raise LexpInputError(
            "trainer_kwargs: max_epochs is set by the probe config; use probe.epochs instead"
        )
    # Fine-tuning settings of the shared trainer config: a probe takes one Adam step per
    # probe.batch_size rows, unclipped (the paper's probe), and its optimisation is manual, which
    # Lightning refuses to combine with these.
    for key, default in _FINETUNE_ONLY.items():
        value = kwargs.pop(key, default)
        if value != default:
            logging.getLogger(__name__).info(
                "probes ignore trainer.%s=%s (a fine-tuning setting): a probe step is probe.batch_size rows",
                key,
                value,
            )
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # Redrawing on every one of ~1,200 steps per epoch would cost more than the steps.
        callbacks.append(TQDMProgressBar(refresh_rate=25))
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 50,
        **kwargs,
        "logger": logger or False,
        "max_epochs": int(epochs),
        "callbacks": callbacks,
    }
    return pl.Trainer(**settings)


def _has_split(datamodule: pl.LightningDataModule, split: str) -> bool:
    """Whether the datamodule can serve ``split`` ("dev" or "test")."""
    stores = getattr(datamodule, "stores", None)  # ActivationDataModule: one store per split given
    if isinstance(stores, Mapping):
        return split in stores
    return is_overridden("val_dataloader" if split == "dev" else "test_dataloader", datamodule)


def train_probes(
    datamodule: pl.LightningDataModule,
    subsets: Mapping[str, np.ndarray] | None,
    *,
    probe_cfg: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any] | None = None,
    logger: Any = None,
    reference: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train one probe per subset (all in one pass) and evaluate the selected epoch on dev and test.

    ``subsets`` maps a head name to column indices into the datamodule's batches; ``None`` trains a
    single probe on all columns, returned under the name ``"all"``. Probes train as heads of a
    :class:`MultiHeadProbe`; ``reference=True`` (``subsets=None`` only) trains the plain autograd
    :class:`ElasticNetProbe` instead — the slow, obviously correct version the fused one is tested
    against.
    ``probe_cfg`` holds the keys of ``conf/probe/elasticnet.yaml`` (``batch_size`` and ``seed`` are
    the datamodule's business: it was built with them). ``regression: null`` reads
    ``datamodule.regression``.

    Returns, per head: ``dev`` and ``test`` metric dicts (``accuracy``, ``macro_f1``; or ``pearson``,
    ``spearman``, ``mse``), ``best_epoch`` (1-based), ``dev_history`` (dev score per epoch),
    ``weights`` (K × C float32) and ``bias`` (K,) of the selected epoch, ``columns`` (C,),
    ``train_seconds`` (wall time of the shared training pass, dev evaluation included) and
    ``heads_in_pass``.
    """
    cfg = _settings(probe_cfg)
    regression = cfg["regression"]
    if regression is None:
        regression = bool(getattr(datamodule, "regression", False))
    n_features = int(datamodule.n_features)
    n_classes = int(datamodule.n_classes) if not regression else 0
    common = {
        "l1": cfg["l1"],
        "l2": cfg["l2"],
        "lr": cfg["lr"],
        "seed": int(cfg["init_seed"]),
        "regression": bool(regression),
        "select_on_dev": bool(cfg["select_on_dev"]),
        # rows per optimiser step: the datamodule's minibatch (its training batches may hold several)
        "batch_size": getattr(datamodule, "batch_size", None),
    }
    if cfg["select_on_dev"] and not _has_split(datamodule, "dev"):
        raise LexpInputError(
            f"probe.select_on_dev=true, but {type(datamodule).__name__} has no dev split; "
            "give it a dev split or set probe.select_on_dev=false"
        )
    if reference and subsets is not None:
        raise LexpInputError("train_probes: reference=True trains one ElasticNetProbe; pass subsets=None")
    if reference:
        module: _ProbeModule = ElasticNetProbe(n_features, n_classes, **common)
    else:
        columns = {ALL_COLUMNS: np.arange(n_features)} if subsets is None else subsets
        module = MultiHeadProbe(columns, n_features, n_classes, **common)

    with _quiet_lightning(), _restore_determinism():
        trainer = _trainer(cfg["epochs"], trainer_kwargs, logger)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        train_seconds = time.perf_counter() - start
        if _has_split(datamodule, "test"):
            trainer.test(module, datamodule=datamodule, verbose=False)

    results = module.head_results()
    for result in results.values():
        result["train_seconds"] = train_seconds
        result["heads_in_pass"] = len(module.head_names)
    return results


def predict(
    weights: np.ndarray,
    bias: np.ndarray,
    x: np.ndarray,
    *,
    columns: np.ndarray | None = None,
    chunk_rows: int = 8192,
) -> np.ndarray:
    """Predictions of a trained head on rows ``x``: class ids (int64), or values for regression.

    ``weights`` (K, C) and ``bias`` (K,) as returned by :func:`train_probes`; ``x`` has C columns, or
    give ``columns`` to pick them from a wider matrix (e.g. a memory-mapped store). Rows are read in
    chunks of ``chunk_rows`` and computed in float32 (never a float64 copy of ``x``).
    """
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
    b = torch.as_tensor(np.asarray(bias, dtype=np.float32))
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise LexpInputError(
            f"predict: weights must be (K, C) and bias (K,), got {tuple(w.shape)} and {tuple(b.shape)}; "
            "pass a head's 'weights' and 'bias' from train_probes"
        )
    if x.ndim != 2 or (columns is None and x.shape[1] != w.shape[1]):
        raise LexpInputError(
            f"predict: x has shape {x.shape}, the probe expects {w.shape[1]} columns; "
            "pass the head's 'columns' to select them from a wider matrix"
        )
    if columns is not None:
        columns = _check_columns("predict", columns, x.shape[1])
        if columns.size != w.shape[1]:
            raise LexpInputError(
                f"predict: {columns.size} columns given for a probe with {w.shape[1]} inputs; "
                "pass the head's own 'columns'"
            )
    regression = w.shape[0] == 1
    out = np.empty(x.shape[0], dtype=np.float32 if regression else np.int64)
    take: Callable[[np.ndarray], np.ndarray] = (lambda a: a) if columns is None else (lambda a: a[:, columns])
    with torch.inference_mode():
        for start in range(0, x.shape[0], chunk_rows):
            chunk = torch.from_numpy(
                np.ascontiguousarray(take(x[start : start + chunk_rows]), dtype=np.float32)
            )
            logits = F.linear(chunk, w, b)
            out[start : start + chunk.shape[0]] = (
                logits[:, 0] if regression else logits.argmax(dim=1)
            ).numpy()
    return out
