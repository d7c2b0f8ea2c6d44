"""Confusion-matrix figure: raw counts and row-normalised (recall per true class) side by side.

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


def plot_confusion(cm: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str = "") -> None:
    counts = np.asarray(cm, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    # Rows with no true example (a class absent from the split) stay at 0 instead of NaN.
    norm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
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
    buf = io.BytesIO()
    # No Software/date metadata, so a rerun writes the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())
