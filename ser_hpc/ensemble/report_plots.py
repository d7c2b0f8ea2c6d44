"""The report's figures: best macro-F1 per backbone pair, training curves, per-class F1.

Same rules as plots.py: matplotlib's object API on the Agg canvas (no display, no global
backend state), rendered to memory, written atomically, without date metadata so a rerun
on the same tree writes the same bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ser_hpc.ensemble.plots import figure, save


def pair_bars(names: Sequence[str], dev_f1: Sequence[float], path: Path, title: str) -> None:
    """Horizontal bars, best pair on top, each labelled with its macro-F1 in %."""
    fig = figure(8, max(2.5, 1.2 + 0.5 * len(names)))
    ax = fig.add_subplot(1, 1, 1)
    values = 100 * np.asarray(dev_f1, dtype=float)
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, names)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(100.0, float(values.max(initial=0)) * 1.15))
    ax.set_xlabel("best dev macro-F1 (%)")
    ax.set_title(title)
    save(fig, path)


def training_curves(series: Sequence[dict], path: Path, title: str) -> None:
    """Left: dev macro-F1 vs step. Right: train (solid) and dev (dashed) loss vs step.

    ``series``: dicts with label, step, dev_macro_f1, train_loss, dev_loss (lists; None
    where a value is missing). One colour per run across both panels.
    """
    fig = figure(13, 5)
    f1_ax, loss_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = [f"C{i % 10}" for i in range(len(series))]
    for s, color in zip(series, colors):
        def xy(key):
            pts = [(x, y) for x, y in zip(s["step"], s[key]) if y is not None]
            return ([p[0] for p in pts], [p[1] for p in pts])
        x, y = xy("dev_macro_f1")
        f1_ax.plot(x, [100 * v for v in y], marker="o", ms=3, color=color, label=s["label"])
        loss_ax.plot(*xy("train_loss"), color=color, label=f"{s['label']} (train)")
        loss_ax.plot(*xy("dev_loss"), color=color, ls="--", label=f"{s['label']} (dev)")
    f1_ax.set(xlabel="step", ylabel="dev macro-F1 (%)", title="dev macro-F1")
    loss_ax.set(xlabel="step", ylabel="weighted cross-entropy", title="loss (solid: train, dashed: dev)")
    f1_ax.legend(fontsize=8, loc="lower right")
    for ax in (f1_ax, loss_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save(fig, path)


def per_class_bars(classes: Sequence[str], splits: dict[str, Sequence[float]], path: Path, title: str) -> None:
    """Grouped bars: per-class F1 (%) for each split (dev, and test when known)."""
    fig = figure(9, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(splits))
    for k, (name, values) in enumerate(splits.items()):
        v = 100 * np.asarray(values, dtype=float)
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, v, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 110)
    ax.set_ylabel("F1 (%)")
    ax.legend()
    ax.set_title(title)
    save(fig, path)
