"""The figure setup of every plot in the results tree (``figure``, ``save``), the
confusion-matrix figure (raw counts and row-normalised, side by side), the reliability diagram and the
heatmap of the benchmark and cross-corpus tables.

Uses matplotlib's object API with the Agg canvas instead of pyplot: no display is needed
on compute nodes, and no global backend state is changed for whoever imports us.  The
PNG is rendered to memory and written atomically like every file in the results tree.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ser_hpc.atomic_io import write_bytes


def figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A figure on the Agg canvas (the one figure setup of every plot in the results tree)."""
    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    """PNG rendered to memory, written atomically; no Software/date metadata, so a rerun
    writes the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())


def plot_confusion(cm: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str = "") -> None:
    counts = np.asarray(cm, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    # Rows with no true example (a class absent from the split) stay at 0 instead of NaN.
    norm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)

    fig = figure(13, 5.5)
    for ax, data, sub, fmt in [(fig.add_subplot(1, 2, 1), counts, "counts", "{:d}"),
                               (fig.add_subplot(1, 2, 2), norm, "row-normalised", "{:.2f}")]:
        vmax = max(float(data.max()), 1e-9)
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(sub)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                value = data[i, j]
                ax.text(j, i, fmt.format(int(value) if fmt == "{:d}" else float(value)), ha="center",
                        va="center", fontsize=9, color="white" if value > 0.6 * vmax else "black")
    if title:
        fig.suptitle(title)
    save(fig, path)


def plot_reliability(splits: dict[str, dict], path: Path, title: str = "") -> None:
    """Reliability diagram per split: accuracy vs mean confidence in equal-width bins.

    ``splits``: name -> stats.reliability() output plus "ece". Bars are the bins'
    accuracy, the dashed line perfect calibration, the red outline the bin's mean
    confidence; narrow dark bars at the bottom show the share of items in each bin.
    """
    # Fixed margins instead of constrained layout: the layout pass would double the cost.
    fig = figure(5 * len(splits), 5, constrained=False)
    fig.subplots_adjust(left=0.1 / len(splits), right=1 - 0.03 / len(splits), bottom=0.11, top=0.86, wspace=0.25)
    for k, (name, rel) in enumerate(splits.items(), 1):
        ax = fig.add_subplot(1, len(splits), k)
        edges = np.asarray(rel["edges"])
        width = np.diff(edges)
        left = edges[:-1]
        count = np.asarray(rel["count"], dtype=float)
        used = count > 0
        ax.bar(left[used], np.asarray(rel["accuracy"])[used], width[used], align="edge", color="tab:blue",
               alpha=0.8, edgecolor="black", linewidth=0.5, label="accuracy", zorder=2)
        ax.bar(left[used], np.asarray(rel["confidence"])[used], width[used], align="edge", fill=False,
               edgecolor="tab:red", linewidth=1.2, label="mean confidence", zorder=3)
        # Narrow dark bars in front, so the share stays visible over the accuracy bars.
        ax.bar(left + width / 2, 0.25 * count / max(count.sum(), 1), width / 3, color="0.25",
               label="share of items (×0.25)", zorder=4)
        ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top score)", ylabel="accuracy",
               title=f"{name}: ECE {100 * rel['ece']:.2f} % ({len(width)} bins, n={int(count.sum())})")
        if k == 1:
            ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title)
    save(fig, path)


def plot_heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], path: Path, title: str,
                 xlabel: str = "corpus") -> None:
    fig = figure(max(4.0, 1.4 * len(cols) + 3), max(2.5, 0.45 * len(rows) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    shown = np.ma.masked_invalid(100 * matrix)
    im = ax.imshow(shown, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{100 * matrix[i, j]:.1f}", ha="center", va="center",
                        color="white" if matrix[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="macro-F1 (%)")
    save(fig, path)
