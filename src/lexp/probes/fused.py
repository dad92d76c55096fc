"""Many linear heads in one module, trained with hand-written gradients: :class:`FusedHeads`.

The pure numerical core of :class:`lexp.probes.MultiHeadProbe` (no Lightning, no autograd). It is
device-neutral: every index tensor is a registered (non-persistent) buffer, so it moves with the
module (``.to(device)``, as Lightning moves it), and every tensor a step creates is created on the
weight's device. The compiled kernels of :mod:`lexp.kernels` are a CPU accelerator, used only while
the weights are on the CPU; on CUDA the same maths runs as torch operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lexp import kernels as compiled
from lexp.errors import LexpInputError
from lexp.probes.loss import _contiguous, init_head_

__all__ = ["FusedHeads"]


def _blocks(subsets: list[np.ndarray], max_blocks: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split the heads' columns into blocks ``(columns, heads)``: each column of a block is used by
    exactly the heads ``heads``.

    For the layer step (per-layer, layers 0..k, oracle) the blocks are the L layers; for nested
    top-n candidates they are the differences of consecutive candidates. Every head is then a sum of
    block products, with no column gathered twice and no zero padding: the arithmetic is exactly
    that of training each head alone, in L wide matrix products instead of H narrow ones. When the
    subsets overlap so irregularly that this would give more than ``max_blocks`` blocks, each
    distinct subset is its own block instead, read by every head on exactly those columns (same
    arithmetic, one product per distinct subset: a control head or another seed's head on the same
    columns adds rows to its twin's product, not a product).

    ``max_blocks`` defaults to twice the number of *distinct* subsets (at least 16): control heads
    and seeds on the same columns add no columns, so they must not tip a plan into more, narrower
    blocks (measured: 5 seeds x 16 candidates with control heads went from 71 s to 534 s that way).
    """
    same: dict[bytes, list[int]] = {}  # heads by their (sorted) column subset
    for h, cols in enumerate(subsets):
        same.setdefault(np.sort(cols).tobytes(), []).append(h)
    if max_blocks is None:
        max_blocks = max(2 * len(same), 16)
    union = np.unique(np.concatenate(subsets))
    member = np.zeros((union.size, len(subsets)), dtype=bool)
    for h, cols in enumerate(subsets):
        member[np.searchsorted(union, cols), h] = True
    patterns, first, inverse = np.unique(member, axis=0, return_index=True, return_inverse=True)
    if len(patterns) > max_blocks:
        return [(np.sort(subsets[heads[0]]), np.array(heads)) for heads in same.values()]
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
    the head's own column order; head ``h`` starts where :func:`init_head_` with ``seed`` (or
    ``seed[h]``, one per head: ``probe.seeds``) starts it.

    Several label vectors (``targets[h]``: 0 = the task's labels, 1 = the control task ...): the
    labels are then ``(B, T)`` and head ``h`` learns column ``targets[h]``. Heads on the same
    columns share their blocks whatever they learn, so a control head costs rows of the block
    products, not another pass. The compiled cross-entropy kernel takes one label vector per call:
    it runs once per vector on that vector's heads (see :meth:`_xent_by_target`).

    Devices: the index tensors are non-persistent buffers (flat, with the per-block pieces as views
    re-made after every move, see :meth:`_apply`), and the caches are dropped on a move. Only the
    kernels' slot table stays on the CPU: only the CPU kernel reads it. A training step makes no
    host synchronisation on the torch path (nothing reads a tensor's value on the host).
    """

    def __init__(
        self,
        subsets: list[np.ndarray],
        n_outputs: int,
        seed: int | Sequence[int],
        max_blocks: int | None = None,
        *,
        kernels: bool | None = None,
        targets: Sequence[int] | None = None,
    ):
        super().__init__()
        #: compiled kernels (lexp.kernels) for the element-wise work: None = when available
        self._kernels = kernels
        self.n_heads, self.n_outputs = len(subsets), int(n_outputs)
        self.widths = [int(c.size) for c in subsets]
        seeds = [int(seed)] * self.n_heads if isinstance(seed, int | np.integer) else [int(s) for s in seed]
        head_targets = [0] * self.n_heads if targets is None else [int(t) for t in targets]
        if (
            len(seeds) != self.n_heads
            or len(head_targets) != self.n_heads
            or min(head_targets, default=0) < 0
        ):
            raise LexpInputError(
                f"FusedHeads: {self.n_heads} heads need one seed and one target (>= 0) each, got "
                f"{len(seeds)} seeds and targets {head_targets}"
            )
        #: the label vector each head learns (0: the task's; see HeadSpec) and how many there are
        self.targets = head_targets
        self.n_targets = max(head_targets, default=0) + 1
        k = self.n_outputs
        blocks = _blocks(subsets, max_blocks)
        blocks.sort(key=lambda block: block[0].size)  # stable: equal widths stay in column order
        #: per block: its columns (a slice, or a span of the flat column index), (rows, cols), its
        #: start in the flat weight and its rows in the stacked products; per (block, slot) the span
        #: of the flat position index (the block's columns in the head's own column order)
        col_spans: list[slice | tuple[int, int]] = []
        col_index: list[np.ndarray] = []
        position_spans: list[list[tuple[int, int]]] = []
        position_index: list[np.ndarray] = []
        out_index: list[np.ndarray] = []
        self._shapes: list[tuple[int, int]] = []
        self._offsets: list[int] = []
        self._product_rows: list[slice] = []
        self._slots: list[list[tuple[int, int]]] = [[] for _ in subsets]  # head -> [(block, slot)]
        segment_heads: list[int] = []
        segment_starts: list[int] = []
        #: runs of segments of one length: (first segment, number of segments, length)
        self._groups: list[tuple[int, int, int]] = []
        offset = row = n_cols = n_positions = 0
        orders = [np.argsort(c, kind="stable") for c in subsets]  # to find columns in a head's order
        for b, (cols, heads) in enumerate(blocks):
            contiguous = _contiguous(cols)
            if contiguous is not None:
                col_spans.append(contiguous)
            else:
                col_spans.append((n_cols, n_cols + cols.size))
                col_index.append(cols)
                n_cols += cols.size
            out_index.append((heads[:, None] * k + np.arange(k)).reshape(-1))
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
            spans = []
            for slot, h in enumerate(heads):
                # position of each block column in head h's own column order
                where = orders[h][np.searchsorted(subsets[h], cols, sorter=orders[h])]
                spans.append((n_positions, n_positions + where.size))
                position_index.append(where)
                n_positions += where.size
                self._slots[h].append((b, slot))
                segment_heads.append(int(h))
                segment_starts.append(self._offsets[b] + slot * k * cols.size)
            position_spans.append(spans)
        self._col_spans, self._position_spans = col_spans, position_spans
        self.weight = nn.Parameter(torch.empty(offset))
        self.bias = nn.Parameter(torch.empty(self.n_heads, k))

        def index(parts: list[np.ndarray]) -> Tensor:
            return torch.from_numpy(
                np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
            )

        # Non-persistent: derived from the subsets, so not part of a state dict; moved with the module.
        self.register_buffer("_col_index", index(col_index), persistent=False)
        self.register_buffer("_position_index", index(position_index), persistent=False)
        #: output row (of the H·K outputs) of every row of the stacked block products
        self.register_buffer("_out_index", index(out_index), persistent=False)
        self.register_buffer(
            "_segment_heads", torch.tensor(segment_heads, dtype=torch.int64), persistent=False
        )
        self.register_buffer("_seg_start", torch.tensor(segment_starts, dtype=torch.int64), persistent=False)
        self.register_buffer(
            "_seg_len",
            torch.tensor(
                [length for _, count, length in self._groups for _ in range(count)], dtype=torch.int64
            ),
            persistent=False,
        )
        #: per head, the first stacked product row of each of its K-row slots: read only by the CPU
        #: kernel (lexp.kernels), through pointers, so it stays a CPU table
        slot_rows = [[self._product_rows[b].start + slot * k for b, slot in slots] for slots in self._slots]
        self._slot_table = compiled.head_slots(slot_rows, row, k)
        self.register_buffer("_head_target", torch.tensor(head_targets, dtype=torch.int64), persistent=False)
        #: heads that learn another label vector than the task's: per target, its heads, their rows of
        #: the stacked products and their kernel slot table (the kernel takes one label vector a call)
        self._target_groups: list[tuple[int, Tensor, Tensor, Any]] = []
        if self.n_targets > 1:
            for t in sorted(set(head_targets)):
                heads = np.flatnonzero(np.asarray(head_targets) == t)
                rows = np.concatenate([np.arange(r, r + k) for h in heads for r in slot_rows[h]])
                table = compiled.head_slots([slot_rows[h] for h in heads], row, k)
                self._target_groups.append((t, torch.from_numpy(heads), torch.from_numpy(rows), table))
        self._bind()
        for h, cols in enumerate(subsets):
            weight, bias = torch.empty(k, cols.size), torch.empty(k)
            init_head_(weight, bias, seeds[h])
            self.set_head(h, weight, bias)

    # ---- devices
    def _bind(self) -> None:
        """(Re)make the per-block views of the index buffers and drop every cache: after
        construction and after every move (the buffers are then new tensors)."""
        self._cols: list[slice | Tensor] = [
            span if isinstance(span, slice) else self._col_index[span[0] : span[1]]
            for span in self._col_spans
        ]
        self._positions: list[list[Tensor]] = [
            [self._position_index[a:b] for a, b in spans] for spans in self._position_spans
        ]
        self._view_cache: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}
        self._base_cache: dict[int, Tensor] = {}
        self._low_buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self._low_version: dict[torch.dtype, int] = {}  # weight version each low copy equals

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FusedHeads:
        """``.to(device)``, ``.cuda()``, ``.float()`` …: move the buffers, then re-make their views."""
        super()._apply(fn, recurse)
        self._bind()
        return self

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
        weight = torch.empty(self.n_outputs, self.widths[h], dtype=flat.dtype, device=flat.device)
        for b, slot in self._slots[h]:
            weight[:, self._positions[b][slot]] = self._block(flat, b)[self._rows(slot)]
        bias = self.bias.grad[h] if grad else self.bias[h]
        return weight, bias.detach().clone()

    @torch.no_grad()
    def set_head(self, h: int, weight: Tensor, bias: Tensor) -> None:
        """Write head ``h``'s weight ``(K, C_h)`` and bias (from any device: copied to the weights')."""
        weight = weight.to(self.weight.device, self.weight.dtype)
        bias = bias.to(self.bias.device, self.bias.dtype)
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
            buf = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
            self._low_buffers[(name, dtype)] = buf
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
        out = torch.empty(self._out_index.numel(), n, dtype=flat.dtype, device=flat.device)
        for b, (wb, xb) in enumerate(zip(self._views(flat)[0], xs, strict=True)):
            torch.mm(wb, xb.t(), out=out[self._product_rows[b]])
        return out if dtype is None else out.float()

    def _sum_heads(self, products: Tensor) -> Tensor:
        """Outputs ``(H, K, B)``: bias + the stacked products added to their heads' outputs."""
        n = products.shape[1]
        z = torch.empty(self.n_heads * self.n_outputs, n, device=products.device)
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
        when they are available and the weights are on the CPU (a CPU accelerator; on CUDA the
        torch operations run, and the library is not even built)."""
        if not self.weight.is_cpu:
            return False
        if self._kernels is None:
            self._kernels = compiled.available()
        return self._kernels

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
        self._check_targets(y)
        if y.ndim == 2 and self.n_targets == 1:  # extra label vectors that no head of this pass learns
            y = y[:, 0]
        xs = self._inputs(x, dtype)
        products = self._products(xs, dtype)  # (Σ m_b·K, B), float32
        if not regression and self.use_kernels():
            y = y.to(torch.int64).contiguous()
            low, high = torch.aminmax(y)
            if low < 0 or high >= self.n_outputs:
                raise LexpInputError(
                    f"FusedHeads: class ids must be in [0, {self.n_outputs}), got {int(low)}..{int(high)}"
                )
            if y.ndim == 1:
                dp, data, bias_grad = compiled.xent_heads(products, self.bias.detach(), y, self._slot_table)
            else:
                dp, data, bias_grad = self._xent_by_target(products, y)
            alpha = 1.0  # the kernel's gradient includes the 1/n of the mean
        else:
            z = self._sum_heads(products)
            # dz is the output gradient times n: the 1/n of the mean goes into the products' alpha.
            y = self.labels_per_head(y)  # (B,) shared by every head, or (H, B)
            if regression:
                diff = z[:, 0, :] - y.to(z.dtype)  # (H, B)
                data = diff.pow(2).mean(dim=1)
                dz, alpha = diff.unsqueeze(1), 2.0 / n
            else:
                logp = torch.log_softmax(z, dim=1)
                # flat index of (h, y_b, b) in (H, K, B): every head's target entries
                rows = torch.arange(n, device=z.device)
                target = (self._head_base(n) + (y.reshape(-1, n) * n + rows)).view(-1)
                data = torch.take(logp, target).view(self.n_heads, n).mean(dim=1).neg_()
                dz = logp.exp_()  # softmax; minus one at the targets:
                dz.view(-1).index_add_(0, target, torch.full((target.numel(),), -1.0, device=z.device))
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

    # ---- several label vectors (HeadSpec.target): y is (B, T), column t = label vector t
    def _check_targets(self, y: Tensor) -> None:
        """``y`` is (B,) when every head learns the task's labels, else (B, T) with T > max target."""
        if y.ndim == 1 and self.n_targets == 1:
            return
        if y.ndim != 2 or y.shape[1] < self.n_targets:
            raise LexpInputError(
                f"FusedHeads: heads learn {self.n_targets} label vectors (targets {sorted(set(self.targets))}), "
                f"so the labels must be (rows, >= {self.n_targets}); got shape {tuple(y.shape)}. Give the "
                "datamodule the extra label vectors (ActivationDataModule(extra_labels=...))"
            )

    def labels_per_head(self, y: Tensor) -> Tensor:
        """Each head's labels: ``y`` itself when it is one vector (B,), else ``(H, B)`` — row ``h`` is
        column ``targets[h]`` of ``y`` (B, T)."""
        if y.ndim == 1:
            return y
        if self.n_targets == 1:
            return y[:, 0]
        return y.t().index_select(0, self._head_target.to(y.device))

    def _xent_by_target(self, products: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The compiled cross-entropy kernel once per label vector (it takes one per call), on
        that vector's heads; the gradients are gathered into one ``(R, B)`` buffer. Costs one
        ``(R_t, B)`` copy per extra vector — small beside the block products (``C`` times more)."""
        dp = data = bias_grad = None
        bias = self.bias.detach()
        for t, heads, rows, table in self._target_groups:
            g_dp, g_loss, g_bias = compiled.xent_heads(
                products, bias.index_select(0, heads), y[:, t].contiguous(), table
            )
            if dp is None:
                dp, data, bias_grad = g_dp, torch.empty(self.n_heads), torch.empty_like(bias)
            else:
                dp.index_copy_(0, rows, g_dp.index_select(0, rows))
            data.index_copy_(0, heads, g_loss)
            bias_grad.index_copy_(0, heads, g_bias)
        return dp, data, bias_grad

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
        return torch.zeros(self.n_heads, dtype=per_segment.dtype, device=per_segment.device).index_add_(
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
            base = torch.arange(self.n_heads, device=self._out_index.device).view(-1, 1) * (
                self.n_outputs * n
            )
            self._base_cache[n] = base
        return base
