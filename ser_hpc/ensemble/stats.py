"""Statistics for the report: bootstrap CIs, a paired test, calibration error, chance level.

Pure functions on integer labels and probability arrays; nothing here reads files.

Macro-F1 averages the classes present in the gold labels (an absent class is left out,
not scored 0), exactly like ser_hpc.metrics.score, so an interval brackets the figure it
belongs to. Resampling is
stratified by gold class: every resample keeps the split's class counts, which matters
when a class has two dev items (one resample without them would score that class 0).
scipy.stats.bootstrap cannot stratify, hence plain numpy. One set of resample indices is
shared by every system on a split, so paired comparisons are differences of two
distributions on the same resamples.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 20240601          # fixed: a rerun reports the same intervals and p-values
ECE_BINS = 15


def macro_f1_batch(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of many predictions at once: y, pred broadcast to (..., n) -> (...)."""
    y, pred = np.broadcast_arrays(np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64))
    lead, n = y.shape[:-1], y.shape[-1]
    m = int(np.prod(lead)) if lead else 1
    rows = np.arange(m, dtype=np.int64)[:, None]
    # One bincount builds all m confusion matrices: code = (row, true, predicted).
    codes = (rows * n_classes + y.reshape(m, n)) * n_classes + pred.reshape(m, n)
    cm = np.bincount(codes.ravel(), minlength=m * n_classes * n_classes).reshape(m, n_classes, n_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=2) + cm.sum(axis=1)           # 2tp + fp + fn = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=float), where=denom > 0)
    present = cm.sum(axis=2) > 0                      # classes with gold items
    n_present = present.sum(axis=1)
    mean = np.divide((f1 * present).sum(axis=1), n_present, out=np.zeros(m), where=n_present > 0)
    return mean.reshape(lead)


def stratified_resamples(y: Sequence[int], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, n) item indices; each row redraws every class's items with replacement."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    cols = []
    for c in np.unique(y):  # sorted, so the draw order (and the result) is reproducible
        pos = np.flatnonzero(y == c)
        cols.append(pos[rng.integers(0, len(pos), size=(n_resamples, len(pos)))])
    return np.concatenate(cols, axis=1) if cols else np.zeros((n_resamples, 0), dtype=np.int64)


def bootstrap_distribution(y: Sequence[int], pred: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 on each resample: pred (n,) -> (B,), or a stack (S, n) -> (S, B)."""
    y, pred = np.asarray(y), np.asarray(pred)
    return macro_f1_batch(y[idx], pred[..., idx], n_classes)


def percentile_ci(dist: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(dist, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(y: Sequence[int], pred: Sequence[int], n_classes: int, n_resamples: int = N_RESAMPLES,
                 level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile CI of macro-F1 under stratified resampling of the items."""
    idx = stratified_resamples(y, n_resamples, seed)
    return percentile_ci(bootstrap_distribution(y, np.asarray(pred), idx, n_classes), level)


def paired_p(dist_a: np.ndarray, dist_b: np.ndarray, point_a: float, point_b: float,
             level: float = LEVEL) -> dict:
    """Two-sided paired bootstrap test of macro-F1(a) - macro-F1(b) on shared resamples.

    Under H0 the observed difference is as extreme as the resampled differences are
    around their own centre (Berg-Kirkpatrick et al. 2012's shifted null), so
    p = (1 + #{|d_b - d| >= |d|}) / (B + 1). Identical systems give d_b = d = 0: p = 1.
    """
    d = np.asarray(dist_a, dtype=float) - np.asarray(dist_b, dtype=float)
    delta = float(point_a - point_b)
    hits = int(np.sum(np.abs(d - delta) >= abs(delta) - 1e-12))
    return {"delta": delta, "p": (1 + hits) / (len(d) + 1), "delta_ci95": list(percentile_ci(d, level))}


def reliability(probs: np.ndarray, y: Sequence[int], n_bins: int = ECE_BINS) -> dict:
    """Per confidence bin ((k/M, (k+1)/M], the first also holds 0): count, mean confidence, accuracy."""
    probs, y = np.asarray(probs, dtype=float), np.asarray(y)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(),
            "confidence": (np.bincount(bins, conf, n_bins) / safe).tolist(),
            "accuracy": (np.bincount(bins, correct, n_bins) / safe).tolist()}


def ece(probs: np.ndarray, y: Sequence[int], n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|."""
    r = reliability(probs, y, n_bins)
    count = np.asarray(r["count"], dtype=float)
    gap = np.abs(np.asarray(r["accuracy"]) - np.asarray(r["confidence"]))
    return float((count * gap).sum() / max(count.sum(), 1))


def chance_macro_f1(y: Sequence[int], n_classes: int) -> dict[str, float]:
    """Macro-F1 of two no-skill baselines on a split with these gold labels.

    uniform: guessing each class with probability 1/C; per class the expected counts are
    tp = n_c/C, fp = (n - n_c)/C, fn = n_c (1 - 1/C), so F1_c = 2 p_c / (1 + C p_c)
    (p_c the class share): the F1 of the expected confusion matrix, within about 0.01 of
    the simulated mean on a few hundred items. majority: always the most frequent class,
    F1 = 2p/(1+p) for it and 0 for every other class.
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(float)
    share = counts / max(counts.sum(), 1)
    present = share[counts > 0]  # absent classes are left out of macro-F1 (metrics.score)
    top = share.max()
    return {"uniform": float(np.mean(2 * present / (1 + n_classes * present))) if len(present) else 0.0,
            "majority": float(2 * top / (1 + top) / max(len(present), 1))}


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None for one value); None when any value is missing."""
    if not values or any(v is None for v in values):
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)
