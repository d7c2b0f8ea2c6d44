"""Every done run's probabilities on one split, aligned by id, with bootstrap figures.

A Pool holds the runs scored on the same items as the reference (the best-ranked run
that has the split), stacked (R, n, C) in rank order: what selection picks from and what
every interval and test is computed on. A run scored on other items (another dev split)
cannot be compared item by item, so it is left out with the reason. SplitStats draws one
set of stratified resamples per split and scores every run on it, so any two systems'
bootstrap distributions are paired.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ser_hpc.ensemble.collect import AggregateError, ProbTable, RunRecord, read_probs
from ser_hpc.ensemble.combine import combine, stack
from ser_hpc.ensemble.stats import (bootstrap_distribution, ece, macro_f1_batch, paired_p, percentile_ci,
                                    reliability, stratified_resamples)


@dataclass
class Pool:
    split: str
    run_ids: list[str]
    ref: ProbTable
    probs: np.ndarray                       # (R, n, C), rows in ref order
    errors: dict[str, str] = field(default_factory=dict)   # run_id -> why it is not in the pool

    @property
    def y(self) -> np.ndarray | None:
        return np.asarray(self.ref.gold, dtype=np.int64) if self.ref.has_gold else None

    def rows(self, run_ids: Sequence[str]) -> list[int]:
        pos = {r: i for i, r in enumerate(self.run_ids)}
        return [pos[r] for r in run_ids]


def load_pool(runs: Sequence[RunRecord], split: str) -> Pool | None:
    """The runs (rank order) that have ``<split>_probs.csv`` on the reference's items."""
    tables: dict[str, ProbTable] = {}
    errors: dict[str, str] = {}
    for r in runs:
        path = r.run_dir / f"{split}_probs.csv"
        if not path.is_file():
            continue
        try:
            tables[r.run_id] = read_probs(path)
        except (AggregateError, OSError, UnicodeDecodeError) as exc:
            errors[r.run_id] = str(exc)
    if not tables:
        return None
    ref_id, ref = next(iter(tables.items()))
    ids, probs = [], []
    for run_id, tab in tables.items():
        try:
            probs.append(stack([ref, tab], [ref_id, run_id], split)[1][1])
            ids.append(run_id)
        except AggregateError as exc:
            errors[run_id] = str(exc)
    return Pool(split, ids, ref, np.stack(probs), errors)


class SplitStats:
    """Bootstrap distributions of every pooled run on one labelled split."""

    def __init__(self, pool: Pool, idx: np.ndarray):
        self.pool, self.y, self.idx = pool, pool.y, idx
        self.n_classes = C = pool.probs.shape[-1]
        preds = pool.probs.argmax(axis=-1)
        self.points = macro_f1_batch(self.y, preds, C)                      # (R,)
        self.dists = np.stack([bootstrap_distribution(self.y, p, idx, C) for p in preds])  # (R, B)

    @classmethod
    def of(cls, pool: Pool | None, n_resamples: int, seed: int) -> "SplitStats | None":
        if pool is None or pool.y is None:
            return None
        return cls(pool, stratified_resamples(pool.y, n_resamples, seed))

    def ci(self, run_id: str) -> list[float] | None:
        if run_id not in self.pool.run_ids:
            return None
        return list(percentile_ci(self.dists[self.pool.rows([run_id])[0]]))

    def covers(self, run_ids: Sequence[str]) -> bool:
        return all(r in self.pool.run_ids for r in run_ids)

    def runs_mean(self, run_ids: Sequence[str]) -> tuple[np.ndarray, float]:
        """(distribution, point) of the mean macro-F1 over these runs (a configuration's seeds)."""
        rows = self.pool.rows(run_ids)
        return self.dists[rows].mean(axis=0), float(self.points[rows].mean())

    def system(self, bag: Sequence[str], method: str) -> dict:
        """An ensemble of pooled runs (a bag: repeats weigh): prediction, figure, CI, calibration."""
        scores, pred = combine(self.pool.probs[self.pool.rows(bag)], method)
        dist = bootstrap_distribution(self.y, pred, self.idx, self.n_classes)
        return {"scores": scores, "pred": pred, "macro_f1": float(macro_f1_batch(self.y, pred, self.n_classes)),
                "ci95": list(percentile_ci(dist)), "dist": dist,
                "ece": ece(scores, self.y), "reliability": reliability(scores, self.y)}

    def compare(self, a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> dict:
        return paired_p(a[0], b[0], a[1], b[1])
