"""Which runs form the ensemble: top-k by dev macro-F1 (the paper), or greedy forward
selection with replacement (Caruana et al. 2004, "Ensemble selection from libraries of
models").

Every function takes the dev split only, as arrays: candidates' probabilities stacked
(R, n, C) in rank order, and the gold labels. Test data never reaches this module, so
selection cannot peek at it. A selection is a list of candidate indices; greedy may
repeat one, which weights it (a run listed twice counts twice in the mean or the vote).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ser_hpc.ensemble.combine import combine
from ser_hpc.ensemble.stats import macro_f1_batch

GREEDY_MAX_SIZE = 25   # cap on the bag (with repeats)
GREEDY_PATIENCE = 5    # steps without improvement before stopping; macro-F1 moves in steps

Selector = Callable[[np.ndarray, np.ndarray], list[int]]


def single_scores(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Macro-F1 of each candidate alone: (R,)."""
    return macro_f1_batch(y, probs.argmax(axis=-1), probs.shape[-1])


def topk(probs: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """The k best candidates alone; ties keep rank order (a stable sort)."""
    order = np.argsort(-single_scores(probs, y), kind="stable")
    return [int(i) for i in order[:k]]


def greedy(probs: np.ndarray, y: np.ndarray, method: str = "mean", max_size: int = GREEDY_MAX_SIZE,
           patience: int = GREEDY_PATIENCE) -> tuple[list[int], list[float]]:
    """Forward selection with replacement; returns (bag, dev macro-F1 after each step).

    Each step adds the candidate (possibly one already in) whose addition gives the best
    macro-F1 of the combined ensemble, ties to the better-ranked candidate. It goes on
    through up to ``patience`` steps without improvement (a plateau can precede a gain),
    then keeps the shortest prefix with the best score: the ensemble size is chosen on dev.
    """
    n_classes = probs.shape[-1]
    bag: list[int] = []
    trace: list[float] = []
    best, best_len, stale = -np.inf, 0, 0
    for _ in range(max_size):
        # combine() is the very function that builds the final ensemble, so the score a
        # step sees is the score the chosen ensemble reports.
        preds = np.stack([combine(probs[bag + [r]], method)[1] for r in range(len(probs))])
        scores = macro_f1_batch(y, preds, n_classes)
        pick = int(np.argmax(scores))  # first maximum: the better-ranked candidate
        bag.append(pick)
        trace.append(float(scores[pick]))
        if scores[pick] > best + 1e-12:
            best, best_len, stale = float(scores[pick]), len(bag), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return bag[:best_len], trace


def halves(y: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, stratified halves of the items (a class's odd item goes to the first)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(y):
        pos = rng.permutation(np.flatnonzero(y == c))
        cut = (len(pos) + 1) // 2
        first.append(pos[:cut])
        second.append(pos[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def crossfit(probs: np.ndarray, y: np.ndarray, select: Selector, method: str, seed: int) -> dict:
    """Honest dev estimate of a selection rule: choose on one half, score on the other, swap.

    The ensemble's own dev figure is scored on the items that chose it, so it is biased
    upwards; here every score comes from items the choice never saw. (The runs' best
    checkpoints were also picked on dev; that part of the bias cannot be removed here.)
    """
    y = np.asarray(y)
    a, b = halves(y, seed)
    scores, bags = [], []
    for fit, held in ((a, b), (b, a)):
        bag = select(probs[:, fit], y[fit])
        pred = combine(probs[bag][:, held], method)[1]
        scores.append(float(macro_f1_batch(y[held], pred, probs.shape[-1])))
        bags.append(bag)
    return {"macro_f1": float(np.mean(scores)), "halves": scores, "bags": bags}
