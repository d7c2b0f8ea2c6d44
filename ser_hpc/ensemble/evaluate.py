"""The figures a reviewer needs, computed once for ensemble.json, the leaderboard and the report.

``choose`` picks both ensembles (top-k and greedy) from the dev pool alone; ``evaluate``
then scores them, every run and every configuration on dev and, where labelled, test:
95 % intervals, cross-fitted dev figures, paired tests, calibration and chance levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ser_hpc.ensemble.analysis import Pool, SplitStats
from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.configurations import Configuration
from ser_hpc.ensemble.selection import crossfit, greedy, topk
from ser_hpc.ensemble.settings import SELECTIONS
from ser_hpc.ensemble.stats import LEVEL, N_RESAMPLES, SEED, chance_macro_f1

SPLITS = ("dev", "test")


@dataclass
class Choice:
    """Both selections' bags (run ids, repeats allowed), from dev only."""
    bags: dict[str, list[str]]
    trace: list[float]                   # greedy: dev macro-F1 after each step
    crossfit: dict[str, dict]            # selection -> cross-fitted dev figure


def choose(dev: Pool, ranked: Sequence[RunRecord], k: int, method: str) -> Choice:
    """top-k: the k best runs (the leaderboard's order); greedy: forward selection on the pool.

    Takes the dev pool and nothing else: test probabilities are not even loaded yet.
    """
    y = dev.y
    picked, trace = greedy(dev.probs, y, method)
    bags = {"topk": [r.run_id for r in ranked[:k]], "greedy": [dev.run_ids[i] for i in picked]}
    rules = {"topk": lambda p, yy: topk(p, yy, k), "greedy": lambda p, yy: greedy(p, yy, method)[0]}
    fits = {}
    for name, rule in rules.items():
        fit = crossfit(dev.probs, y, rule, method, SEED)
        fits[name] = {"macro_f1": fit["macro_f1"], "halves": fit["halves"],
                      "members": [[dev.run_ids[i] for i in bag] for bag in fit["bags"]]}
    return Choice(bags, trace, fits)


def _config_label(c: Configuration) -> str:
    return c.name if c.n == 1 else f"{c.name} (mean of {c.n} seeds)"


def _significance(stats: dict[str, SplitStats | None], systems: dict[str, dict[str, dict]],
                  choice: Choice, selection: str, configs: Sequence[Configuration]) -> list[dict]:
    """Ensemble vs best configuration, best vs second-best configuration, greedy vs top-k."""
    out = []
    for split, s in stats.items():
        if s is None:
            continue
        ens = systems[split]
        cfg_sides = []
        for c in configs[:2]:
            ids = [r.run_id for r in c.runs]
            cfg_sides.append((_config_label(c), s.runs_mean(ids)) if s.covers(ids) else None)
        pairs = []
        if selection in ens and cfg_sides and cfg_sides[0]:
            e = ens[selection]
            pairs.append((f"ensemble ({selection})", (e["dist"], e["macro_f1"]), *cfg_sides[0]))
        if len(cfg_sides) == 2 and all(cfg_sides):
            pairs.append((*cfg_sides[0], *cfg_sides[1]))
        if sorted(choice.bags["greedy"]) != sorted(choice.bags["topk"]) and set(SELECTIONS) <= set(ens):
            pairs.append(("ensemble (greedy)", (ens["greedy"]["dist"], ens["greedy"]["macro_f1"]),
                          "ensemble (topk)", (ens["topk"]["dist"], ens["topk"]["macro_f1"])))
        for a, side_a, b, side_b in pairs:
            out.append({"a": a, "b": b, "split": split, **s.compare(side_a, side_b)})
    return out


def evaluate(dev: Pool, test: Pool | None, choice: Choice, selection: str, method: str,
             ranked: Sequence[RunRecord], configs: Sequence[Configuration]) -> dict[str, Any]:
    """Every figure with its uncertainty. Keys:

    stats: split -> SplitStats (None for an unlabelled or absent split);
    systems: split -> selection -> the ensemble's prediction, figure, CI, ECE, reliability;
    selections: the side-by-side summary for ensemble.json; run_ci: run_id -> split -> CI;
    significance: list of {a, b, split, delta, p, delta_ci95}; chance: split -> levels.
    """
    stats = {"dev": SplitStats.of(dev, N_RESAMPLES, SEED), "test": SplitStats.of(test, N_RESAMPLES, SEED)}
    systems: dict[str, dict[str, dict]] = {split: {} for split in SPLITS}
    for split, s in stats.items():
        for name, bag in choice.bags.items():
            if s is not None and s.covers(bag):
                systems[split][name] = s.system(bag, method)
    selections = {}
    for name, bag in choice.bags.items():
        entry: dict[str, Any] = {"members": bag, "n_members": len(bag)}
        for split in SPLITS:
            sys_ = systems[split].get(name)
            entry[f"{split}_macro_f1"] = sys_["macro_f1"] if sys_ else None
            entry[f"{split}_macro_f1_ci95"] = sys_["ci95"] if sys_ else None
            if split == "dev":
                entry["dev_macro_f1_crossfit"] = choice.crossfit[name]["macro_f1"]
            entry[f"{split}_ece"] = sys_["ece"] if sys_ else None
        if name == "greedy":
            entry["trace"] = choice.trace
        entry["crossfit"] = choice.crossfit[name]
        selections[name] = entry
    run_ci = {r.run_id: {split: (s.ci(r.run_id) if s else None) for split, s in stats.items()} for r in ranked}
    chance = {split: {"n": int(len(s.y)), **chance_macro_f1(s.y, s.n_classes)}
              for split, s in stats.items() if s is not None}
    return {"stats": stats, "systems": systems, "selections": selections, "run_ci": run_ci, "chance": chance,
            "significance": _significance(stats, systems, choice, selection, configs)}


def bootstrap_settings() -> dict[str, Any]:
    return {"n_resamples": N_RESAMPLES, "level": LEVEL, "seed": SEED, "stratified_by_class": True,
            "interval": "percentile", "test": "paired bootstrap, shifted null, two-sided"}


def configurations_json(configs: Sequence[Configuration]) -> list[dict[str, Any]]:
    return [{"name": c.name, "n_seeds": c.n, "seeds": c.seeds, "run_ids": [r.run_id for r in c.runs],
             "dev_mean": c.dev_mean, "dev_std": c.dev_std, "test_mean": c.test_mean, "test_std": c.test_std}
            for c in configs]
