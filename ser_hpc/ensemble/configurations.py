"""Configurations: runs that differ only in ``train.seed`` are one configuration.

A single seed can be lucky by a few points on a dev set of a few hundred clips, so
configurations are ranked by their mean dev macro-F1 over seeds and reported as
mean ± std; the runs stay listed one by one in the leaderboard.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.stats import mean_std

SEED_KEY = "train.seed"


@dataclass
class Configuration:
    key: str
    name: str
    runs: list[RunRecord]         # done runs, best dev first
    dev_mean: float
    dev_std: float | None         # None with one seed
    test_mean: float | None       # None unless every run has a test macro-F1
    test_std: float | None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list:
        return [r.overrides.get(SEED_KEY) for r in self.runs]


def config_key(record: RunRecord, without: Sequence[str] = (SEED_KEY,), alone_if_unset: bool = True) -> str:
    """The overrides without the keys in ``without`` (the seed; for fold ensembles also the
    fold); with ``alone_if_unset``, a run that sets none of them is its own configuration."""
    if alone_if_unset and not any(k in record.overrides for k in without):
        return "run:" + record.run_id
    rest = {k: v for k, v in record.overrides.items() if k not in without}
    return json.dumps(rest, sort_keys=True, default=str)


def config_name(record: RunRecord, without: Sequence[str] = (SEED_KEY,)) -> str:
    """The run's name without the ``seed=...`` (and ``fold=...``) words of the keys in ``without``
    (grid run names are "pair key=value ...", a word named by the key's last part)."""
    if not any(k in record.overrides for k in without):
        return record.name
    words = [k.rsplit(".", 1)[-1] for k in without]
    pattern = r"\s*\b(" + "|".join(map(re.escape, words)) + r")=\S+"
    return re.sub(pattern, "", record.name).strip() or record.name


def group_configurations(ranked: Sequence[RunRecord]) -> list[Configuration]:
    """Done runs grouped by configuration, best mean dev macro-F1 first (ties by name)."""
    groups: dict[str, list[RunRecord]] = {}
    for r in ranked:  # ranked best first, so each group's runs stay best first
        groups.setdefault(config_key(r), []).append(r)
    out = []
    for key, runs in groups.items():
        dev_mean, dev_std = mean_std([r.dev_macro_f1 for r in runs])
        test_mean, test_std = mean_std([r.test_macro_f1 for r in runs])
        out.append(Configuration(key, config_name(runs[0]), runs, dev_mean, dev_std, test_mean, test_std))
    return sorted(out, key=lambda c: (-c.dev_mean, c.name, c.key))


def has_seeds(configs: Sequence[Configuration]) -> bool:
    return any(c.n > 1 for c in configs)
