"""Aggregation of a grid with a ``data.fold`` axis (corpora with test folds, as in EmoBox).

Each fold has its own train/dev/test items, so runs of different folds are never pooled
item by item. The protocol (EmoBox's: score every fold, then average):

- A *configuration* is a run's overrides without ``data.fold`` and ``train.seed``. Within a
  fold its dev (test) macro-F1 is the mean over its seeds; over folds, configurations are
  ranked by the mean of those per-fold dev figures (configurations done in every fold
  first), and reported as mean ± sample std (ddof=1) over folds.
- The ensemble takes the top-k *configurations* (k counts configurations here, not runs)
  and builds one ensemble per fold from those configurations' runs of that fold, every
  seed included (seed averaging, as the configuration ranking). Each fold ensemble is
  built by aggregate.build_ensemble, the same machinery as a grid without folds, into
  ``ensemble/fold_K/``: self-contained (members/, its own ensemble.json that
  inference.ensemble.load_ensemble reads, leaderboard, report, probabilities).
- The top-level ensemble.json holds ``labels``, ``folds`` (one record per built fold:
  ``fold``, ``dev_macro_f1``, ``test_macro_f1``, ``test_ua``, ``test_wa``, ...), ``mean``
  and ``std`` over folds of the test ``macro_f1``/``ua``/``wa`` (``dev_mean``/``dev_std``
  the same for dev), the ``configurations`` ranking and ``fold_ensembles`` (the
  sub-folders, which jobs/predict.py averages or picks one of with --fold).

Everything is written into one staged folder and published with one rename once verified
(folder.build_and_publish), exactly as without folds.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml

from ser_hpc.atomic_io import write_json, write_text
from ser_hpc.ensemble.build import build_ensemble
from ser_hpc.ensemble.collect import AggregateError, RunRecord
from ser_hpc.ensemble.configurations import SEED_KEY, config_key, config_name, group_configurations
from ser_hpc.ensemble.leaderboard import rank_runs, render_csv, render_md, run_summary
from ser_hpc.ensemble.stats import mean_std
from ser_hpc.run_status import RunStatus

log = logging.getLogger("ser_hpc.ensemble")

FOLD_KEY = "data.fold"
FOLD_DIR = "fold_{}"
SPLIT_KEYS = ("macro_f1", "ua", "wa")


# ----------------------------------------------------------------------------- detection

def run_fold(record: RunRecord) -> int | None:
    """The run's test fold: plan.json's override, else its config.yaml's data.fold; None if unknown."""
    value = record.overrides.get(FOLD_KEY)
    if value is None and record.run_dir is not None:
        try:
            tree = yaml.safe_load((record.run_dir / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            tree = None
        if isinstance(tree, dict):
            value = (tree.get("data") or {}).get("fold")
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def fold_groups(records: Sequence[RunRecord]) -> dict[int, list[RunRecord]] | None:
    """fold -> its runs (plan order), when the grid has at least two distinct folds >= 1; else None.

    A grid with one fold (or ``data.fold: 0``) keeps the plain aggregation and its layout.
    """
    folds = {r.run_id: run_fold(r) for r in records}
    distinct = sorted({f for f in folds.values() if f is not None and f >= 1})
    if len(distinct) < 2:
        return None
    unknown = [r.run_id for r in records if not folds[r.run_id] or folds[r.run_id] < 1]
    if unknown:
        raise AggregateError(f"grid has folds {distinct} but run(s) {', '.join(unknown)} have no data.fold >= 1 "
                             "(in plan.json overrides or config.yaml)")
    return {f: [r for r in records if folds[r.run_id] == f] for f in distinct}


# ----------------------------------------------------------------------------- configurations

@dataclass
class FoldConfiguration:
    key: str
    name: str
    per_fold: dict[int, dict[str, Any]] = field(default_factory=dict)  # fold -> dev, test, runs
    dev_mean: float | None = None
    dev_std: float | None = None
    test_mean: float | None = None
    test_std: float | None = None
    complete: bool = False  # done runs in every fold of the grid

    def runs(self, fold: int) -> list[RunRecord]:
        return list(self.per_fold.get(fold, {}).get("runs", []))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "overrides": json.loads(self.key), "complete": self.complete,
                "n_folds": len(self.per_fold),
                "dev_mean": self.dev_mean, "dev_std": self.dev_std,
                "test_mean": self.test_mean, "test_std": self.test_std,
                "folds": [{"fold": f, "dev_macro_f1": v["dev"], "test_macro_f1": v["test"],
                           "n_seeds": len(v["runs"]), "run_ids": [r.run_id for r in v["runs"]]}
                          for f, v in sorted(self.per_fold.items())]}


def rank_fold_configurations(folds: dict[int, list[RunRecord]]) -> list[FoldConfiguration]:
    """Configurations over folds, best first: complete ones (every fold done) before the others,
    then by mean over folds of the per-fold dev macro-F1 (itself the mean over seeds)."""
    configs: dict[str, FoldConfiguration] = {}
    for fold, records in folds.items():
        for c in group_configurations(rank_runs(records)):  # per fold: seeds grouped, best first
            key = config_key(c.runs[0], (FOLD_KEY, SEED_KEY), alone_if_unset=False)  # json: to_json reads it back
            fc = configs.setdefault(key, FoldConfiguration(key, config_name(c.runs[0], (FOLD_KEY, SEED_KEY))))
            if fold in fc.per_fold:  # two per-fold groups with one key (runs without a seed override)
                runs = fc.per_fold[fold]["runs"] + c.runs
                runs.sort(key=lambda r: -r.dev_macro_f1)
                dev, _ = mean_std([r.dev_macro_f1 for r in runs])
                test, _ = mean_std([r.test_macro_f1 for r in runs])
                fc.per_fold[fold] = {"dev": dev, "test": test, "runs": runs}
            else:
                fc.per_fold[fold] = {"dev": c.dev_mean, "test": c.test_mean, "runs": list(c.runs)}
    for fc in configs.values():
        per = [fc.per_fold[f] for f in sorted(fc.per_fold)]
        fc.dev_mean, fc.dev_std = mean_std([v["dev"] for v in per])
        fc.test_mean, fc.test_std = mean_std([v["test"] for v in per])
        fc.complete = set(fc.per_fold) == set(folds)
    return sorted(configs.values(), key=lambda c: (not c.complete, -c.dev_mean, c.name, c.key))


# ----------------------------------------------------------------------------- figures

def fold_record(fold: int, result: dict[str, Any]) -> dict[str, Any]:
    """One fold's line of the top-level ensemble.json, from that fold's ensemble.json."""
    return {"fold": fold, "dir": FOLD_DIR.format(fold),
            "members": [m["run_id"] for m in result["members"]], "n_members": result["n_members"],
            "dev_macro_f1": result["dev_macro_f1"], "dev_ua": result["ua_dev"], "dev_wa": result["wa_dev"],
            "test_macro_f1": result["test_macro_f1"], "test_ua": result["test_ua"], "test_wa": result["test_wa"],
            "n_dev": result["n_dev"]}


def fold_summary(records: Sequence[dict[str, Any]], split: str) -> tuple[dict | None, dict | None]:
    """(mean, std) over folds of macro_f1/ua/wa on ``split``; None when a fold lacks the figure."""
    prefix = f"{split}_"
    values = {k: [r[prefix + k] for r in records] for k in SPLIT_KEYS}
    if not records or any(v is None for vs in values.values() for v in vs):
        return None, None
    ms = {k: mean_std(v) for k, v in values.items()}
    return {k: m for k, (m, _) in ms.items()}, {k: s for k, (_, s) in ms.items()}


def fold_leaderboard_md(configs: Sequence[FoldConfiguration], folds: Sequence[int],
                        top: Sequence[str] = ()) -> list[str]:
    """The configurations-over-folds table (per-fold dev/test, mean ± std); ``*``: ensemble."""
    from ser_hpc.ensemble.leaderboard import mean_pm, pct
    head = ["rank", "configuration", *(f"fold {f} dev / test" for f in folds),
            "dev macro-F1 (mean ± std)", "test macro-F1 (mean ± std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, c in enumerate(configs, 1):
        cells = []
        for f in folds:
            v = c.per_fold.get(f)
            cells.append("—" if v is None else f"{pct(v['dev'])} / {pct(v['test']) or '—'}")
        star = " *" if c.key in top else ""
        row = [f"{rank}{star}", c.name.replace("|", "\\|"), *cells, mean_pm(c.dev_mean, c.dev_std),
               mean_pm(c.test_mean, c.test_std) or "—"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# ----------------------------------------------------------------------------- the job

def fold_steps(results_dir: Path, plan: dict[str, Any], grid_name: str, records: list[RunRecord],
               folds: dict[int, list[RunRecord]], k: int, method: str, selection: str):
    """The steps (steps.py) that write {fold_K/..., ensemble.json, leaderboard.*, report.md}; the
    build raises AggregateError when no fold ensemble was built."""
    from ser_hpc.ensemble.report import write_fold_report
    ranked_all = rank_runs(records)
    others = [r for r in records if r.status != RunStatus.DONE]
    configs = rank_fold_configurations(folds)
    notes: list[str] = []
    if selection != "topk":
        notes.append(f"selection {selection!r} ignored over folds: each fold ensemble is the top-{k} "
                     "configurations' runs (configurations ranked by mean dev macro-F1 over folds)")
    top = configs[:k]
    if configs and len(configs) < k:
        notes.append(f"only {len(configs)} configuration(s) done: ensembles of {len(configs)} instead of top {k}")
    if any(not c.complete for c in top):
        notes.append("configuration(s) in the ensemble lack some folds: "
                     + ", ".join(f"{c.name} (folds {sorted(c.per_fold)})" for c in top if not c.complete))
    if others:
        notes.append(f"ensembles built from the {len(ranked_all)} done run(s) only; "
                     f"{len(others)} run(s) failed or missing")
    built: list[dict[str, Any]] = []
    stars: list[str] = []

    def finish(stage: Path, result: dict | None) -> None:
        board = [f"# Leaderboard — {grid_name} (folds)", "",
                 f"{len(configs)} configurations over folds {sorted(folds)}: runs that differ only in "
                 "`train.seed` and `data.fold`; per fold the mean over seeds, then mean ± sample std over "
                 "folds (macro-F1 in %). Ranked by mean dev macro-F1; `*` marks the ensemble's configurations. "
                 "Each fold's own leaderboard is in fold_K/leaderboard.md.", ""]
        board += fold_leaderboard_md(configs, sorted(folds), {c.key for c in top} if result else set())
        board += ["", "## Runs (all folds; each fold is scored on its own dev and test items)", "",
                  render_md(ranked_all, others, stars if result else []).split("\n", 2)[2]]
        write_text(stage / "leaderboard.md", "\n".join(board))
        write_text(stage / "leaderboard.csv", render_csv(ranked_all, others))
        if result:
            try:
                write_fold_report(stage, result)
            except Exception as exc:  # the report is a by-product, as without folds
                log.exception("report not written")
                notes.append(f"report.md not written: {type(exc).__name__}: {exc}")
            write_json(stage / "ensemble.json", result)
        print(run_summary(results_dir, records, _fold_lines(result), notes, " (grid with folds)"), flush=True)

    def build(stage: Path) -> dict:
        labels: list[str] | None = None
        if not ranked_all:
            raise AggregateError(f"no finished run to ensemble in {results_dir} ({len(others)} failed or missing; "
                                 f"see {results_dir / 'ensemble' / 'leaderboard.md'})")
        for fold, fold_records in folds.items():
            bag = [r for c in top for r in c.runs(fold)]
            if not bag:
                notes.append(f"fold {fold}: no done run of the top configurations; no ensemble for this fold")
                continue
            fold_notes: list[str] = []
            ranked = rank_runs(fold_records)
            out = stage / FOLD_DIR.format(fold)
            out.mkdir()
            try:
                result, figures = build_ensemble(f"{grid_name} fold {fold}", out, ranked, len(bag), method, "topk",
                                                 fold_records, group_configurations(ranked), fold_notes, plan, bag=bag)
            except AggregateError as exc:
                shutil.rmtree(out, ignore_errors=True)
                notes.append(f"fold {fold}: no ensemble ({exc})")
                continue
            if labels is not None and list(result["labels"]) != labels:
                raise AggregateError(f"fold {fold} has classes {result['labels']}, fold {built[0]['fold']} has "
                                     f"{labels}: the fold ensembles cannot be averaged")
            labels = list(result["labels"])
            fold_fig = {r.run_id for r in bag}
            fold_others = [r for r in fold_records if r.status != RunStatus.DONE]
            write_text(out / "leaderboard.md", render_md(ranked, fold_others, sorted(fold_fig),
                                                         f"Leaderboard — {grid_name}, fold {fold}",
                                                         cis=figures["run_ci"], configs=group_configurations(ranked)))
            write_text(out / "leaderboard.csv", render_csv(ranked, fold_others, cis=figures["run_ci"]))
            result["fold"] = fold
            write_json(out / "ensemble.json", result)
            built.append(fold_record(fold, result))
            stars.extend(r.run_id for r in bag)
        if not built:
            raise AggregateError(f"no fold ensemble could be built in {results_dir}: " + "; ".join(notes))
        if len(built) < len(folds):
            notes.append(f"figures averaged over {len(built)} of {len(folds)} folds")
        mean, std = fold_summary(built, "test")
        dev_mean, dev_std = fold_summary(built, "dev")
        if mean is None:
            notes.append("test figures missing (no test gold labels) in some fold: no test mean over folds")
        return {
            "grid_name": grid_name,
            "kind": "folds",
            "labels": labels,
            "method": method,
            "selection": "topk",
            "top_k": k,
            "members_per_fold": "every seed of the top-k configurations",
            "folds": built,
            "fold_ensembles": [b["dir"] for b in built],
            "n_folds": len(built),
            "mean": mean,
            "std": std,
            "dev_mean": dev_mean,
            "dev_std": dev_std,
            "std_kind": "sample std over folds (ddof=1)",
            "configurations": [c.to_json() for c in configs],
            "top_configurations": [c.name for c in top],
            "n_done": len(ranked_all),
            "n_failed": sum(r.status == RunStatus.FAILED for r in records),
            "n_missing": sum(r.status == RunStatus.MISSING for r in records),
            "failed": [{"run_id": r.run_id, "reason": r.reason} for r in records if r.status == RunStatus.FAILED],
            "missing": [r.run_id for r in records if r.status == RunStatus.MISSING],
            "notes": notes,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    return build, finish


def _fold_lines(result: dict | None) -> list[str]:
    """Each fold's ensemble and the mean over folds, for the aggregation's log."""
    if not result:
        return []
    lines = []
    for b in result["folds"]:
        test = "" if b["test_macro_f1"] is None else f", test macro-F1 {100 * b['test_macro_f1']:.2f}"
        lines.append(f"[aggregate] fold {b['fold']}: ensemble of {b['n_members']}: dev macro-F1 "
                     f"{100 * b['dev_macro_f1']:.2f}{test}")
    if result["mean"]:
        m, s = result["mean"], result["std"]
        figs = ", ".join(f"{k} {100 * m[k]:.2f}" + ("" if s[k] is None else f" ± {100 * s[k]:.2f}") for k in SPLIT_KEYS)
        lines.append(f"[aggregate] over {result['n_folds']} folds (test): {figs}")
    return lines
