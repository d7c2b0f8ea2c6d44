"""report.md's statistical sections: configurations over seeds, the pooling × fusion
ablation, both ensemble selections side by side, paired tests, calibration, chance.

Each function returns Markdown lines from ensemble.json's content (plus the grouped
configurations), so the report states exactly the numbers the JSON holds.
"""
from __future__ import annotations

from typing import Any, Sequence

from ser_hpc.ensemble.configurations import Configuration, has_seeds
from ser_hpc.ensemble.leaderboard import configurations_md, mean_pm, pct, pct_ci

BOOT = "95 % CI: stratified bootstrap over the split's items (1000 resamples, percentile interval)"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "—"
    return pct(value) + ("" if ci is None else f" {pct_ci(ci)}")


def chance_text(result: dict, split: str) -> str:
    c = (result.get("chance_macro_f1") or {}).get(split)
    if not c:
        return ""
    return f"chance on {split}: uniform guessing {pct(c['uniform'])}, always the majority class {pct(c['majority'])}"


def summary(result: dict) -> str:
    """The headline sentence: the ensemble's figures with intervals, beside chance."""
    if result.get("kind") == "folds":
        return folds_headline(result)
    if result.get("kind") == "benchmark":
        figures = result.get("ensemble_figures") or {}
        return "Benchmark of {} corpora; each corpus's ensemble on its test split: {}.".format(
            len(result["corpora"]), "; ".join(
                f"{c} macro-F1 {100 * f['macro_f1']:.2f}" + (f" ± {100 * f['macro_f1_std']:.2f}"
                                                            if f.get("macro_f1_std") is not None else "")
                for c, f in figures.items() if f.get("macro_f1") is not None))
    sel = result.get("selection", "topk")
    rule = (f"the top {result['top_k']} runs by dev macro-F1" if sel == "topk"
            else "a greedy forward selection with replacement on dev (Caruana et al. 2004)")
    text = (f"The ensemble is the {result['method']} of {result['n_members']} members chosen as {rule}: "
            f"dev {with_ci(result['dev_macro_f1'], result.get('dev_macro_f1_ci95'))} "
            f"(selection-biased: dev also chose the members; cross-fitted estimate "
            f"{pct(result.get('dev_macro_f1_crossfit'))})")
    if result.get("test_macro_f1") is not None:
        text += f", test {with_ci(result['test_macro_f1'], result.get('test_macro_f1_ci95'))}"
    chance = "; ".join(t for t in (chance_text(result, s) for s in ("dev", "test")) if t)
    return text + "." + (f" For comparison, {chance}." if chance else "") + f" {BOOT}."


def folds_headline(result: dict) -> str:
    """A grid with folds has one ensemble per fold: its figures are means ± std over folds."""
    mean, std, dev = result.get("mean") or {}, result.get("std") or {}, (result.get("dev_mean") or {}).get("macro_f1")
    test = " ".join(f"{k} {mean[k]:.4f} ± {std.get(k) or 0:.4f}" for k in ("macro_f1", "ua", "wa")
                    if mean.get(k) is not None)
    return (f"ensembles of {len(result['folds'])} folds ({result['method']})"
            + (f": dev macro-F1 {dev:.4f} ± {(result.get('dev_std') or {}).get('macro_f1') or 0:.4f}"
               if dev is not None else "") + (f", test {test} (mean ± std over folds)" if test else ""))


def chance_section(result: dict) -> list[str]:
    rows = [[split, c["n"], pct(c["uniform"]), pct(c["majority"])]
            for split, c in (result.get("chance_macro_f1") or {}).items()]
    return (["## Chance level", "",
             "Macro-F1 (%) of two no-skill baselines on each split's class counts, over the full label set: "
             "guessing each class uniformly at random (F1 of the expected confusion matrix), and always "
             "answering the most frequent class.", ""]
            + table(["split", "items", "uniform guessing", "always majority"], rows))


def configurations_section(configs: Sequence[Configuration], members: Sequence[str], top: int) -> list[str]:
    if not has_seeds(configs):
        return []
    more = f" ({len(configs) - top} more in [leaderboard.md](leaderboard.md))" if len(configs) > top else ""
    return (["## Configurations over seeds", "",
             f"Runs differing only in `train.seed` form one configuration, ranked by mean dev macro-F1 (%) over "
             f"its seeds, ± the sample std over seeds{more}; `*` marks ensemble members.", ""]
            + configurations_md(configs[:top], members) + [""])


def ablation_section(result: dict) -> list[str]:
    rows = result.get("ablation")
    if not rows:
        return []
    body = [[r.get("modalities", "—"), r["pooling"], r["fusion"], r["n_runs"], mean_pm(r["dev_mean"], r["dev_std"]), pct_ci(r["dev_ci95"]),
             mean_pm(r["test_mean"], r["test_std"]), pct_ci(r["test_ci95"]) if r["test_mean"] is not None else "—"]
            for r in rows]
    return (["## Ablation: pooling × fusion", "",
             "One row per (`model.modalities`, `model.pooling`, `model.fusion`) cell: mean ± std macro-F1 (%) over "
             "all its done runs (every seed and every other axis); one-modality runs are the baselines, fusion —. 95 % CI: stratified bootstrap over the items of the cell's mean "
             "macro-F1, its runs held fixed (the mean of the runs' paired bootstrap distributions); the spread "
             "over runs is the ± std.", ""]
            + table(["modalities", "pooling", "fusion", "runs", "dev macro-F1", "dev 95% CI", "test macro-F1", "test 95% CI"],
                    body) + [""])


def bag_text(run_ids: Sequence[str]) -> str:
    """"`a` ×2, `b`": a greedy bag lists a run once with its weight."""
    counts: dict[str, int] = {}
    for m in run_ids:
        counts[m] = counts.get(m, 0) + 1
    return ", ".join(f"`{m}`" + (f" ×{n}" if n > 1 else "") for m, n in counts.items())


def selection_section(result: dict) -> list[str]:
    rows = []
    for name, s in (result.get("selections") or {}).items():
        who = bag_text(s["members"])
        star = " (used)" if name == result.get("selection") else ""
        rows.append([f"{name}{star}", s["n_members"], who, with_ci(s["dev_macro_f1"], s["dev_macro_f1_ci95"]),
                     pct(s["dev_macro_f1_crossfit"]), with_ci(s["test_macro_f1"], s["test_macro_f1_ci95"]),
                     pct(s["dev_ece"]), pct(s["test_ece"]) or "—"])
    return (["## Ensemble selection", "",
             f"Both selection rules, computed on dev only, combined by {result['method']}; the one marked (used) "
             "is the ensemble written to ensemble.json. **The dev column is selection-biased**: the same dev "
             "items chose the members (and each run's best checkpoint). The cross-fitted column chooses members "
             "on one stratified half of dev and scores the other half, then swaps and averages; it removes the "
             "member-selection bias, not the checkpoint-selection one. Test is never used to choose. "
             f"Macro-F1 and ECE in %; {BOOT}.", ""]
            + table(["selection", "size", "members", "dev macro-F1 (biased)", "dev cross-fitted", "test macro-F1",
                     "dev ECE", "test ECE"], rows) + [""])


def significance_section(result: dict) -> list[str]:
    rows = [[t["a"], t["b"], t["split"], f"{100 * t['delta']:+.2f}", pct_ci(t["delta_ci95"]), f"{t['p']:.3f}"]
            for t in result.get("significance") or []]
    lines = ["## Significance", "",
             "Paired bootstrap test on the same items (stratified resamples, 1000 rounds, two-sided, shifted "
             "null): p is the share of resamples whose difference strays from the observed one by at least the "
             "observed difference. A configuration with several seeds enters as its mean macro-F1 over seeds. "
             "Differences in macro-F1 points; dev comparisons with the ensemble are selection-biased in its favour.",
             ""]
    if not rows:
        return lines + ["No comparison: fewer than two systems scored on the same items.", ""]
    return lines + table(["a", "b", "split", "a − b", "95% CI of a − b", "p"], rows) + [""]


def calibration_section(result: dict, png: str | None) -> list[str]:
    scores = "vote shares" if result["method"] == "vote" else "mean probabilities"
    lines = ["## Calibration", "",
             f"Expected calibration error of the ensemble's scores ({scores}), "
             "15 equal-width confidence bins: the item-weighted mean gap between each bin's accuracy and its "
             f"mean top score. Dev ECE {pct(result.get('dev_ece'))} %"
             + (f", test ECE {pct(result['test_ece'])} %" if result.get("test_ece") is not None else "") + "."]
    if png:
        lines += ["", f"![Reliability diagram]({png})"]
    return lines + [""]
