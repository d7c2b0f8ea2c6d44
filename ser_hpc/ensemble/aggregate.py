"""Aggregation job: leaderboard of the grid, then an ensemble of the top-k finished runs.

Runs after the training array with `afterany`, so it must work from whatever finished:
failed and missing runs are reported, never fatal, unless nothing at all finished.
Every output goes through atomic writes; ensemble.json is written last so a reader that
sees it also sees the files it describes, and outputs this call did not (re)write are
removed so ensemble/ never mixes results from two different aggregations.
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
from ser_hpc.data.labels import LABELS
from ser_hpc.ensemble.collect import AggregateError, ProbTable, RunRecord, collect_runs, load_plan, read_probs
from ser_hpc.ensemble.combine import METHODS, combine, stack
from ser_hpc.ensemble.leaderboard import rank_runs, render_csv, render_md
from ser_hpc.ensemble.members import copy_members, remove_members
from ser_hpc.ensemble.plots import plot_confusion
from ser_hpc.ensemble.report import REPORT_FILES, write_report
from ser_hpc.metrics import score

__all__ = ["aggregate", "AggregateError"]
log = logging.getLogger("ser_hpc.ensemble")

DEFAULT_TOP_K = 3
OUTPUTS = ("ensemble.json", "dev_probs.csv", "test_probs.csv", "predictions_test.csv",
           "confusion_matrix.png", "confusion_matrix_test.png", *REPORT_FILES)


def _probs_csv(ref: ProbTable, scores: np.ndarray) -> str:
    """Same layout as the runs' probs files, so tools that read a run can read the ensemble."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", *LABELS])
    for i, g, row in zip(ref.ids, ref.gold, scores):
        w.writerow([i, "" if g is None else LABELS[g], *(f"{p:.6f}" for p in row)])
    return buf.getvalue()


def _predictions_csv(ref: ProbTable, pred: np.ndarray) -> str:
    """Challenge submission format: header id,label and one label name per test id."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label"])
    w.writerows([i, LABELS[p]] for i, p in zip(ref.ids, pred))
    return buf.getvalue()


def _ensemble_split(members: Sequence[RunRecord], split: str, method: str):
    tables = [read_probs(m.run_dir / f"{split}_probs.csv") for m in members]
    ref, stacked = stack(tables, [m.run_id for m in members], split)
    scores, pred = combine(stacked, method)
    # Score only when every member carries gold labels (an unlabelled test set has none).
    metrics = score(ref.gold, pred) if all(t.has_gold for t in tables) else None
    return ref, scores, pred, metrics


def _build(grid_name: str, out: Path, members: list[RunRecord], k: int, method: str,
           records: list[RunRecord], notes: list[str], written: set[str], plan: dict[str, Any]) -> dict[str, Any]:
    ref, scores, pred, dev = _ensemble_split(members, "dev", method)
    if dev is None:
        raise AggregateError("dev_probs.csv rows without a gold label in a member; cannot score the ensemble")
    write_text(out / "dev_probs.csv", _probs_csv(ref, scores))
    plot_confusion(dev["confusion_matrix"], LABELS, out / "confusion_matrix.png",
                   f"Ensemble ({method}, {len(members)} runs) — dev macro-F1 {100 * dev['macro_f1']:.2f}")
    written |= {"dev_probs.csv", "confusion_matrix.png"}

    test = None
    has_test = [(m.run_dir / "test_probs.csv").exists() for m in members]
    if all(has_test):
        tref, tscores, tpred, test = _ensemble_split(members, "test", method)
        write_text(out / "test_probs.csv", _probs_csv(tref, tscores))
        write_text(out / "predictions_test.csv", _predictions_csv(tref, tpred))
        written |= {"test_probs.csv", "predictions_test.csv"}
        if test is not None:
            plot_confusion(test["confusion_matrix"], LABELS, out / "confusion_matrix_test.png",
                           f"Ensemble ({method}, {len(members)} runs) — test macro-F1 {100 * test['macro_f1']:.2f}")
            written.add("confusion_matrix_test.png")
        else:
            notes.append("test set has no gold labels: test predictions written, test macro-F1 not computed")
    elif any(has_test):
        lacking = [m.run_id for m, h in zip(members, has_test) if not h]
        notes.append(f"test_probs.csv missing for members {', '.join(lacking)}: no test predictions written")

    failed = [r for r in records if r.status == "failed"]
    missing = [r for r in records if r.status == "missing"]
    result = {
        "grid_name": grid_name,
        "members": copy_members(out, members, plan, notes),
        "method": method,
        "top_k": k,
        "n_members": len(members),
        "labels": list(LABELS),
        "dev_macro_f1": dev["macro_f1"],
        "per_class_f1_dev": dev["per_class_f1"],
        "confusion_matrix_dev": dev["confusion_matrix"],
        "test_macro_f1": test["macro_f1"] if test else None,
        "per_class_f1_test": test["per_class_f1"] if test else None,
        "confusion_matrix_test": test["confusion_matrix"] if test else None,
        "n_dev": len(ref.ids),
        "n_done": sum(r.status == "done" for r in records),
        "n_failed": len(failed),
        "n_missing": len(missing),
        "failed": [{"run_id": r.run_id, "reason": r.reason} for r in failed],
        "missing": [r.run_id for r in missing],
        "notes": notes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        written |= write_report(out, result, rank_runs(records), records, plan)
    except Exception as exc:  # the report is a by-product: never lose the ensemble over a figure
        log.exception("report not written")
        notes.append(f"report.md not written: {type(exc).__name__}: {exc}")
    return result


def _summary(results_dir: Path, ranked: list[RunRecord], records: list[RunRecord],
             result: dict | None, notes: list[str], rows: int = 5) -> str:
    failed = [r for r in records if r.status == "failed"]
    missing = [r for r in records if r.status == "missing"]
    lines = [f"[aggregate] {results_dir}: {len(ranked)} done, {len(failed)} failed, {len(missing)} missing"]
    for rank, r in enumerate(ranked[:rows], 1):
        test = "" if r.test_macro_f1 is None else f"  test {100 * r.test_macro_f1:6.2f}"
        lines.append(f"  {rank:>3}. dev {100 * r.dev_macro_f1:6.2f}{test}  {r.run_id}  {r.name}")
    if len(ranked) > rows:
        lines.append(f"  ... {len(ranked) - rows} more in ensemble/leaderboard.md")
    if result:
        test = "" if result["test_macro_f1"] is None else f", test macro-F1 {100 * result['test_macro_f1']:.2f}"
        lines.append(f"[aggregate] ensemble ({result['method']} of {result['n_members']}: "
                     f"{', '.join(m['run_id'] for m in result['members'])}): "
                     f"dev macro-F1 {100 * result['dev_macro_f1']:.2f}{test}")
    lines += [f"[aggregate] failed: {r.run_id} ({r.reason})" for r in failed]
    if missing:
        lines.append(f"[aggregate] missing (no final.json): {', '.join(r.run_id for r in missing)}")
    lines += [f"[aggregate] note: {n}" for n in notes]
    return "\n".join(lines)


def aggregate(results_dir: str | Path, top_k: int | None = None, method: str | None = None) -> dict[str, Any]:
    """Write results_dir/ensemble/* and return the ensemble.json content.

    top_k / method default to plan.json's "ensemble" section, then 3 / "mean".
    Raises AggregateError (after writing the leaderboard) when no run is done or the
    members' outputs are inconsistent.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise AggregateError(f"results directory {results_dir} does not exist")
    plan = load_plan(results_dir)
    cfg = plan.get("ensemble") or {}
    k = top_k if top_k is not None else cfg.get("top_k", DEFAULT_TOP_K)
    method = method or cfg.get("method", "mean")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise AggregateError(f"top_k must be a positive integer, got {k!r}")
    if method not in METHODS:
        raise AggregateError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")

    out = results_dir / "ensemble"
    grid_name = plan.get("grid_name") or results_dir.name
    records = collect_runs(results_dir, plan)
    ranked = rank_runs(records)
    others = [r for r in records if r.status != "done"]
    members = ranked[:k]
    notes: list[str] = []
    written: set[str] = set()

    def finish(result: dict | None) -> None:
        # The leaderboard is always written: it is the report of what failed.  Members are
        # starred only when an ensemble was built; on failure every ensemble output goes,
        # so no stale ensemble.json from an earlier aggregation outlives this one.
        stars = [m.run_id for m in members] if result else []
        write_text(out / "leaderboard.md", render_md(ranked, others, stars, f"Leaderboard — {grid_name}"))
        write_text(out / "leaderboard.csv", render_csv(ranked, others))
        keep = written if result else set()
        for name in OUTPUTS:
            if name not in keep and name != "ensemble.json":
                (out / name).unlink(missing_ok=True)
        if result:
            write_json(out / "ensemble.json", result)
        else:
            (out / "ensemble.json").unlink(missing_ok=True)
            remove_members(out)
        print(_summary(results_dir, ranked, records, result, notes), flush=True)

    try:
        if not ranked:
            raise AggregateError(f"no finished run to ensemble in {results_dir} "
                                 f"({len(others)} failed or missing; see {out / 'leaderboard.md'})")
        if len(ranked) < k:
            notes.append(f"only {len(ranked)} run(s) done: ensemble of {len(ranked)} instead of top {k}")
        if others:
            notes.append(f"ensemble built from the {len(ranked)} done run(s) only; "
                         f"{len(others)} run(s) failed or missing")
        result = _build(grid_name, out, members, k, method, records, notes, written, plan)
    except BaseException:
        finish(None)
        raise
    finish(result)
    return result
