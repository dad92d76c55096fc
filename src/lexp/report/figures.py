"""Figures of the paper as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_names(n_layers: int | Sequence[int]) -> list[str]:
    """Tick labels: ``emb, 1, 2, ...`` for ``n_layers`` layers, or the model's layer numbers of a
    subset (``model.layers``: block j is the model's layer ``layers[j]``)."""
    ids = range(n_layers) if isinstance(n_layers, int) else n_layers
    return ["emb" if int(i) == 0 else str(int(i)) for i in ids]


def cka_heatmap(cka: np.ndarray, path: Path, title: str, layers: Sequence[int] | None = None) -> Path:
    """Figure 1: pairwise linear CKA between layers (brighter = more similar); ``layers``: the
    model's layer number of each row (a ``model.layers`` subset)."""
    n = cka.shape[0]
    names = layer_names(n if layers is None else layers)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
    im = ax.imshow(cka, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if n <= 14:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cka[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def reduction_vs_score(
    cts: Sequence[float],
    pct_removed: Sequence[float],
    scores: Sequence[float],
    oracle: float,
    path: Path,
    title: str,
) -> Path:
    """Figure 2: score and % neurons removed against the clustering threshold ct."""
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(cts, np.asarray(scores) * 100, "o-", color="tab:blue", label="probe on representatives")
    ax1.axhline(oracle * 100, color="tab:blue", ls="--", lw=1, label="oracle")
    ax1.set_xlabel("clustering threshold ct")
    ax1.set_ylabel("dev score (%)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.bar(cts, pct_removed, width=0.05, alpha=0.3, color="tab:orange", label="% neurons removed")
    ax2.set_ylabel("% neurons removed", color="tab:orange")
    ax2.set_ylim(0, 100)
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title(title)
    return _save(fig, path)


def cluster_makeup_bars(makeup: Mapping[float, Mapping[str, float]], path: Path, title: str) -> Path:
    """Figure 3: % of clusters within one layer, adjacent layers, within three, further apart."""
    keys = list(next(iter(makeup.values())).keys()) if makeup else []
    cts = sorted(makeup)
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(cts), 4))
    for i, key in enumerate(keys):
        values = [makeup[ct].get(key, 0.0) for ct in cts]
        ax.bar(np.arange(len(cts)) + i * width, values, width, label=key.replace("_", " "))
    ax.set_xticks(np.arange(len(cts)) + 0.4 - width / 2, [f"ct={ct:g}" for ct in cts])
    ax.set_ylabel("% of multi-neuron clusters")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_scores(
    per_layer: Sequence[float],
    incremental: Sequence[float] | None,
    oracle: float,
    threshold: float,
    path: Path,
    title: str,
    control: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
) -> Path:
    """Figure 4 / Table 7: per-layer (and incremental 0..k) probe scores against the oracle line.

    ``control`` (``task.control``): the per-layer control-task scores, drawn as a line so that
    selectivity is the visible gap between a bar and the line below it."""
    n = len(per_layer)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(n)
    redundant = np.asarray(per_layer) >= threshold * oracle
    ax.bar(
        x, np.asarray(per_layer) * 100, color=np.where(redundant, "tab:green", "tab:gray"), label="layer l"
    )
    if incremental is not None:
        ax.plot(x, np.asarray(incremental) * 100, "o-", color="tab:purple", label="layers 0..l")
    if control is not None:
        ax.plot(x, np.asarray(control) * 100, "x-", color="tab:orange", label="control task (layer l)")
    ax.axhline(oracle * 100, color="k", ls="--", lw=1, label="oracle")
    ax.axhline(threshold * oracle * 100, color="tab:red", ls=":", lw=1, label=f"{threshold:.0%} of oracle")
    ax.set_xticks(x, layer_names(n if layers is None else layers))
    lo = min(min(per_layer), min(incremental) if incremental else 1.0, min(control) if control else 1.0)
    ax.set_ylim(max(0, lo * 100 - 5), 100)
    ax.set_xlabel("layer")
    ax.set_ylabel("dev score (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def curve(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Mapping[str, float] | None = None,
    logx: bool = False,
) -> Path:
    """A generic line plot (minimal-set search, timings against features or tokens)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs[: len(ys)], ys, "o-", label=name, ms=3)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, label=name, color="gray")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------ cross-run figures (lexp.report)
def ct_curves(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float | None]]]],
    path: Path,
    title: str,
    score_label: str,
) -> Path:
    """Figure 2 across tasks: score (top) and % neurons removed (bottom) against ct, one line per task,
    one column per model (``curves[model][task] = (cts, pct_removed, scores)``, scores as fractions)."""
    models = list(curves)
    fig, axes = plt.subplots(
        2, len(models), figsize=(1.5 + 4.5 * len(models), 6.5), sharex=True, sharey="row", squeeze=False
    )
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        for task, (cts, removed, scores) in curves[model].items():
            ys = [np.nan if s is None else 100 * float(s) for s in scores]
            (line,) = top.plot(cts, ys, "o-", ms=3, label=task)
            bottom.plot(cts, removed, "o-", ms=3, color=line.get_color(), label=task)
        top.set_title(model)
        top.set_ylabel(score_label if col == 0 else "")
        bottom.set_ylabel("% neurons removed" if col == 0 else "")
        bottom.set_xlabel("clustering threshold ct")
        bottom.set_ylim(0, 100)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    return _save(fig, path)


def layer_curves(
    series: Mapping[str, Mapping[str, Sequence[float | None] | float | None]],
    path: Path,
    title: str,
    score_label: str,
) -> Path:
    """Figure 4 for one task across models: the probe score of each layer, one line per model.

    ``series[label]`` holds ``scores`` (fractions, layer 0 = embeddings), optional ``std`` (error
    bars), ``oracle`` (dashed line in the same colour) and ``control`` (control-task scores, dotted).
    Models of different depth share the x axis by layer index.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4))
    depth = 0
    for label, data in series.items():
        scores = [np.nan if s is None else 100 * float(s) for s in data["scores"]]  # type: ignore[union-attr]
        depth = max(depth, len(scores))
        x = np.arange(len(scores))
        std = data.get("std")
        if std is not None and any(s is not None for s in std):  # type: ignore[union-attr]
            err = [0.0 if s is None else 100 * float(s) for s in std]  # type: ignore[union-attr]
            line = ax.errorbar(x, scores, yerr=err, fmt="o-", ms=3, capsize=2, label=label).lines[0]
        else:
            (line,) = ax.plot(x, scores, "o-", ms=3, label=label)
        oracle = data.get("oracle")
        if oracle is not None:
            ax.axhline(100 * float(oracle), ls="--", lw=1, color=line.get_color(), label=f"{label}: oracle")
        control = data.get("control")
        if control is not None and any(c is not None for c in control):  # type: ignore[union-attr]
            ys = [np.nan if c is None else 100 * float(c) for c in control]  # type: ignore[union-attr]
            ax.plot(np.arange(len(ys)), ys, ":", color=line.get_color(), label=f"{label}: control task")
    ax.set_xticks(range(depth), layer_names(depth))
    ax.set_xlabel("layer")
    ax.set_ylabel(score_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def cka_cross_heatmap(
    cka: np.ndarray,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    row_layers: Sequence[int] | None = None,
    col_layers: Sequence[int] | None = None,
) -> Path:
    """Cross-model CKA: layer i of model A (rows) against layer j of model B (columns)."""
    cka = np.asarray(cka, dtype=float)
    rows, cols = cka.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * cols, 0.9 + 0.5 * rows))
    im = ax.imshow(cka, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(cols), layer_names(cols if col_layers is None else col_layers))
    ax.set_yticks(range(rows), layer_names(rows if row_layers is None else row_layers))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if max(rows, cols) <= 14:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{cka[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    path: Path,
    title: str,
    ylabel: str,
) -> Path:
    """One bar per series (model) in each category (task), values printed on the bars; None = no bar."""
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.6 * len(categories) * max(1, len(series))), 4))
    x = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        ys = np.array([np.nan if v is None else float(v) for v in values])
        bars = ax.bar(x + i * width, np.nan_to_num(ys), width, label=name)
        for bar, y in zip(bars, ys, strict=True):
            if np.isfinite(y):
                ax.annotate(
                    f"{y:g}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7
                )
    ax.set_xticks(x + width * (len(series) - 1) / 2, list(categories))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_redundancy(
    block_influence: Sequence[float],
    angular: Mapping[str, Sequence[float]],
    cka_adjacent: Sequence[float],
    path: Path,
    title: str,
) -> Path:
    """analysis=layerdrop: Block Influence, angular distance d(ℓ, ℓ+n) and adjacent CKA per block."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    blocks = np.arange(len(block_influence))
    axes[0].bar(blocks, block_influence, color="tab:red")
    axes[0].set_title("Block Influence 1 − cos(h_ℓ, h_ℓ+1)")
    for g, values in angular.items():
        axes[1].plot(np.arange(len(values)), values, "o-", ms=3, label=f"n={g}")
    axes[1].set_title("angular distance d(h_ℓ, h_ℓ+n)")
    axes[1].legend(fontsize=7)
    axes[2].plot(blocks, cka_adjacent, "s-", color="tab:green")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("linear CKA(h_ℓ, h_ℓ+1)")
    for ax in axes:
        ax.set_xlabel("block ℓ (input = hidden state ℓ; 0 = embeddings)")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
