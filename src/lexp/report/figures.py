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


def layer_names(n_layers: int) -> list[str]:
    return ["emb"] + [str(i) for i in range(1, n_layers)]


def cka_heatmap(cka: np.ndarray, path: Path, title: str) -> Path:
    """Figure 1: pairwise linear CKA between layers (brighter = more similar)."""
    n = cka.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
    im = ax.imshow(cka, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(n), layer_names(n))
    ax.set_yticks(range(n), layer_names(n))
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
) -> Path:
    """Figure 4 / Table 7: per-layer (and incremental 0..k) probe scores against the oracle line."""
    n = len(per_layer)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(n)
    redundant = np.asarray(per_layer) >= threshold * oracle
    ax.bar(
        x, np.asarray(per_layer) * 100, color=np.where(redundant, "tab:green", "tab:gray"), label="layer l"
    )
    if incremental is not None:
        ax.plot(x, np.asarray(incremental) * 100, "o-", color="tab:purple", label="layers 0..l")
    ax.axhline(oracle * 100, color="k", ls="--", lw=1, label="oracle")
    ax.axhline(threshold * oracle * 100, color="tab:red", ls=":", lw=1, label=f"{threshold:.0%} of oracle")
    ax.set_xticks(x, layer_names(n))
    lo = min(min(per_layer), min(incremental) if incremental else 1.0)
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
