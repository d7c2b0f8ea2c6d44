"""Read a results tree (plan.json + runs/<run_id>/) into one record per run.

Training jobs may crash, be cancelled or never start, so every reader here is defensive:
a run is "done" only if final.json says so AND it has what the ensemble needs (its dev
probabilities, a readable head with the expected tensors: member_files.py); anything
else becomes "failed" (with a reason) or "missing" (no final.json at all), so the
aggregation can always report on the whole grid instead of dying on the first bad run.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ser_hpc.ensemble.member_files import member_problem
from ser_hpc.plan_file import read_plan
from ser_hpc.run_status import RunStatus


class AggregateError(RuntimeError):
    """A problem the user must fix (no finished run, inconsistent member outputs...)."""


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: RunStatus  # done, failed or missing
    reason: str | None = None
    dev_macro_f1: float | None = None
    test_macro_f1: float | None = None
    best_step: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


@dataclass
class ProbTable:
    """One dev_probs.csv / test_probs.csv: rows in file order, one column per class."""

    ids: list[str]
    gold: list[int | None]  # None where the label cell is empty (unlabelled test set)
    probs: np.ndarray  # (n, len(labels)) float64
    labels: tuple[str, ...] = ()  # the run's classes, from the header, in column order

    @property
    def has_gold(self) -> bool:
        return bool(self.ids) and all(g is not None for g in self.gold)


def load_plan(results_dir: Path) -> dict[str, Any]:
    """plan.json, or {} when absent (unit tests, or a results tree built by hand)."""
    return read_plan(results_dir) if (Path(results_dir) / "plan.json").exists() else {}


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _read_run(run_id: str, name: str | None, overrides: dict, run_dir: Path) -> RunRecord:
    rec = RunRecord(run_id=run_id, name=name or run_id, status=RunStatus.MISSING,
                    overrides=dict(overrides), run_dir=run_dir)
    final_path = run_dir / "final.json"
    if not final_path.exists():
        return rec  # never finished: crashed hard, cancelled, still queued...
    try:
        final = json.loads(final_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        rec.status, rec.reason = RunStatus.FAILED, f"unreadable final.json: {exc}"
        return rec
    rec.name = name or final.get("name") or run_id
    rec.dev_macro_f1 = _finite(final.get("dev_macro_f1"))
    rec.test_macro_f1 = _finite(final.get("test_macro_f1"))
    rec.best_step = final.get("best_step")
    status = final.get("status")
    if status != RunStatus.DONE:
        rec.status = RunStatus.FAILED
        rec.reason = final.get("reason") or (f"status {status!r}" if status != RunStatus.FAILED else "no reason given")
    # A "done" run the ensemble cannot use is reported as failed rather than silently skipped.
    elif rec.dev_macro_f1 is None:
        rec.status, rec.reason = RunStatus.FAILED, "status done but dev_macro_f1 is missing or not finite"
    elif not (run_dir / "dev_probs.csv").exists():
        rec.status, rec.reason = RunStatus.FAILED, "status done but dev_probs.csv is missing"
    elif problem := member_problem(run_dir, len(final["labels"]) if isinstance(final.get("labels"), list) else None):
        # e.g. a head overwritten or truncated after training: it would break the ensemble
        rec.status, rec.reason = RunStatus.FAILED, f"status done but not usable as an ensemble member: {problem}"
    else:
        rec.status = RunStatus.DONE
    return rec


def collect_runs(results_dir: Path, plan: dict[str, Any] | None = None) -> list[RunRecord]:
    """One record per run of the plan, in plan order; without a plan, every run folder.

    Folders the plan lacks belong to an earlier version of the grid (another config, so
    another run id): they are kept on disk but not ranked with this grid's runs.
    """
    results_dir = Path(results_dir)
    plan = load_plan(results_dir) if plan is None else plan
    runs_dir = results_dir / "runs"
    records, seen = [], set()
    for entry in plan.get("runs", []):
        run_id = str(entry["run_id"])
        seen.add(run_id)
        records.append(_read_run(run_id, entry.get("name"), entry.get("overrides") or {}, runs_dir / run_id))
    if runs_dir.is_dir():
        others = sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name not in seen)
        if plan.get("runs") and others:
            print(f"[aggregate] {len(others)} run folder(s) not in plan.json (an earlier grid) are not ranked")
        elif not plan.get("runs"):
            records += [_read_run(run_dir.name, None, {}, run_dir) for run_dir in others]
    return records


def read_probs(path: Path) -> ProbTable:
    """Parse a probs CSV (``id,label,<class>...``: the classes are the header's other columns,
    in the run's order) and validate it."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        absent = [c for c in ("id", "label") if c not in header]
        if absent:
            raise AggregateError(f"{path}: missing columns {absent}")
        labels = tuple(c for c in header if c not in ("id", "label"))
        if len(labels) < 2:
            raise AggregateError(f"{path}: needs a probability column per class, found {list(labels)}")
        index = {c: k for k, c in enumerate(labels)}
        ids, gold, rows = [], [], []
        for line_no, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip()
            if label and label not in index:
                raise AggregateError(f"{path}:{line_no}: unknown label {label!r} (classes: {', '.join(labels)})")
            ids.append(row["id"])
            gold.append(index[label] if label else None)
            try:
                rows.append([float(row[c]) for c in labels])
            except (TypeError, ValueError) as exc:
                raise AggregateError(f"{path}:{line_no}: bad probability ({exc})") from exc
    probs = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(labels))
    if len(set(ids)) != len(ids):
        raise AggregateError(f"{path}: duplicate ids")
    if not np.isfinite(probs).all():
        raise AggregateError(f"{path}: non-finite probabilities (NaN/inf)")
    return ProbTable(ids=ids, gold=gold, probs=probs, labels=labels)
