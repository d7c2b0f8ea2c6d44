"""Rendering prediction results: the output CSV and the text printed for a person."""
from __future__ import annotations

import csv
import io

from .predictor import PredictionResult


def predictions_csv(result: PredictionResult) -> str:
    """``id,label,<one probability column per class>`` for every labelled row, in input order.

    Rows that could not be labelled are left out (they are reported separately), so the
    file stays a valid submission; the columns hold the ensemble's scores (vote shares for
    a vote ensemble), exactly like the ensemble's own dev_probs.csv.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", *result.labels])
    for i in result.labelled:
        w.writerow([result.rows[i].id, result.labels[result.pred[i]], *(f"{p:.6f}" for p in result.probs[i])])
    return buf.getvalue()


def metrics_text(result: PredictionResult) -> str | None:
    m = result.metrics()
    if m is None:
        return None
    lines = [f"macro-F1 {m['macro_f1']:.4f} on {m['n']} labelled row(s)", "per-class F1:"]
    lines += [f"  {name:<8} " + ("absent" if f1 is None else f"{f1:.4f}") for name, f1 in m["per_class_f1"].items()]
    return "\n".join(lines)


def single_clip_text(result: PredictionResult) -> str:
    i = 0
    lines = [f"label: {result.labels[result.pred[i]]}"]
    lines += [f"  {name:<8} {p:.4f}" for name, p in zip(result.labels, result.probs[i])]
    if result.windows[i] > 1:
        lines.append(f"({result.windows[i]} windows averaged)")
    return "\n".join(lines)


def errors_text(result: PredictionResult) -> str:
    lines = [f"predict: {len(result.errors)} row(s) not labelled:"]
    lines += [f"  {result.rows[i].where()}: {why}" for i, why in result.errors.items()]
    return "\n".join(lines)
