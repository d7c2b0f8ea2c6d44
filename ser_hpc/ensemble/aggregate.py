"""Aggregation job: leaderboard of the grid, then an ensemble of the finished runs.

Runs after the training array with `afterany`, so it must work from whatever finished:
failed and missing runs are reported, never fatal, unless nothing at all finished.
The ensemble's members are the top-k runs (the paper) or a greedy selection with
replacement (selection.py), both chosen on dev only; evaluate.py adds the intervals,
paired tests, calibration and chance levels. Every output is written into a fresh folder
that results/<grid>/ensemble switches to in one rename (folder.py), so ensemble/ never
mixes two aggregations and a killed job leaves the previous one intact.
The folder is self-contained for inference (members/, see members.py) and carries the
grid's report (report.md and its figures, see report.py).
"""
from __future__ import annotations

import csv
import io
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_hpc.atomic_io import write_json, write_text
from ser_hpc.ensemble.ablation import ablation_rows
from ser_hpc.ensemble.analysis import load_pool
from ser_hpc.ensemble.collect import AggregateError, ProbTable, RunRecord, collect_runs, load_plan, read_probs
from ser_hpc.ensemble.combine import METHODS, combine, stack
from ser_hpc.ensemble.configurations import Configuration, group_configurations
from ser_hpc.ensemble.evaluate import bootstrap_settings, choose, configurations_json, evaluate
from ser_hpc.ensemble.folder import build_and_publish
from ser_hpc.ensemble.leaderboard import rank_runs, render_csv, render_md
from ser_hpc.ensemble.members import copy_members
from ser_hpc.ensemble.plots import plot_confusion, plot_reliability
from ser_hpc.ensemble.report import RELIABILITY_PNG, write_report
from ser_hpc.ensemble.selection import SELECTIONS
from ser_hpc.metrics import score
from ser_hpc.run_status import RunStatus

__all__ = ["aggregate", "AggregateError"]
log = logging.getLogger("ser_hpc.ensemble")

DEFAULT_TOP_K = 3


def _probs_csv(ref: ProbTable, scores: np.ndarray) -> str:
    """Same layout as the runs' probs files, so tools that read a run can read the ensemble."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", *ref.labels])
    for i, g, row in zip(ref.ids, ref.gold, scores):
        w.writerow([i, "" if g is None else ref.labels[g], *(f"{p:.6f}" for p in row)])
    return buf.getvalue()


def _predictions_csv(ref: ProbTable, pred: np.ndarray) -> str:
    """Challenge submission format: header id,label and one label name per test id."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label"])
    w.writerows([i, ref.labels[p]] for i, p in zip(ref.ids, pred))
    return buf.getvalue()


def _ensemble_split(members: Sequence[RunRecord], split: str, method: str):
    tables = [read_probs(m.run_dir / f"{split}_probs.csv") for m in members]
    ref, stacked = stack(tables, [m.run_id for m in members], split)
    scores, pred = combine(stacked, method)
    # Score only when every member carries gold labels (an unlabelled test set has none).
    metrics = score(ref.gold, pred, ref.labels) if all(t.has_gold for t in tables) else None
    return ref, scores, pred, metrics


def build_ensemble(grid_name: str, out: Path, ranked: list[RunRecord], k: int, method: str, selection: str,
                   records: list[RunRecord], configs: list[Configuration], notes: list[str], plan: dict[str, Any],
                   bag: Sequence[RunRecord] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write every ensemble output into ``out``; return (ensemble.json content, figures).

    ``bag``: the top-k members given by the caller instead of ``ranked[:k]`` (folds.py
    passes the runs of the top configurations over folds); None keeps the top-k runs.
    """
    dev_pool = load_pool(ranked, "dev")
    top = list(bag) if bag is not None else ranked[:k]
    for run_id in [r.run_id for r in top]:  # top-k is always computed, so its runs must align
        if run_id in dev_pool.errors:
            raise AggregateError(dev_pool.errors[run_id])
    if dev_pool.y is None:
        raise AggregateError("dev_probs.csv rows without a gold label in a member; cannot score the ensemble")
    if dev_pool.errors:
        notes.append(f"left out of selection and statistics (dev items differ from {dev_pool.run_ids[0]}): "
                     + ", ".join(sorted(dev_pool.errors)))
    # Selection sees the dev pool only; test probabilities are read after it.
    choice = choose(dev_pool, ranked, k, method)
    if bag is not None:
        choice.bags["topk"] = [r.run_id for r in top]
    by_id = {r.run_id: r for r in ranked}
    members = [by_id[i] for i in choice.bags[selection]]

    ref, scores, pred, dev = _ensemble_split(members, "dev", method)
    if dev is None:
        raise AggregateError("dev_probs.csv rows without a gold label in a member; cannot score the ensemble")
    label = f"Ensemble ({method} of {len(members)}, {selection})"
    write_text(out / "dev_probs.csv", _probs_csv(ref, scores))
    plot_confusion(dev["confusion_matrix"], ref.labels, out / "confusion_matrix.png",
                   f"{label} — dev macro-F1 {100 * dev['macro_f1']:.2f}")

    test = None
    has_test = [(m.run_dir / "test_probs.csv").exists() for m in members]
    if all(has_test):
        tref, tscores, tpred, test = _ensemble_split(members, "test", method)
        write_text(out / "test_probs.csv", _probs_csv(tref, tscores))
        write_text(out / "predictions_test.csv", _predictions_csv(tref, tpred))
        if test is not None:
            plot_confusion(test["confusion_matrix"], tref.labels, out / "confusion_matrix_test.png",
                           f"{label} — test macro-F1 {100 * test['macro_f1']:.2f}")
        else:
            notes.append("test set has no gold labels: test predictions written, test macro-F1 not computed")
    elif any(has_test):
        lacking = [m.run_id for m, h in zip(members, has_test) if not h]
        notes.append(f"test_probs.csv missing for members {', '.join(lacking)}: no test predictions written")

    test_pool = load_pool(ranked, "test")
    if test_pool is not None and test_pool.errors:
        notes.append(f"left out of test statistics (test items differ from {test_pool.run_ids[0]}): "
                     + ", ".join(sorted(test_pool.errors)))
    figures = evaluate(dev_pool, test_pool, choice, selection, method, ranked, configs)
    chosen = figures["selections"][selection]
    if test is not None and chosen["test_macro_f1"] is None:
        notes.append("test macro-F1 has no interval: some members' test items differ from the best run's")
    rel = {split: {**sys_[selection]["reliability"], "ece": sys_[selection]["ece"]}
           for split, sys_ in figures["systems"].items() if selection in sys_}
    plot_reliability(rel, out / RELIABILITY_PNG, f"{label}: reliability")

    entries = copy_members(out, members, plan)
    for e, m in zip(entries, members):  # every figure in ensemble.json sits beside its interval
        ci = figures["run_ci"][m.run_id]
        e.update(dev_macro_f1_ci95=ci["dev"], test_macro_f1=m.test_macro_f1, test_macro_f1_ci95=ci["test"])
    failed = [r for r in records if r.status == RunStatus.FAILED]
    missing = [r for r in records if r.status == RunStatus.MISSING]
    result = {
        "grid_name": grid_name,
        "members": entries,
        "method": method,
        "selection": selection,
        "top_k": k,
        "n_members": len(members),
        "labels": list(ref.labels),
        "dev_macro_f1": dev["macro_f1"],
        "dev_macro_f1_ci95": chosen["dev_macro_f1_ci95"],
        "dev_macro_f1_crossfit": chosen["dev_macro_f1_crossfit"],
        "per_class_f1_dev": dev["per_class_f1"],
        "absent_dev": dev["absent"],
        "confusion_matrix_dev": dev["confusion_matrix"],
        "dev_ece": chosen["dev_ece"],
        "test_macro_f1": test["macro_f1"] if test else None,
        "test_macro_f1_ci95": chosen["test_macro_f1_ci95"] if test else None,
        "per_class_f1_test": test["per_class_f1"] if test else None,
        "absent_test": test["absent"] if test else [],
        "ua_dev": dev["ua"], "wa_dev": dev["wa"],
        "test_ua": test["ua"] if test else None, "test_wa": test["wa"] if test else None,
        "confusion_matrix_test": test["confusion_matrix"] if test else None,
        "test_ece": chosen["test_ece"] if test else None,
        "selections": figures["selections"],
        "significance": figures["significance"],
        "configurations": configurations_json(configs),
        "ablation": ablation_rows(ranked, records, plan, figures["stats"]),
        "chance_macro_f1": figures["chance"],
        "bootstrap": bootstrap_settings(),
        "n_dev": len(ref.ids),
        "n_done": sum(r.status == RunStatus.DONE for r in records),
        "n_failed": len(failed),
        "n_missing": len(missing),
        "failed": [{"run_id": r.run_id, "reason": r.reason} for r in failed],
        "missing": [r.run_id for r in missing],
        "notes": notes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        write_report(out, result, ranked, records, plan, run_ci=figures["run_ci"], configs=configs)
    except Exception as exc:  # the report is a by-product: never lose the ensemble over a figure
        log.exception("report not written")
        notes.append(f"report.md not written: {type(exc).__name__}: {exc}")
    return result, figures


def _summary(results_dir: Path, ranked: list[RunRecord], records: list[RunRecord],
             result: dict | None, notes: list[str], rows: int = 5) -> str:
    failed = [r for r in records if r.status == RunStatus.FAILED]
    missing = [r for r in records if r.status == RunStatus.MISSING]
    lines = [f"[aggregate] {results_dir}: {len(ranked)} done, {len(failed)} failed, {len(missing)} missing"]
    for rank, r in enumerate(ranked[:rows], 1):
        test = "" if r.test_macro_f1 is None else f"  test {100 * r.test_macro_f1:6.2f}"
        lines.append(f"  {rank:>3}. dev {100 * r.dev_macro_f1:6.2f}{test}  {r.run_id}  {r.name}")
    if len(ranked) > rows:
        lines.append(f"  ... {len(ranked) - rows} more in ensemble/leaderboard.md")
    if result:
        def fig(split: str) -> str:
            ci = result[f"{split}_macro_f1_ci95"]
            value = f"{100 * result[f'{split}_macro_f1']:.2f}"
            return value + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")
        test = "" if result["test_macro_f1"] is None else f", test macro-F1 {fig('test')}"
        lines.append(f"[aggregate] ensemble ({result['method']} of {result['n_members']}, {result['selection']}: "
                     f"{', '.join(m['run_id'] for m in result['members'])}): "
                     f"dev macro-F1 {fig('dev')} (selection-biased; cross-fitted "
                     f"{100 * result['dev_macro_f1_crossfit']:.2f}){test}")
    lines += [f"[aggregate] failed: {r.run_id} ({r.reason})" for r in failed]
    if missing:
        lines.append(f"[aggregate] missing (no final.json): {', '.join(r.run_id for r in missing)}")
    lines += [f"[aggregate] note: {n}" for n in notes]
    return "\n".join(lines)


def aggregate(results_dir: str | Path, top_k: int | None = None, method: str | None = None,
              selection: str | None = None) -> dict[str, Any]:
    """Write results_dir/ensemble/* and return the ensemble.json content.

    top_k / method / selection default to plan.json's "ensemble" section, then 3 / "mean"
    / "topk". Raises AggregateError (after writing the leaderboard) when no run is done or
    the members' outputs are inconsistent.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise AggregateError(f"results directory {results_dir} does not exist")
    plan = load_plan(results_dir)
    cfg = plan.get("ensemble") or {}
    k = top_k if top_k is not None else cfg.get("top_k", DEFAULT_TOP_K)
    method = method or cfg.get("method", "mean")
    selection = selection or cfg.get("selection", "topk")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise AggregateError(f"top_k must be a positive integer, got {k!r}")
    if method not in METHODS:
        raise AggregateError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")
    if selection not in SELECTIONS:
        raise AggregateError(f"unknown ensemble selection {selection!r}; choose from {', '.join(SELECTIONS)}")

    grid_name = plan.get("grid_name") or results_dir.name
    records = collect_runs(results_dir, plan)
    from ser_hpc.ensemble.folds import aggregate_folds, fold_groups  # folds.py builds on this module
    folds = fold_groups(records)
    if folds:  # a grid with a data.fold axis: one ensemble per fold, figures averaged over folds
        return aggregate_folds(results_dir, plan, grid_name, records, folds, k, method, selection)
    ranked = rank_runs(records)
    configs = group_configurations(ranked)
    others = [r for r in records if r.status != RunStatus.DONE]
    notes: list[str] = []
    figures: dict = {}

    def build(stage: Path) -> dict:
        if not ranked:
            raise AggregateError(f"no finished run to ensemble in {results_dir} ({len(others)} failed or missing; "
                                 f"see {results_dir / 'ensemble' / 'leaderboard.md'})")
        if len(ranked) < k:
            notes.append(f"only {len(ranked)} run(s) done: ensemble of {len(ranked)} instead of top {k}")
        if others:
            notes.append(f"ensemble built from the {len(ranked)} done run(s) only; "
                         f"{len(others)} run(s) failed or missing")
        result, figs = build_ensemble(grid_name, stage, ranked, k, method, selection, records, configs, notes, plan)
        figures.update(figs)
        return result

    def finish(stage: Path, result: dict | None) -> None:
        # The leaderboard is always written: it is the report of what failed. Members are
        # starred only when an ensemble was built.
        stars = [m["run_id"] for m in result["members"]] if result else []
        run_ci = figures.get("run_ci") if result else None
        write_text(stage / "leaderboard.md", render_md(ranked, others, stars, f"Leaderboard — {grid_name}",
                                                       cis=run_ci, configs=configs))
        write_text(stage / "leaderboard.csv", render_csv(ranked, others, cis=run_ci, configs=configs))
        if result:
            write_json(stage / "ensemble.json", result)  # last: it describes the files above
        print(_summary(results_dir, ranked, records, result, notes), flush=True)

    # Built in a fresh folder that results_dir/ensemble switches to in one rename once it is
    # verified, so a kill or a broken member at any point leaves the previous ensemble loadable.
    return build_and_publish(results_dir, build, finish)
