"""General redundancy at LLM width (20K–140K neurons) in memory fixed in advance.

The exact path (:mod:`lexp.redundancy.covariance` + scipy) holds a dense float64 N × N co-moment,
the correlations in its place and scipy's condensed distances plus its working copy: about
16·N² bytes (1.6 GB at 9,984 neurons, 19 GB at 34,816, 292 GB at 135,168). This module gives the
same two results without any N × N matrix:

- **Blocked co-moment.** Column means and sums of squares come from one streaming pass. Then the
  upper triangle of the co-moment ``C = Σ_t (x_t − m)(x_t − m)ᵀ`` is produced one *panel* of rows
  at a time (rows i0..i1, columns i0..N, float64 accumulation of float32 or bfloat16 products;
  torch, on the run's device). When the centred rows fit in the budget they are read once and kept
  (float32, or bfloat16 under ``compute="bfloat16"``); otherwise every panel streams the store
  again. Each panel is used and dropped. Chunks are at most an eighth of the budget (float32 read
  plus its centred copy), so the transient read buffers stay bounded at any width.
- **Layer CKA from per-layer-pair blocks.** Every panel adds ``Σ C_ij²`` over its upper-triangle
  entries to a (G, G) table per pair of layers; with the diagonal, the layer traces and the
  per-row layer norms (debiased CKA) this is exactly what :func:`lexp.redundancy.cka.cka_blocks`
  reads from the dense matrix.
- **Clustering exact up to ct_max.** Average linkage cut at ct never joins two neurons that lie in
  different connected components of the graph ``|corr| ≥ 1 − ct`` (an average distance ≤ ct needs
  some pair ≤ ct), and average linkage is reducible, so the hierarchy inside one component below
  ct equals the one computed on the component alone. The panels therefore only find the
  components of the graph at the largest requested ct (union-find over the pairs above the
  threshold, with a 1e-6 margin so rounding can only make components larger); scipy's average
  linkage then runs on each component (its columns gathered, its correlations recomputed in
  float32 products with float64 sums — under ``compute="bfloat16"`` too, from the store); the
  component trees are merged into one scipy linkage matrix whose top joins (components with each
  other) sit at the maximal distance. Cutting it at any ct ≤ ct_max gives the exact flat clusters
  of the dense path; above ct_max it is not the paper's tree, so the cache and results.json
  record ``exact_up_to_ct``. Memory of this step is set by the largest component (≈ 16·S² bytes);
  a component that does not fit stops with one error naming S, ct and the budget.
- **bfloat16 as a screen.** Under ``compute="bfloat16"`` the panels (≈ 3× faster on AVX-512-BF16
  CPUs) only *find* the components, with the threshold lowered by :data:`_BF16_MARGIN`, more than
  the largest error a bfloat16 product can make on a correlation (inputs rounded to 2⁻⁹ relative,
  the product rounded to 2⁻⁹ of ``‖x_i‖‖x_j‖`` by Cauchy–Schwarz, float32 sums inside a chunk:
  ≤ 3·2⁻⁹ + 65,536·2⁻²⁴ ≈ 0.01 < 2⁻⁶). Screen components are then unions of the exact ones, and
  the linkage inside them is float32-exact, so the flat clusters at ct ≤ ct_max are the float32
  ones; only the layer CKA carries the bfloat16 rounding (≈ 1e-3). The panel sums are float32
  there (float64 under float32 compute): half the memory traffic of the elementwise steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lexp.device import exact_float32_matmul
from lexp.errors import LexpInputError
from lexp.plan import GB, BlockPlan, blocked_peak_bytes, blocked_plan, bounded_chunk_rows, exact_peak_bytes
from lexp.redundancy.covariance import _CONSTANT_RTOL, _iter_source, _raise_not_finite

__all__ = [  # the peak-memory formulas live in lexp.plan (no torch/scipy import for the plan)
    "GB",
    "BlockPlan",
    "blocked_plan",
    "WideResult",
    "exact_peak_bytes",
    "blocked_peak_bytes",
    "wide_general",
    "merge_component_linkages",
]

#: Margin on the threshold of the component graph: rounding can only add edges, never drop one.
_EDGE_MARGIN = 1e-6
#: Margin of the bfloat16 screen: above the worst error of a bfloat16 correlation (module docstring).
_BF16_MARGIN = 2.0**-6
#: Rows of one bfloat16 product over resident rows (its float32 sums: ≤ 65,536 · 2⁻²⁴ ≈ 0.004).
_BF16_GEMM_ROWS = 65536
#: Pairs above the threshold collected before the union-find is updated (2 int64 arrays each).
_PAIR_FLUSH = 8_000_000
#: Bytes per neuron pair of scipy's average linkage on one component: float64 correlations, the
#: condensed distances and nn_chain's working copy of them.
_LINKAGE_BYTES_PER_PAIR = 16


@dataclass
class WideResult:
    """What the blocked path returns: the merged linkage, CKA (whole layers only), the facts."""

    linkage: np.ndarray
    cka: np.ndarray | None
    cka_debiased: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ streaming
def _chunks(source: Any, chunk_rows: int, columns: np.ndarray | None) -> Iterator[np.ndarray]:
    it, _, _, _ = _iter_source(source, chunk_rows, columns)
    yield from it


def _column_stats(
    source: Any, chunk_rows: int, columns: np.ndarray | None, name: str
) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, float64 mean, float64 Σ(x − mean)²) in one pass (chunks merged by Chan's rule)."""
    n = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    for chunk in _chunks(source, chunk_rows, columns):
        chunk = np.asarray(chunk, dtype=np.float32)
        n_c = chunk.shape[0]
        m_c = chunk.mean(axis=0, dtype=np.float64)
        if not np.isfinite(m_c).all():
            _raise_not_finite(chunk, n, name)
        d = torch.from_numpy(np.subtract(chunk, m_c.astype(np.float32), dtype=np.float32))
        m2_c = d.square_().sum(dim=0).double().numpy()
        del d
        if mean is None:
            mean, m2 = m_c, m2_c
        else:
            delta = m_c - mean
            total = n + n_c
            mean = mean + delta * (n_c / total)
            m2 = m2 + m2_c + delta**2 * (n * n_c / total)
        n += n_c
    if mean is None or m2 is None or n == 0:
        raise LexpInputError(f"{name}: no rows to compute moments over; the source is empty")
    return n, mean, m2


class _Rows:
    """The centred rows, resident (read once) or streamed again for every panel."""

    def __init__(
        self,
        source: Any,
        columns: np.ndarray | None,
        mean: np.ndarray,
        plan: BlockPlan,
        low: torch.dtype | None,
        device: torch.device,
        n_rows: int,
    ) -> None:
        self.source, self.columns, self.plan, self.low, self.device = source, columns, plan, low, device
        self.mean32 = mean.astype(np.float32)
        self.n_rows = int(n_rows)
        self.resident: torch.Tensor | None = None
        self.passes = 0

    def _centred(self, chunk: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.subtract(chunk, self.mean32, dtype=np.float32)).to(self.device)
        return x if self.low is None else x.to(self.low)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.resident is not None:
            # bfloat16: as few products as possible (each rounds its result to bfloat16 once)
            step = self.plan.chunk_rows if self.low is None else _BF16_GEMM_ROWS
            for r0 in range(0, self.resident.shape[0], step):
                yield self.resident[r0 : r0 + step]
            return
        self.passes += 1
        if not self.plan.resident:
            for chunk in _chunks(self.source, self.plan.chunk_rows, self.columns):
                yield self._centred(chunk)
            return
        # filled in place (no list + cat: that would hold the rows twice)
        store = torch.empty(
            (self.n_rows, self.mean32.size), dtype=self.low or torch.float32, device=self.device
        )
        r0 = 0
        for chunk in _chunks(self.source, self.plan.chunk_rows, self.columns):
            x = self._centred(chunk)
            store[r0 : r0 + x.shape[0]] = x
            r0 += x.shape[0]
            yield store[r0 - x.shape[0] : r0]
        if r0 != self.n_rows:
            raise LexpInputError(f"the store gave {r0} rows on a second pass, {self.n_rows} on the first")
        self.resident = store

    def exact(self, cols: np.ndarray) -> Iterator[torch.Tensor]:
        """Float32 centred rows of columns ``cols`` only: the resident float32 rows, or (bfloat16
        rows or no resident copy) a pass over the store."""
        if self.low is None and self.resident is not None:
            idx = torch.from_numpy(cols).to(self.device)
            for x in self:
                yield x.index_select(1, idx).contiguous()
            return
        self.passes += 1
        mean = self.mean32[cols]
        for chunk in _chunks(self.source, self.plan.chunk_rows, self.columns):
            # np.take gives C-contiguous columns (a[:, idx] is column-major): cheap column slices,
            # one float32 copy of the gathered columns
            sub = np.take(np.asarray(chunk), cols, axis=1).astype(np.float32, copy=False)
            sub -= mean
            yield torch.from_numpy(sub).to(self.device)


# ------------------------------------------------------------------------------------ union-find
class _Components:
    """Connected components of a graph whose edges arrive in batches (labels = smallest root)."""

    def __init__(self, n: int) -> None:
        self.labels = np.arange(n, dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending = 0
        self.n_edges = 0

    def add(self, i: np.ndarray, j: np.ndarray) -> None:
        if i.size:
            self.pending.append((i, j))
            self.n_pending += i.size
            self.n_edges += i.size
            if self.n_pending >= _PAIR_FLUSH:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        i = self.labels[np.concatenate([p[0] for p in self.pending])]
        j = self.labels[np.concatenate([p[1] for p in self.pending])]
        self.pending, self.n_pending = [], 0
        n = self.labels.size
        graph = coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
        _, comp = connected_components(graph, directed=False)
        # relabel each component by its smallest current label: stable, independent of batch order
        first = np.full(comp.max() + 1, n, dtype=np.int64)
        np.minimum.at(first, comp, np.arange(n))
        self.labels = first[comp[self.labels]]


# ------------------------------------------------------------------------------------ the pass
def _layer_bounds(layer_sizes: Sequence[int] | None, n: int) -> np.ndarray | None:
    if layer_sizes is None:
        return None
    sizes = [int(s) for s in layer_sizes]
    if sum(sizes) != n:
        raise LexpInputError(f"wide_general: layer_sizes {sizes} sum to {sum(sizes)}, not the {n} neurons")
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def wide_general(
    source: Any,
    *,
    ct_max: float,
    budget_bytes: float,
    chunk_rows: int = 16384,
    columns: np.ndarray | None = None,
    compute: str = "float32",
    signed: bool = False,
    layer_sizes: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> WideResult:
    """Linkage exact below ``ct_max`` and (with ``layer_sizes``) the biased and debiased layer CKA,
    computed panel by panel within ``budget_bytes`` (module docstring)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = str(getattr(source, "path", getattr(source, "filename", "<array>")))
    if compute not in ("float32", "bfloat16"):
        raise LexpInputError(f"wide_general: compute must be 'float32' or 'bfloat16', got {compute!r}")
    if not 0.0 <= ct_max < (2.0 if signed else 1.0):
        raise LexpInputError(
            f"wide_general: the largest ct is {ct_max}; at ct ≥ {'2' if signed else '1'} every neuron pair is "
            "linked and the blocked path has nothing to split — use a smaller ct"
        )
    say = progress or (lambda _msg: None)
    stats_rows = bounded_chunk_rows(chunk_rows, _n_columns(source, columns), budget_bytes)
    n, mean, m2 = _column_stats(source, stats_rows, columns, name)
    n_feat = mean.size
    plan = blocked_plan(n, n_feat, budget_bytes, chunk_rows, compute)
    low = torch.bfloat16 if compute == "bfloat16" else None
    rows = _Rows(source, columns, mean, plan, low, dev, n)
    const = m2 / max(n, 1) <= (_CONSTANT_RTOL * np.abs(mean)) ** 2
    scale = np.sqrt(np.where(const, 1.0, m2))
    if const.any():
        import warnings

        warnings.warn(
            f"correlation: {int(const.sum())} of {n_feat} neurons are constant over {n} rows; "
            "their correlation is set to 0 (they stay singleton clusters)",
            RuntimeWarning,
            stacklevel=2,
        )
    bounds = _layer_bounds(layer_sizes, n_feat)
    g = 0 if bounds is None else bounds.size - 1
    sq_upper = np.zeros((g, g))
    diag_sq = np.zeros(g)
    q = torch.zeros((g, g), dtype=torch.float64, device=dev)
    layer_of = None if bounds is None else np.repeat(np.arange(g), np.diff(bounds))
    thr = 1.0 - float(ct_max) - (_EDGE_MARGIN if low is None else _BF16_MARGIN)
    comps = _Components(n_feat)
    scale_t = torch.from_numpy(scale).to(dev).to(torch.float64 if low is None else torch.float32)
    const_t = torch.from_numpy(const).to(dev)
    n_panels = math.ceil(n_feat / plan.panel)
    acc_dtype = torch.float64 if low is None else torch.float32
    with exact_float32_matmul(), torch.inference_mode():
        for p, i0 in enumerate(range(0, n_feat, plan.panel)):
            i1 = min(i0 + plan.panel, n_feat)
            acc: torch.Tensor | None = None
            for x in rows:
                prod = x[:, i0:i1].T @ x[:, i0:]
                if acc is None:
                    acc = prod.to(acc_dtype)
                else:
                    acc.add_(prod)
                del prod
                if p == 0 and g:  # per-row layer norms of the centred rows: Q of the debiased CKA
                    r = torch.stack(
                        [
                            x[:, a:b].float().square().sum(dim=1)
                            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                        ],
                        dim=1,
                    ).double()
                    q.addmm_(r.T, r)
            # the strict lower triangle of the leading square is not in the upper triangle
            rr = torch.arange(i1 - i0, device=dev)
            lower = rr[None, :] < rr[:, None]
            acc[:, : i1 - i0].masked_fill_(lower, 0.0)
            if g:
                _add_cka_terms(acc, i0, bounds, layer_of, sq_upper, diag_sq)
            corr = acc.div_(scale_t[i0:i1, None]).div_(scale_t[None, i0:])
            corr[const_t[i0:i1], :] = 0.0
            corr[:, const_t[i0:]] = 0.0
            hit = (corr if signed else corr.abs_()) >= thr
            hit[:, : i1 - i0].masked_fill_(lower | (rr[None, :] == rr[:, None]), False)
            ii, jj = (t.cpu().numpy() for t in torch.nonzero(hit, as_tuple=True))
            del hit, corr, acc
            comps.add(ii + i0, jj + i0)
            say(
                f"panel {p + 1}/{n_panels}: rows {i0}–{i1}, {comps.n_edges:,} pairs with |corr| ≥ {1 - ct_max:.3g}"
            )
    comps.flush()
    labels = comps.labels
    uniq, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    largest = int(sizes.max())
    need = _LINKAGE_BYTES_PER_PAIR * largest * largest + 4 * n * largest
    if need > budget_bytes:
        raise LexpInputError(
            f"the largest connected component of |corr| ≥ {1 - ct_max:.3g} (ct={ct_max:g}) has {largest:,} "
            f"neurons; exact average linkage on it needs {need / GB:.1f} GB > analysis.max_memory_gb="
            f"{budget_bytes / GB:.1f}. Fix: lower the largest analysis.ct, or raise analysis.max_memory_gb "
            f"to {math.ceil(need / GB) + 1}"
        )
    members = [np.flatnonzero(inverse == k) for k in np.flatnonzero(sizes >= 2)]
    members.sort(key=lambda m: (-m.size, int(m[0])))
    trees = _component_linkages(rows, members, n, scale, const, signed, budget_bytes, dev, say)
    Z = merge_component_linkages(n_feat, members, trees, top=2.0 if signed else 1.0)
    cka = cka_d = None
    if g:
        from lexp.redundancy.cka import cka_from_terms

        sq = np.diag(2 * np.diagonal(sq_upper) - diag_sq) + np.triu(sq_upper, 1) + np.triu(sq_upper, 1).T
        trace = np.add.reduceat(m2, bounds[:-1])
        dead = np.logical_and.reduceat(const, bounds[:-1]) | (np.diagonal(sq) == 0.0)
        cka = cka_from_terms(sq, trace, n, dead=dead)
        cka_d = cka_from_terms(sq, trace, n, dead=dead, q=q.cpu().numpy())
    info = {
        "method": "blocked-components",
        "exact_up_to_ct": float(ct_max),
        "rows": int(n),
        "n_neurons": int(n_feat),
        "panels": n_panels,
        "panel_rows": plan.panel,
        "resident_rows": bool(plan.resident),
        "passes_over_store": rows.passes + 1,
        "screen": compute,
        "edges": int(comps.n_edges),
        "n_components_multi": len(members),
        "largest_component": largest,
        "planned_bytes": int(plan.peak_bytes),
        "linkage_bytes_largest_component": int(need),
    }
    return WideResult(Z, cka, cka_d, info)


def _add_cka_terms(
    acc: torch.Tensor,
    i0: int,
    bounds: np.ndarray,
    layer_of: np.ndarray,
    sq_upper: np.ndarray,
    diag_sq: np.ndarray,
) -> None:
    """Add Σ C_ij² of this panel's upper-triangle entries per (row layer, column layer)."""
    n_rows = acc.shape[0]
    diag = torch.diagonal(acc[:, :n_rows]).cpu().numpy()
    np.add.at(diag_sq, layer_of[i0 : i0 + n_rows], diag**2)
    col_starts = np.maximum(bounds[:-1], i0) - i0
    col_layers = np.flatnonzero(bounds[1:] > i0)
    starts = col_starts[col_layers].tolist()
    spans = list(zip(starts, starts[1:] + [acc.shape[1]], strict=True))
    step = 256
    for r0 in range(0, n_rows, step):
        blk = acc[r0 : r0 + step].square()  # (≤ step, columns i0..N): one block row at a time
        per_col = torch.stack([blk[:, a:b].sum(dim=1) for a, b in spans], dim=1).cpu().numpy()
        rows_layer = layer_of[i0 + r0 : i0 + r0 + blk.shape[0]]
        for a in np.unique(rows_layer):
            sq_upper[a, col_layers] += per_col[rows_layer == a].sum(axis=0)


def _n_columns(source: Any, columns: np.ndarray | None) -> int:
    if columns is not None:
        return max(1, len(columns))
    n = getattr(source, "n_neurons", None)
    if n is None:
        shape = getattr(source, "shape", None)
        n = shape[1] if shape is not None and len(shape) == 2 else 1
    return max(1, int(n))


def _component_batches(members: list[np.ndarray], n_rows: int, budget: float) -> list[list[int]]:
    """Components grouped so that each group's co-moments and gathered rows fit the budget."""
    batches: list[list[int]] = []
    used = 0.0
    for k, m in enumerate(members):
        cost = _LINKAGE_BYTES_PER_PAIR * m.size**2 + 4 * n_rows * m.size
        if batches and used + cost <= budget / 2:
            batches[-1].append(k)
            used += cost
        else:
            batches.append([k])
            used = cost
    return batches


def _component_linkages(
    rows: _Rows,
    members: list[np.ndarray],
    n_rows: int,
    scale: np.ndarray,
    const: np.ndarray,
    signed: bool,
    budget: float,
    dev: torch.device,
    say: Callable[[str], None],
) -> list[np.ndarray]:
    """scipy average linkage of every component, its correlations recomputed from its columns."""
    from lexp.redundancy.clustering import condensed_distance

    trees: list[np.ndarray] = [np.empty((0, 4))] * len(members)
    batches = _component_batches(members, n_rows, budget)
    with exact_float32_matmul(), torch.inference_mode():
        for batch in batches:
            union = np.concatenate([members[k] for k in batch])
            ends = np.cumsum([members[k].size for k in batch]).tolist()
            spans = list(zip([0, *ends[:-1]], ends, strict=True))  # each component's gathered columns
            accs = [torch.zeros((b - a, b - a), dtype=torch.float64, device=dev) for a, b in spans]
            for x in rows.exact(union):
                for acc, (a, b) in zip(accs, spans, strict=True):
                    xs = x[:, a:b]
                    acc.add_(xs.T @ xs)
            for k, acc in zip(batch, accs, strict=True):
                m = members[k]
                c = acc.cpu().numpy()
                s = scale[m]
                corr = c / s[:, None] / s[None, :]
                dead = const[m]
                corr[dead, :] = 0.0
                corr[:, dead] = 0.0
                np.clip(corr, -1.0, 1.0, out=corr)
                np.fill_diagonal(corr, 1.0)
                trees[k] = scipy_linkage(condensed_distance(corr, signed), method="average")
            say(
                f"average linkage on {len(batch)} components ({sum(members[k].size for k in batch):,} neurons)"
            )
    return trees


def merge_component_linkages(
    n: int, members: Sequence[np.ndarray], trees: Sequence[np.ndarray], top: float
) -> np.ndarray:
    """One scipy linkage matrix of all ``n`` neurons from the linkage of every component.

    The merges of all components are ordered by height (stably, so each component keeps its own
    order) and renumbered; then the component roots and the neurons outside every component are
    joined in a chain at height ``top`` (the largest distance), above every real merge. Cutting at
    a ct below the threshold the components were built at gives each component's own flat clusters.
    """
    heights, owner, row = [], [], []
    for k, Z in enumerate(trees):
        heights.append(Z[:, 2])
        owner.append(np.full(len(Z), k))
        row.append(np.arange(len(Z)))
    if heights:
        h, o, r = np.concatenate(heights), np.concatenate(owner), np.concatenate(row)
    else:
        h = o = r = np.empty(0, dtype=np.int64)
    order = np.lexsort((r, o, h))
    out = np.empty((n - 1, 4), dtype=np.float64)
    new_id = [np.empty(len(Z), dtype=np.int64) for Z in trees]
    for pos, (k, i) in enumerate(zip(o[order], r[order], strict=True)):
        new_id[k][i] = n + pos
    in_tree = np.zeros(n, dtype=bool)
    for pos, (k, i) in enumerate(zip(o[order], r[order], strict=True)):
        Z, m = trees[k], members[k]
        size = m.size
        a, b = (int(v) for v in Z[i, :2])
        ga = m[a] if a < size else new_id[k][a - size]
        gb = m[b] if b < size else new_id[k][b - size]
        out[pos] = (min(ga, gb), max(ga, gb), Z[i, 2], Z[i, 3])
    roots: list[tuple[int, int]] = []  # (node id, count)
    for k, m in enumerate(members):
        in_tree[m] = True
        roots.append((int(new_id[k][-1]) if len(trees[k]) else int(m[0]), int(m.size)))
    roots += [(int(v), 1) for v in np.flatnonzero(~in_tree)]
    roots.sort()
    pos = len(order)
    if roots:
        node, count = roots[0]
        for other, c in roots[1:]:
            count += c
            out[pos] = (min(node, other), max(node, other), float(top), count)
            node = n + pos
            pos += 1
    assert pos == n - 1, (pos, n)
    return out
