"""The steps of one aggregation: ``build(stage)`` writes an ensemble into a fresh folder and
returns its ensemble.json content, ``finish(stage, result)`` writes the leaderboard (always:
it is the report of what failed) and ensemble.json. ``folder.build_and_publish`` runs them
and switches results/<grid>/ensemble to the folder; a benchmark grid runs one pair per corpus
into its sub-folders. A grid with a data.fold axis gets the steps of folds.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ser_hpc.atomic_io import write_json, write_text
from ser_hpc.ensemble.build import build_ensemble
from ser_hpc.ensemble.collect import AggregateError, RunRecord
from ser_hpc.ensemble.configurations import group_configurations
from ser_hpc.ensemble.folds import fold_groups, fold_steps
from ser_hpc.ensemble.leaderboard import pct, rank_runs, render_csv, render_md, run_summary
from ser_hpc.ensemble.report_stats import with_ci
from ser_hpc.run_status import RunStatus

Steps = tuple[Callable[[Path], dict], Callable[[Path, "dict | None"], None]]


def ensemble_steps(results_dir: Path, plan: dict[str, Any], grid_name: str, records: list[RunRecord], k: int,
                   method: str, selection: str) -> Steps:
    """The steps for these runs: one ensemble per fold when they have a data.fold axis, else one."""
    folds = fold_groups(records)
    if folds:  # one ensemble per fold, figures averaged over folds
        return fold_steps(results_dir, plan, grid_name, records, folds, k, method, selection)
    return plain_steps(results_dir, plan, grid_name, records, k, method, selection)


def plain_steps(results_dir: Path, plan: dict[str, Any], grid_name: str, records: list[RunRecord], k: int,
                method: str, selection: str) -> Steps:
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
        # Members are starred only when an ensemble was built.
        stars = [m["run_id"] for m in result["members"]] if result else []
        run_ci = figures.get("run_ci") if result else None
        write_text(stage / "leaderboard.md", render_md(ranked, others, stars, f"Leaderboard — {grid_name}",
                                                       cis=run_ci, configs=configs))
        write_text(stage / "leaderboard.csv", render_csv(ranked, others, cis=run_ci, configs=configs))
        if result:
            write_json(stage / "ensemble.json", result)  # last: it describes the files above
        print(run_summary(results_dir, records, _ranking(ranked, result), notes), flush=True)

    return build, finish


def _ranking(ranked: list[RunRecord], result: dict | None, rows: int = 5) -> list[str]:
    """The best runs and the ensemble, for the aggregation's log."""
    lines = []
    for rank, r in enumerate(ranked[:rows], 1):
        test = "" if r.test_macro_f1 is None else f"  test {100 * r.test_macro_f1:6.2f}"
        lines.append(f"  {rank:>3}. dev {100 * r.dev_macro_f1:6.2f}{test}  {r.run_id}  {r.name}")
    if len(ranked) > rows:
        lines.append(f"  ... {len(ranked) - rows} more in ensemble/leaderboard.md")
    if result:
        test = ("" if result["test_macro_f1"] is None
                else f", test macro-F1 {with_ci(result['test_macro_f1'], result['test_macro_f1_ci95'])}")
        lines.append(f"[aggregate] ensemble ({result['method']} of {result['n_members']}, {result['selection']}: "
                     f"{', '.join(m['run_id'] for m in result['members'])}): dev macro-F1 "
                     f"{with_ci(result['dev_macro_f1'], result['dev_macro_f1_ci95'])} (selection-biased; "
                     f"cross-fitted {pct(result['dev_macro_f1_crossfit'])}){test}")
    return lines
