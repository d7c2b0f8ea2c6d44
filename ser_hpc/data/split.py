"""Seeded stratified train/dev split and class weights."""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from .corpus import CorpusError, Example
from .labels import LABELS, NUM_CLASSES


def stratified_split(examples: list[Example], dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split keeping class proportions; the same seed always gives the same split."""
    labels = [ex.label for ex in examples]
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    rare = [LABELS[c] for c in range(NUM_CLASSES) if 0 < counts[c] < 2]
    if rare:
        raise CorpusError(f"cannot stratify: class(es) {', '.join(rare)} have a single example")
    n_dev = int(round(dev_fraction * len(examples)))
    train, dev = train_test_split(examples, test_size=n_dev, random_state=seed, stratify=labels)
    return list(train), list(dev)


def class_weights(labels: list[int], mode: str = "inverse") -> np.ndarray:
    """Inverse class frequency (N / n_c) as in the paper; "sqrt_inverse" takes its square root.

    The loss is a weighted mean, so only the ratios between weights matter: sqrt_inverse is
    a genuinely milder weighting (fear ~5x neutral instead of ~25x on EmoSPeech), not a rescale.
    """
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    if mode == "none":
        return np.ones(NUM_CLASSES)
    empty = [LABELS[c] for c in range(NUM_CLASSES) if counts[c] == 0]
    if empty:
        raise CorpusError(f"no training examples for class(es) {', '.join(empty)}: cannot weight the loss")
    weights = counts.sum() / counts
    if mode == "sqrt_inverse":
        weights = np.sqrt(weights)
    return weights
