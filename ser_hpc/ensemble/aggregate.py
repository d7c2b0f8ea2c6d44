"""Aggregation job: leaderboard of the grid, then an ensemble of the finished runs.

Runs after the training array with `afterany`, so it must work from whatever finished:
failed and missing runs are reported, never fatal, unless nothing at all finished.
The ensemble's members are the top-k runs (the paper) or a greedy selection with
replacement (selection.py), both chosen on dev only (build.py); evaluate.py adds the
intervals, paired tests, calibration and chance levels. A grid with folds gets one ensemble
per fold (folds.py), a benchmark grid one per corpus and its table (benchmark.py). Every
output is written into a fresh folder that results/<grid>/ensemble switches to in one rename
once it is verified (folder.py), so ensemble/ never mixes two aggregations and a killed job
leaves the previous one intact. The folder is self-contained for inference (members/, see
members.py) and carries the grid's report (report.md and its figures, see report.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ser_hpc.ensemble import settings
from ser_hpc.ensemble.benchmark import benchmark_steps
from ser_hpc.ensemble.collect import AggregateError, collect_runs, load_plan
from ser_hpc.ensemble.folder import build_and_publish
from ser_hpc.ensemble.steps import ensemble_steps

__all__ = ["aggregate", "AggregateError"]


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
    given = {"top_k": top_k, "method": method, "selection": selection}
    try:
        chosen = settings.resolve({**(plan.get("ensemble") or {}), **{k: v for k, v in given.items() if v is not None}})
    except ValueError as exc:
        raise AggregateError(str(exc)) from None
    k, method, selection = chosen["top_k"], chosen["method"], chosen["selection"]

    grid_name = plan.get("grid_name") or results_dir.name
    records = collect_runs(results_dir, plan)
    steps = benchmark_steps if plan.get("corpora") else ensemble_steps
    return build_and_publish(results_dir, *steps(results_dir, plan, grid_name, records, k, method, selection))


def run_aggregation(results_dir: str) -> dict:
    """The dependent job: leaderboard and ensemble of whatever finished."""
    from ser_hpc.logs import setup_logging
    setup_logging()
    return aggregate(Path(results_dir).resolve())
