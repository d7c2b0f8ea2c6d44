"""Macro-F1, UA, WA, per-class F1 and the confusion matrix over a run's class list.

A class with no example in the evaluated split has no defined recall or F1: it is listed
in ``absent`` and left out of the macro average (counting it as 0 would punish a model
for a class nobody asked it about, e.g. a 5-class corpus scored on a 6-class list, or a
small dev split without its rarest class). The confusion matrix always has every class.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, recall_score


def score(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """{"macro_f1", "ua", "wa", "per_class_f1": {label: f1 or None}, "absent": [labels],
    "confusion_matrix": rows true, cols predicted}."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    ids = list(range(len(labels)))
    present = sorted(set(y_true.tolist()))
    per_class = f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if present else 0.0,
        # UA (unweighted average recall over the classes present) and WA (accuracy), as EmoBox reports
        "ua": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)) if present else 0.0,
        "wa": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "per_class_f1": {name: (float(per_class[i]) if i in present else None) for i, name in enumerate(labels)},
        "absent": [labels[i] for i in ids if i not in present],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).astype(int).tolist(),
    }
