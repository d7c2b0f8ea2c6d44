"""Combine member probabilities: alignment by id, probability averaging, majority vote."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ser_hpc.ensemble.collect import AggregateError, ProbTable
from ser_hpc.ensemble.settings import METHODS


def _preview(ids: set[str], n: int = 10) -> str:
    shown = sorted(ids)[:n]
    return ", ".join(shown) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def stack(tables: Sequence[ProbTable], run_ids: Sequence[str], split: str = "dev") -> tuple[ProbTable, np.ndarray]:
    """Align members by id: (reference table, probs array of shape (members, n, classes)).

    Rows follow the first member's order.  Members scored on different id sets (or with
    different gold labels) were evaluated on different data: averaging them would be
    silently wrong, so that is an error naming the run and the differing ids.
    """
    ref, ref_id = tables[0], run_ids[0]
    ref_set = set(ref.ids)
    out = []
    for tab, run_id in zip(tables, run_ids):
        if tab.labels != ref.labels:
            raise AggregateError(f"{split}_probs.csv classes differ: run {run_id} has {', '.join(tab.labels)}, "
                                 f"{ref_id} has {', '.join(ref.labels)}; runs of one ensemble must share data.labels")
        ids = set(tab.ids)
        if ids != ref_set:
            parts = []
            if ids - ref_set:
                parts.append(f"has ids not in {ref_id}: {_preview(ids - ref_set)}")
            if ref_set - ids:
                parts.append(f"lacks ids of {ref_id}: {_preview(ref_set - ids)}")
            raise AggregateError(f"{split}_probs.csv id sets differ: run {run_id} " + "; ".join(parts))
        pos = {i: k for k, i in enumerate(tab.ids)}
        order = [pos[i] for i in ref.ids]
        gold = [tab.gold[k] for k in order]
        if ref.has_gold and tab.has_gold and gold != ref.gold:
            bad = {i for i, a, b in zip(ref.ids, ref.gold, gold) if a != b}
            raise AggregateError(f"{split}_probs.csv gold labels differ: run {run_id} vs {ref_id} "
                                 f"on ids {_preview(bad)}")
        out.append(tab.probs[order])
    return ref, np.stack(out)


def combine(member_probs: np.ndarray, method: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, C), predicted class ids (n,)) from stacked member probs (m, n, C).

    mean: scores are the averaged probabilities, prediction their argmax.
    vote: each member votes for its argmax; scores are the vote shares (so the written
    CSV reflects the method); ties are broken by the mean probability, then by the lowest
    class id (np.argmax returns the first maximum), so the result is deterministic.
    """
    if method not in METHODS:
        raise AggregateError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")
    mean = member_probs.mean(axis=0)
    if method == "mean":
        return mean, mean.argmax(axis=1)
    votes = np.zeros(mean.shape, dtype=np.int64)
    rows = np.arange(mean.shape[0])
    for probs in member_probs:
        votes[rows, probs.argmax(axis=1)] += 1
    tied = votes == votes.max(axis=1, keepdims=True)
    pred = np.where(tied, mean, -np.inf).argmax(axis=1)
    return votes / len(member_probs), pred
