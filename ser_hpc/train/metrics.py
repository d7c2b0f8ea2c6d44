"""Classification metrics over the six EmoSPeech classes."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from ..data.labels import LABELS, NUM_CLASSES

_ALL = list(range(NUM_CLASSES))


def macro_f1(labels, preds) -> float:
    """Macro-F1 over all six classes (the challenge metric); absent classes count as 0."""
    return float(f1_score(labels, preds, labels=_ALL, average="macro", zero_division=0))


def per_class_f1(labels, preds) -> dict[str, float]:
    scores = f1_score(labels, preds, labels=_ALL, average=None, zero_division=0)
    return {name: float(s) for name, s in zip(LABELS, scores)}


def confusion(labels, preds) -> list[list[int]]:
    """Rows are true classes, columns predictions, in label order."""
    return confusion_matrix(labels, preds, labels=_ALL).astype(int).tolist()


def summarize(labels: np.ndarray, probs: np.ndarray) -> dict:
    preds = probs.argmax(axis=1)
    return {"macro_f1": macro_f1(labels, preds), "per_class_f1": per_class_f1(labels, preds),
            "confusion_matrix": confusion(labels, preds)}
