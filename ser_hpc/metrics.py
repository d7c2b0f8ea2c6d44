"""Macro-F1, per-class F1 and confusion matrix over the fixed 6-label set.

labels=range(6) is passed everywhere so a class absent from a split (fear has 23 train
examples, so a small dev split may hold none) still counts in the macro average exactly
like the challenge scorer does, and the confusion matrix is always 6x6.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, recall_score

from ser_hpc.data.labels import LABELS

_IDS = list(range(len(LABELS)))


def score(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    """{"macro_f1", "per_class_f1": {label: f1}, "confusion_matrix": rows true, cols predicted}."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    per_class = f1_score(y_true, y_pred, labels=_IDS, average=None, zero_division=0)
    present = sorted(set(y_true.tolist()))
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=_IDS, average="macro", zero_division=0)),
        # UA (unweighted average recall over the classes present) and WA (accuracy), as EmoBox reports
        "ua": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if present else 0.0,
        "wa": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "per_class_f1": {name: float(f) for name, f in zip(LABELS, per_class)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=_IDS).astype(int).tolist(),
    }
