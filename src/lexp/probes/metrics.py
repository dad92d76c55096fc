"""Scores of the probes: confusion counts of many heads at once, accuracy and macro-F1.

Classification labels of dev/test rows may be ids ``>= n_classes`` (labels unseen in train, see
``TaskData.encode_labels``). A probe cannot predict them, so they count as errors: accuracy is
``mean(pred == y)`` over *all* rows, and macro-F1 averages over the train classes with such rows
counted as false positives of whatever class was predicted.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ConfusionCounts", "classification_scores"]


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
    deterministic algorithms are on (as in every probe run), which cost more than training. The
    counts are a metric state, so they move with the probe to its device (CUDA's ``bincount``
    without weights is deterministic).
    """

    full_state_update = False

    def __init__(self, n_heads: int, n_classes: int):
        super().__init__()
        self.n_heads, self.size = int(n_heads), int(n_classes) + 1
        self.add_state(
            "counts", default=torch.zeros(self.n_heads * self.size**2, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds`` (H, B) predicted class ids; ``target`` gold ids (unseen labels allowed): (B,)
        shared by every head, or (H, B), one row per head (heads learning different label vectors)."""
        gold = target.long().clamp(max=self.size - 1)
        heads = torch.arange(self.n_heads, device=self.counts.device).unsqueeze(1) * self.size**2
        index = heads + (gold.unsqueeze(0) if gold.ndim == 1 else gold) * self.size + preds.long()
        self.counts += torch.bincount(index.flatten(), minlength=self.counts.numel())

    def compute(self) -> Tensor:
        return self.counts.view(self.n_heads, self.size, self.size)
