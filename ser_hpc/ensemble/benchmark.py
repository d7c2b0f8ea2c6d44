"""Aggregation of a benchmark grid (``corpora:`` in the grid): one ensemble per corpus and one table.

- ``ensemble/<corpus>/``: that corpus's ensemble (or fold ensembles), chosen on its own dev,
  complete and loadable by jobs/predict.py, with its leaderboard and report (steps.py).
- ``ensemble/benchmark.{md,csv,json}`` and ``benchmark.png``: configurations (a run's grid
  choices but corpus, fold and seed) x corpora, test macro-F1 / UA / WA of each (the mean over
  its folds of the mean over its seeds, ± the std over folds, else over seeds, where there
  are several; a 95 % CI from resampling each fold's test items by class), the best per
  corpus marked, the mean over corpora and the mean rank.
- with ``cross_corpus:`` in the grid, the train x test matrix of cross_corpus.py.
"""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ser_hpc.atomic_io import write_json, write_text
from ser_hpc.ensemble.collect import AggregateError, RunRecord, read_probs
from ser_hpc.ensemble import leaderboard
from ser_hpc.ensemble.combine import stack
from ser_hpc.ensemble.configurations import SEED_KEY, config_name
from ser_hpc.ensemble.folds import FOLD_KEY
from ser_hpc.ensemble.stats import (bootstrap_distribution, chance_macro_f1, mean_std, percentile_ci,
                                    stratified_resamples)
from ser_hpc.ensemble.plots import plot_heatmap
from ser_hpc.ensemble.steps import ensemble_steps
from ser_hpc.metrics import score
from ser_hpc.run_status import RunStatus

FIGURES = ("macro_f1", "ua", "wa")


def pct(x: float | None) -> str:
    return leaderboard.pct(x, missing="-")  # an absent cell of the benchmark table


def configuration(record: RunRecord) -> str:
    """A run's name without its corpus (first word), fold and seed: the same configuration on every corpus."""
    return " ".join(config_name(record, (FOLD_KEY, SEED_KEY)).split()[1:])


@dataclass
class Cell:
    """One configuration on one corpus: its runs' test items per fold."""
    config: str
    corpus: str
    folds: dict[int, list[RunRecord]] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        split = "test" if all((r.run_dir / "test_probs.csv").is_file() for rs in self.folds.values() for r in rs) \
            else "dev"
        per_fold, dists, n_items, chance = [], [], 0, []
        for fold, runs in sorted(self.folds.items()):
            ref, probs = stack([read_probs(r.run_dir / f"{split}_probs.csv") for r in runs],
                               [r.run_id for r in runs], split)
            if not ref.has_gold:
                split = "dev"  # no test labels: the cell reports dev (noted)
                ref, probs = stack([read_probs(r.run_dir / "dev_probs.csv") for r in runs], [r.run_id for r in runs])
            y, preds = np.asarray(ref.gold), probs.argmax(axis=2)  # (seeds, items)
            runs_scores = [score(y, p, ref.labels) for p in preds]
            per_fold.append({k: float(np.mean([s[k] for s in runs_scores])) for k in FIGURES}
                            | {"seeds": [s["macro_f1"] for s in runs_scores]})
            idx = stratified_resamples(y)
            dists.append(bootstrap_distribution(y, preds, idx, len(ref.labels)).mean(axis=0))
            n_items += len(y)
            chance.append(chance_macro_f1(y, len(ref.labels))["uniform"])
        row: dict[str, Any] = {"config": self.config, "corpus": self.corpus, "split": split,
                               "folds": len(per_fold), "runs": sum(len(r) for r in self.folds.values()),
                               "n_items": n_items, "chance_macro_f1": float(np.mean(chance))}
        spread = "folds" if len(per_fold) > 1 else ("seeds" if len(per_fold[0]["seeds"]) > 1 else None)
        for k in FIGURES:
            row[k] = float(np.mean([f[k] for f in per_fold]))
            values = [f[k] for f in per_fold] if spread == "folds" else None
            if spread == "seeds":
                values = per_fold[0]["seeds"] if k == "macro_f1" else None
            row[f"{k}_std"] = mean_std(values)[1] if values else None
        row["std_over"] = spread
        row["macro_f1_ci95"] = list(percentile_ci(np.mean(dists, axis=0)))
        return row


def table_rows(by_corpus: dict[str, list[RunRecord]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], Cell] = {}
    for corpus, records in by_corpus.items():
        for r in records:
            if r.status != RunStatus.DONE:
                continue
            config = configuration(r)
            cell = cells.setdefault((config, corpus), Cell(config, corpus))
            fold = int(r.overrides.get(FOLD_KEY) or 0)  # the corpus's fold axis; 0: its own splits
            cell.folds.setdefault(fold, []).append(r)
    return [c.figures() for c in cells.values()]


def _ranks(rows: list[dict], corpora: list[str]) -> dict[str, float]:
    """Mean rank of each configuration over the corpora where it ran (1 = best macro-F1 there)."""
    ranks: dict[str, list[int]] = {}
    for corpus in corpora:
        cell = sorted((r for r in rows if r["corpus"] == corpus), key=lambda r: -r["macro_f1"])
        for rank, r in enumerate(cell, 1):
            ranks.setdefault(r["config"], []).append(rank)
    return {c: float(np.mean(v)) for c, v in ranks.items()}


def render_md(grid: str, corpora: list[str], rows: list[dict], ensembles: dict[str, dict], cross: list[dict],
              links: dict[str, str], notes: list[str]) -> str:
    configs = sorted({r["config"] for r in rows}, key=lambda c: _ranks(rows, corpora)[c])
    by = {(r["config"], r["corpus"]): r for r in rows}
    best = {c: max((r for r in rows if r["corpus"] == c), key=lambda r: r["macro_f1"], default=None) for c in corpora}
    ranks = _ranks(rows, corpora)
    lines = [f"# Benchmark — {grid}", "",
             f"{len(configs)} configurations × {len(corpora)} corpora. Test macro-F1 in % (the mean over a "
             "corpus's folds of the mean over seeds; ± std over folds, else over seeds, where there are several; "
             "95 % CI by resampling each fold's test items within class). **Bold**: the best configuration on the "
             "corpus. Mean rank: 1 = best, over the corpora where the configuration ran. Ensembles are chosen on "
             "each corpus's dev; test never chooses.", "",
             "| configuration | " + " | ".join(corpora) + " | mean | mean rank |",
             "|---|" + "---:|" * (len(corpora) + 2)]

    def cell(r: dict | None, bold: bool) -> str:
        if r is None:
            return "—"
        text = pct(r["macro_f1"]) + (f" ± {pct(r['macro_f1_std'])}" if r["macro_f1_std"] is not None else "")
        text = f"**{text}**" if bold else text
        return f"{text} [{pct(r['macro_f1_ci95'][0])}, {pct(r['macro_f1_ci95'][1])}]" + \
            (" (dev)" if r["split"] == "dev" else "")
    for c in configs:
        present = [by[(c, k)]["macro_f1"] for k in corpora if (c, k) in by]
        lines.append(f"| {c} | " + " | ".join(cell(by.get((c, k)), best[k] is by.get((c, k))) for k in corpora)
                     + f" | {pct(float(np.mean(present)))} | {ranks[c]:.2f} |")
    ens = [ensembles.get(k) or {} for k in corpora]
    lines.append("| *ensemble of the corpus* | " + " | ".join(
        pct(e.get("macro_f1")) + (f" ± {pct(e['macro_f1_std'])}" if e.get("macro_f1_std") is not None else "")
        for e in ens) + " | | |")
    lines.append("| *chance (uniform guessing)* | " + " | ".join(
        pct(np.mean([r["chance_macro_f1"] for r in rows if r["corpus"] == k])) if any(r["corpus"] == k for r in rows)
        else "—" for k in corpora) + " | | |")
    lines += ["", "## UA and WA (test, %)", "", "| configuration | " + " | ".join(f"{k} UA | {k} WA" for k in corpora)
              + " |", "|---|" + "---:|" * (2 * len(corpora))]
    for c in configs:
        lines.append(f"| {c} | " + " | ".join(f"{pct(by[(c, k)]['ua'])} | {pct(by[(c, k)]['wa'])}" if (c, k) in by
                                              else "— | —" for k in corpora) + " |")
    if cross:
        from ser_hpc.ensemble.cross_corpus import render_md as cross_md
        lines += ["", *cross_md(cross, corpora)]
    lines += ["", "## Per-corpus reports", ""]
    lines += [f"- {k}: [report]({links[k]}/report.md), [leaderboard]({links[k]}/leaderboard.md)" if k in links
              else f"- {k}: no ensemble (see {k}/leaderboard.md)" for k in corpora]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict]) -> str:
    keys = ["config", "corpus", "split", "macro_f1", "macro_f1_std", "macro_f1_ci95_low", "macro_f1_ci95_high",
            "ua", "ua_std", "wa", "wa_std", "std_over", "folds", "runs", "n_items", "chance_macro_f1"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "macro_f1_ci95_low": r["macro_f1_ci95"][0], "macro_f1_ci95_high": r["macro_f1_ci95"][1]})
    return buf.getvalue()


def _ensemble_figures(result: dict) -> dict:
    """A corpus ensemble's test figures (the mean over folds for fold ensembles)."""
    if result.get("kind") == "folds":
        m, s = result.get("mean") or {}, result.get("std") or {}
        return {"macro_f1": m.get("macro_f1"), "macro_f1_std": s.get("macro_f1"), "ua": m.get("ua"), "wa": m.get("wa")}
    return {"macro_f1": result.get("test_macro_f1"), "macro_f1_std": None, "ua": result.get("test_ua"),
            "wa": result.get("test_wa"), "macro_f1_ci95": result.get("test_macro_f1_ci95")}


def benchmark_steps(results_dir: Path, plan: dict[str, Any], grid_name: str, records: list[RunRecord], k: int,
                    method: str, selection: str):
    corpora = list(plan["corpora"])
    corpus_of = {r["run_id"]: r.get("corpus") for r in plan.get("runs", [])}
    by_corpus = {c: [r for r in records if corpus_of.get(r.run_id) == c] for c in corpora}
    notes: list[str] = []
    built: dict[str, dict] = {}

    def build(stage: Path) -> dict:
        for corpus in corpora:  # each corpus: its own ensemble, chosen on its own dev
            sub = stage / corpus
            sub.mkdir()
            build_one, finish_one = ensemble_steps(results_dir, plan, f"{grid_name} / {corpus}", by_corpus[corpus],
                                                   k, method, selection)
            try:
                result = build_one(sub)
                finish_one(sub, result)
                built[corpus] = result
            except AggregateError as exc:
                shutil.rmtree(sub)
                sub.mkdir()
                finish_one(sub, None)  # its leaderboard says what failed
                notes.append(f"corpus {corpus}: no ensemble ({exc})")
        if not built:
            raise AggregateError(f"no corpus of {results_dir} got an ensemble: " + "; ".join(notes))
        rows = table_rows(by_corpus)
        cross: list[dict] = []
        if plan.get("cross_corpus"):
            from ser_hpc.ensemble.cross_corpus import evaluate_cross, plot
            cross = evaluate_cross(stage, plan, sorted(built), notes)
            if cross:
                plot(cross, corpora, stage / "cross_corpus.png", grid_name)
        ensembles = {c: _ensemble_figures(r) for c, r in built.items()}
        result = {"grid_name": grid_name, "kind": "benchmark", "corpora": corpora, "ensembles": {c: c for c in built},
                  "table": rows, "ensemble_figures": ensembles, "cross_corpus": cross, "method": method,
                  "top_k": k, "notes": notes, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "n_done": sum(r.status == RunStatus.DONE for r in records),
                  "n_failed": sum(r.status == RunStatus.FAILED for r in records),
                  "n_missing": sum(r.status == RunStatus.MISSING for r in records)}
        write_text(stage / "benchmark.md", render_md(grid_name, corpora, rows, ensembles, cross,
                                                     {c: c for c in built}, notes))
        write_text(stage / "benchmark.csv", render_csv(rows))
        write_json(stage / "benchmark.json", {k: result[k] for k in ("grid_name", "corpora", "table",
                                                                     "ensemble_figures", "cross_corpus")})
        configs = sorted({r["config"] for r in rows}, key=lambda c: _ranks(rows, corpora)[c])
        by = {(r["config"], r["corpus"]): r["macro_f1"] for r in rows}
        matrix = np.array([[by.get((c, k), np.nan) for k in corpora] for c in configs], dtype=float)
        plot_heatmap(matrix, configs, corpora, stage / "benchmark.png", f"{grid_name}: test macro-F1")
        return result

    def finish(stage: Path, result: dict | None) -> None:
        board = [f"# Leaderboards — {grid_name} (benchmark of {len(corpora)} corpora)", "",
                 "Each corpus has its own leaderboard and ensemble; the table across corpora is benchmark.md.", ""]
        board += [f"- [{c}]({c}/leaderboard.md)" + ("" if c in built else " (no ensemble)") for c in corpora]
        write_text(stage / "leaderboard.md", "\n".join(board) + "\n")
        if result:
            write_json(stage / "ensemble.json", result)
        print(f"[aggregate] benchmark {grid_name}: ensembles for {len(built)} of {len(corpora)} corpora "
              f"({', '.join(built)}); table: {results_dir / 'ensemble' / 'benchmark.md'}", flush=True)
        for n in notes:
            print(f"[aggregate] note: {n}", flush=True)

    return build, finish
