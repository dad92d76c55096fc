"""The probes' optimizers: :class:`LeanAdam` (torch's fused Adam with less Python) and
:class:`ElasticNetAdam` (Adam on data loss + ElasticNet penalty, the penalty inside the update).

On the CPU :class:`ElasticNetAdam` runs the compiled kernel of :mod:`lexp.kernels` when it is
available; on CUDA (and without the kernels) it runs torch operations and torch's fused Adam, whose
CUDA kernel wants every state tensor, ``step`` included, on the parameter's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lexp import kernels as compiled

if TYPE_CHECKING:
    from lexp.probes.fused import FusedHeads

__all__ = ["ElasticNetAdam", "LeanAdam"]


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
    back to torch's single-tensor update written out. Device-neutral: every state tensor lives on
    its parameter's device, and a step makes no host synchronisation.
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
            # on the parameter's device, as torch.optim.Adam(fused=True) keeps it: the fused CUDA
            # kernel reads it there (and a CUDA-graph capture needs it there)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
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
        # the compiled kernel's work items: CPU tables (only the CPU kernel reads them)
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
