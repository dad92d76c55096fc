"""The memory plan of a run, printed before any work and checked against ``analysis.max_memory_gb``.

Widths grow from 9,984 neurons (BERT-base) to 135,168 (an 8B decoder); the exact general
analysis needs ≈ 16·N² bytes. Before a model is loaded or a store built, :func:`make_plan`
states the store bytes per split, the peak memory each stage of the requested analysis will need
at this width and what the machine has, and picks the general analysis' method (exact below the
budget, blocked above it). A plan that does not fit is one :class:`LexpInputError` naming the
numbers and the settings that would make it fit. Pure arithmetic: no torch, no model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lexp.errors import LexpInputError

GB = 1e9
#: Share of the memory available at start that the default budget uses (the rest: the process
#: itself, the model during extraction, other users of a shared machine).
DEFAULT_SHARE = 0.85


def exact_peak_bytes(n_neurons: int, chunk_rows: int) -> int:
    """Memory of the exact (dense) path: the float64 co-moment, reused as the correlations, the
    float32 product buffer of the pass, scipy's condensed distances and their working copy
    (≈ 16·N² bytes in all), plus the chunk buffers (two float32 chunks)."""
    n = int(n_neurons)
    return 16 * n * n + 8 * int(chunk_rows) * n


@dataclass(frozen=True)
class BlockPlan:
    """How the blocked path uses its budget: resident rows or a stream, the panel height."""

    resident: bool
    panel: int
    chunk_rows: int
    peak_bytes: int


def bounded_chunk_rows(chunk_rows: int, n_neurons: int, budget: float, n_rows: int | None = None) -> int:
    """Rows per read of the store: at most ``chunk_rows`` (and ``n_rows``), and at most what keeps a
    float32 chunk and its centred copy (8 bytes a value) within a quarter of ``budget``; at least 64."""
    limits = [int(chunk_rows), int(budget / 4 / (8 * max(1, int(n_neurons))))]
    if n_rows is not None:
        limits.append(int(n_rows))
    return max(64, min(limits))


def blocked_plan(n_rows: int, n_neurons: int, budget: float, chunk_rows: int, compute: str) -> BlockPlan:
    """Resident centred rows when they take at most half of ``budget``; chunks of at most an eighth
    of it (a float32 read and its centred copy); panels of at most a quarter of it (and 2 GB:
    beyond that a panel only adds memory, not speed)."""
    n = int(n_neurons)
    item = 2 if compute == "bfloat16" else 4
    data = int(n_rows) * n * item
    resident = data <= budget / 2
    rows = bounded_chunk_rows(chunk_rows, n, budget, n_rows)
    chunk_bytes = 8 * rows * n  # the float32 chunk as read and its centred copy
    stream_bytes = data + chunk_bytes if resident else chunk_bytes
    panel_bytes = max(min(budget / 4, 2 * GB), 0)
    # per panel row: float64 accumulator + float32 product + float64 |corr| temp over ≤ N columns
    panel = int(max(64, min(n, panel_bytes // (20 * n))))
    return BlockPlan(resident, panel, rows, int(stream_bytes + 20 * panel * n))


def blocked_peak_bytes(n_rows: int, n_neurons: int, budget: float, chunk_rows: int, compute: str) -> int:
    """Memory of the blocked path before the component linkage (which is checked when it is known)."""
    return blocked_plan(n_rows, n_neurons, budget, chunk_rows, compute).peak_bytes


def machine_memory() -> dict[str, int]:
    """Total and currently available RAM in bytes (psutil; /proc/meminfo semantics)."""
    import psutil

    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "available": int(vm.available)}


def memory_budget(value: Any, machine: Mapping[str, int] | None = None) -> float:
    """``analysis.max_memory_gb`` in bytes; null: DEFAULT_SHARE of the RAM available now."""
    if value is not None:
        return float(value) * GB
    machine = machine or machine_memory()
    return DEFAULT_SHARE * machine["available"]


def store_nbytes(rows: int, n_neurons: int, dtype: str) -> int:
    return int(rows) * int(n_neurons) * (2 if str(dtype) == "float16" else 4)


def probe_bytes(widths: list[int], n_classes: int, eval_rows: int = 2048) -> int:
    """Heads trained in one pass: weights, gradients and two Adam moments (float32) per head, plus
    one float32 evaluation batch of the widest head (the training batches are smaller)."""
    c = max(int(n_classes), 1)
    return sum(16 * w * c for w in widths) + 8 * eval_rows * max(widths)


@dataclass
class Plan:
    """What :func:`make_plan` decided: stage → bytes, the general method and the budget."""

    budget: float
    machine: dict[str, int]
    n_neurons: int
    stores: dict[str, int]
    stages: dict[str, int] = field(default_factory=dict)
    general_method: str | None = None
    #: peak of the blocked general path when the exact one was asked for (for the error's fix)
    blocked_alternative: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": int(self.budget),
            "machine": self.machine,
            "n_neurons": self.n_neurons,
            "store_bytes": self.stores,
            "peak_bytes": self.stages,
            "general_method": self.general_method,
        }

    def lines(self) -> list[str]:
        out = [
            f"plan: {self.n_neurons:,} neurons; machine {self.machine['total'] / GB:.1f} GB RAM, "
            f"{self.machine['available'] / GB:.1f} GB available; budget {self.budget / GB:.2f} GB "
            "(analysis.max_memory_gb)"
        ]
        out += [f"plan: store {split}: {b / GB:.3f} GB on disk" for split, b in self.stores.items()]
        out += [f"plan: {stage}: peak ≈ {b / GB:.3f} GB" for stage, b in self.stages.items()]
        if self.general_method:
            out.append(f"plan: general clustering method: {self.general_method}")
        return out


def general_method(
    requested: str, rows: int, n_neurons: int, budget: float, chunk_rows: int, compute: str
) -> tuple[str, int]:
    """(method, peak bytes) of the general analysis: ``exact`` when it takes at most half the budget
    (or is asked for), ``blocked`` otherwise (or when asked for). Half, not all: the dense path's
    16·N² bytes at the edge of the machine (20 GB at 34,816 neurons on a 24 GB machine) leave
    nothing for the memory-mapped stores, the probes or other jobs, while the blocked path gives the
    same clusters (exact for every ct ≤ ct_max) in a few GB. BERT-base's 9,984 neurons (1.6 GB)
    stay exact on any machine with 4 GB free."""

    exact = exact_peak_bytes(n_neurons, min(chunk_rows, rows))
    if requested == "exact" or (requested == "auto" and exact <= budget / 2):
        return "exact", exact
    return "blocked", blocked_peak_bytes(rows, n_neurons, budget, chunk_rows, compute)


def make_plan(
    cfg: Any,
    *,
    rows: Mapping[str, int],
    n_layers: int,
    hidden: int,
    n_classes: int,
    machine: Mapping[str, int] | None = None,
) -> Plan:
    """The plan of one run (see module docstring); raises when it does not fit."""
    analysis = cfg.analysis
    machine = dict(machine or machine_memory())
    budget = memory_budget(analysis.get("max_memory_gb"), machine)
    n = int(n_layers) * int(hidden)
    dtype = str(cfg.store.dtype)
    plan = Plan(budget, machine, n, {s: store_nbytes(r, n, dtype) for s, r in rows.items()})
    name = str(analysis.name)
    if name != "compare":
        plan.stages["probes (oracle)"] = probe_bytes([n], n_classes)
    if name == "layers":
        plan.stages["probes (oracle, per layer, layers 0..k)"] = probe_bytes(
            [n] + [hidden] * n_layers + [hidden * (k + 1) for k in range(n_layers)], n_classes
        )
    if name == "pipeline":  # the probes on layers 0..k train in the oracle's pass
        plan.stages["probes (oracle, layers 0..k)"] = probe_bytes(
            [n] + [hidden * (k + 1) for k in range(n_layers - 1)], n_classes
        )
    if name in ("neurons", "pipeline"):  # one round of the minimal-set search, at worst all N wide
        plan.stages["probes (minimal-set search, one round)"] = probe_bytes(
            [n] * int(analysis.get("batch", 16)), n_classes
        )
    if name in ("general", "pipeline"):
        split = str(analysis.get("split", "train"))
        n_rows = int(rows.get(split, max(rows.values())))
        if analysis.get("max_rows"):
            n_rows = min(n_rows, int(analysis.max_rows))
        method, peak = general_method(
            str(analysis.get("method", "auto")),
            n_rows,
            n,
            budget,
            int(analysis.chunk_rows),
            str(analysis.compute),
        )
        plan.general_method = method
        if method == "exact":
            plan.blocked_alternative = blocked_peak_bytes(
                n_rows, n, budget, int(analysis.chunk_rows), str(analysis.compute)
            )
        plan.stages[f"general ({method})"] = peak
        if method == "blocked" and str(analysis.get("representative", "random")) == "medoid":
            raise LexpInputError(
                f"analysis.representative=medoid needs the dense N × N correlations, which do not fit "
                f"analysis.max_memory_gb={budget / GB:.2f} at {n:,} neurons. Fix: analysis.representative=random, "
                "or raise analysis.max_memory_gb"
            )
    if name == "layerdrop":
        # float64 Gram blocks X_lᵀX_l and X_lᵀX_l+1, plus two float32 chunks of 8,192 rows
        plan.stages["layerdrop (adjacent-layer Grams)"] = (
            2 * n_layers - 1
        ) * 8 * hidden * hidden + 8 * 8192 * n
    _check(plan, n_layers, hidden)
    return plan


def _check(plan: Plan, n_layers: int, hidden: int) -> None:
    over = {stage: b for stage, b in plan.stages.items() if b > plan.budget}
    if not over:
        return
    stage, need = max(over.items(), key=lambda kv: kv[1])
    fixes = [f"analysis.max_memory_gb={math.ceil(need / GB * 1.1)}"]
    blocked = plan.blocked_alternative
    if stage.startswith("probes (minimal-set search"):
        fixes.append("a smaller analysis.batch (probes trained per round of the search)")
    if stage.startswith("general (exact)") and blocked is not None and blocked <= plan.budget:
        fixes.insert(0, f"analysis.method=auto (the blocked path needs ≈ {blocked / GB:.2f} GB)")
    raise LexpInputError(
        f"the run does not fit in memory: {stage} needs ≈ {need / GB:.2f} GB at {plan.n_neurons:,} neurons "
        f"({n_layers} layers × {hidden}), the budget is {plan.budget / GB:.2f} GB (machine: "
        f"{plan.machine['available'] / GB:.1f} GB available of {plan.machine['total'] / GB:.1f} GB). "
        f"Fix: {' or '.join(fixes)}"
    )
