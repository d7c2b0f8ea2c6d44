"""Seeded stratified train/dev split and class weights."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from .clips import CorpusError, Example

log = logging.getLogger("ser_hpc.data")


def stratified_split(examples: list[Example], dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split keeping class proportions; the same seed always gives the same split."""
    labels = [ex.label for ex in examples]
    counts = Counter(labels)
    rare = sorted(c for c, n in counts.items() if n < 2)
    if rare:
        ids = [next(ex.id for ex in examples if ex.label == c) for c in rare]
        raise CorpusError(f"cannot stratify the dev split: class id(s) {rare} have a single example ({', '.join(ids)})")
    n_dev = int(round(dev_fraction * len(examples)))
    train, dev = train_test_split(examples, test_size=n_dev, random_state=seed, stratify=labels)
    return list(train), list(dev)


def class_weights(labels: list[int], classes: Sequence[str], mode: str = "inverse", *,
                  configured: bool = True) -> np.ndarray:
    """Inverse class frequency (N / n_c) as in the paper; "sqrt_inverse" takes its square root.

    The loss is a weighted mean, so only the ratios between weights matter: sqrt_inverse is
    a genuinely milder weighting (fear ~5x neutral instead of ~25x on EmoSPeech), not a rescale.
    A class without training examples never appears in the loss: its weight is ignored
    (set to 0) unless the user named it in data.labels (``configured``), then the run is refused.
    """
    n = len(classes)
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    if mode == "none":
        return np.ones(n)
    empty = [classes[c] for c in range(n) if counts[c] == 0]
    if empty and configured:
        raise CorpusError(f"no training examples for class(es) {', '.join(empty)} named in data.labels: cannot "
                          "weight the loss; remove them from data.labels, or set train.class_weights=none")
    if empty:
        log.warning("no training examples for class(es) %s: left out of the class weights", ", ".join(empty))
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    if mode == "sqrt_inverse":
        weights = np.sqrt(weights)
    return weights
