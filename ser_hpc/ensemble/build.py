"""One ensemble, built into a folder: members chosen on dev (top-k or greedy), their
probabilities combined, every figure with its interval, the members' files copied, the
report written. Used by every aggregation: without folds, per fold, per corpus."""
from __future__ import annotations

import csv
import io
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ser_hpc.atomic_io import write_text
from ser_hpc.ensemble.ablation import ablation_rows
from ser_hpc.ensemble.analysis import load_pool
from ser_hpc.ensemble.collect import AggregateError, ProbTable, RunRecord, read_probs
from ser_hpc.ensemble.combine import combine, stack
from ser_hpc.ensemble.configurations import Configuration
from ser_hpc.ensemble.evaluate import bootstrap_settings, choose, configurations_json, evaluate
from ser_hpc.ensemble.members import copy_members
from ser_hpc.ensemble.plots import plot_confusion, plot_reliability
from ser_hpc.ensemble.report import RELIABILITY_PNG, write_report
from ser_hpc.metrics import score
from ser_hpc.run_status import RunStatus

log = logging.getLogger("ser_hpc.ensemble")


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
