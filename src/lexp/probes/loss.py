"""The probe's maths: the ElasticNet penalty, the data loss, a head's initialisation, column checks.

Pure torch/numpy, no Lightning; every function works on whatever device its tensors live on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lexp.errors import LexpInputError

__all__ = ["elasticnet_penalty", "init_head_"]


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

    The numbers are drawn on the CPU (a CPU generator) and copied to the weight's device, so a head
    starts identically on every device: CUDA's generator draws another sequence from the same seed.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    bound = 1.0 / float(np.sqrt(weight.shape[-1]))
    weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))
    bias.copy_(torch.empty(bias.shape).uniform_(-bound, bound, generator=generator))


def _as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


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
