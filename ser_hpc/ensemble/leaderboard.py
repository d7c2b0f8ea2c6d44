"""Rank finished runs and render the leaderboard as Markdown (humans) and CSV (scripts).

Rendering returns strings and never writes: the caller writes them atomically, and the
output contains no timestamp so a rerun on the same tree produces identical bytes.
Each run carries its 95 % bootstrap interval; when the grid has seeds, the configurations
(runs differing only in train.seed) come first, ranked by their mean over seeds.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Mapping, Sequence

from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.configurations import Configuration, has_seeds
from ser_hpc.run_status import RunStatus

# run_id -> {"dev": (low, high) or None, "test": ...}
Intervals = Mapping[str, Mapping[str, Sequence[float] | None]]


def rank_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Done runs, best dev macro-F1 first; ties by name then run_id so the order is stable."""
    done = [r for r in records if r.status == RunStatus.DONE]
    return sorted(done, key=lambda r: (-r.dev_macro_f1, r.name, r.run_id))


def override_keys(records: Sequence[RunRecord]) -> list[str]:
    """Union of override keys, in first-seen order (plan order follows the grid's axes)."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r.overrides))
    return list(keys)


def _cell(value: Any) -> str:
    """Metric cell: fixed 6 decimals so the CSV sorts and diffs cleanly."""
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _override(value: Any) -> str:
    """Override cell: the value as the user wrote it (0.01, not 0.010000; lists as JSON)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _bounds(cis: Intervals | None, run_id: str, split: str) -> list[Any]:
    ci = (cis or {}).get(run_id, {}).get(split)
    return [None, None] if ci is None else [float(ci[0]), float(ci[1])]


def _config_ranks(configs: Sequence[Configuration] | None) -> dict[str, int]:
    """run_id -> rank of its configuration (by mean dev macro-F1 over seeds)."""
    return {r.run_id: rank for rank, c in enumerate(configs or [], 1) for r in c.runs}


def render_csv(ranked: Sequence[RunRecord], others: Sequence[RunRecord], cis: Intervals | None = None,
               configs: Sequence[Configuration] | None = None) -> str:
    """One row per run: ranked done runs, then failed/missing (empty rank, status says why)."""
    keys = override_keys([*ranked, *others])
    by_run = _config_ranks(configs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "run_id", "name", "status", "dev_macro_f1", "test_macro_f1", "best_step",
                     "dev_ci95_low", "dev_ci95_high", "test_ci95_low", "test_ci95_high", "config_rank",
                     *keys, "reason"])
    for rank, r in [*enumerate(ranked, 1), *((None, r) for r in others)]:
        writer.writerow([_cell(rank), r.run_id, r.name, r.status, _cell(r.dev_macro_f1),
                         _cell(r.test_macro_f1), _cell(r.best_step),
                         *(_cell(v) for v in _bounds(cis, r.run_id, "dev") + _bounds(cis, r.run_id, "test")),
                         _cell(by_run.get(r.run_id)),
                         *(_override(r.overrides.get(k)) for k in keys), _cell(r.reason)])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def pct(x: float | None, missing: str = "") -> str:
    return missing if x is None else f"{100 * x:.2f}"


def pct_ci(ci: Sequence[float] | None) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def mean_pm(mean: float | None, std: float | None) -> str:
    """"82.10 ± 1.30" (std over seeds), just the mean for one seed, "" when unknown."""
    if mean is None:
        return ""
    return pct(mean) + ("" if std is None else f" ± {100 * std:.2f}")


def configurations_md(configs: Sequence[Configuration], members: Sequence[str] = ()) -> list[str]:
    """Configurations ranked by mean dev macro-F1 over seeds, with their runs."""
    head = ["rank", "configuration", "seeds", "dev macro-F1 (mean ± std)", "test macro-F1 (mean ± std)", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, c in enumerate(configs, 1):
        runs = ", ".join(f"{r.run_id}{' *' if r.run_id in members else ''}" for r in c.runs)
        row = [str(rank), c.name, str(c.n), mean_pm(c.dev_mean, c.dev_std), mean_pm(c.test_mean, c.test_std), runs]
        lines.append("| " + " | ".join(_md_escape(x) for x in row) + " |")
    return lines


def render_md(ranked: Sequence[RunRecord], others: Sequence[RunRecord], members: Sequence[str] = (),
              title: str = "Leaderboard", cis: Intervals | None = None,
              configs: Sequence[Configuration] | None = None) -> str:
    """Markdown: configurations over seeds (when the grid has seeds), every ranked run
    (ensemble members starred) with its 95 % CIs, then a failed/missing section."""
    keys = override_keys([*ranked, *others])
    lines = [f"# {title}", "",
             f"{len(ranked)} done, {sum(r.status == 'failed' for r in others)} failed, "
             f"{sum(r.status == 'missing' for r in others)} missing. Macro-F1 in %; "
             "`*` marks ensemble members. 95 % CI: stratified bootstrap over the split's items "
             "(1000 resamples).", ""]
    if configs and has_seeds(configs):
        lines += ["## Configurations", "",
                  f"{len(configs)} configurations: runs that differ only in `train.seed`, ranked by their "
                  "mean dev macro-F1 over seeds (± sample std over seeds).", ""]
        lines += configurations_md(configs, members) + ["", "## Runs", ""]
    head = ["rank", "run_id", "name", "dev macro-F1", "test macro-F1", "dev 95% CI", "test 95% CI",
            "best step", *keys]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, r in enumerate(ranked, 1):
        star = " *" if r.run_id in members else ""
        ci = (cis or {}).get(r.run_id, {})
        row = [f"{rank}{star}", r.run_id, r.name, pct(r.dev_macro_f1), pct(r.test_macro_f1),
               pct_ci(ci.get("dev")), pct_ci(ci.get("test")) if r.test_macro_f1 is not None else "—",
               _cell(r.best_step), *(_override(r.overrides.get(k)) for k in keys)]
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    if not ranked:
        lines.append("| " + " | ".join(["—"] * len(head)) + " |")
    lines += ["", "## Failed and missing runs", ""]
    if not others:
        lines.append("None.")
    else:
        lines += ["| run_id | name | status | reason |", "|---|---|---|---|"]
        for r in others:
            reason = r.reason or ("no final.json (crashed, cancelled or never ran)" if r.status == RunStatus.MISSING else "")
            lines.append("| " + " | ".join(_md_escape(c) for c in [r.run_id, r.name, r.status, reason]) + " |")
    return "\n".join(lines) + "\n"


def run_summary(results_dir: Any, records: Sequence[RunRecord], body: Sequence[str], notes: Sequence[str],
                what: str = "") -> str:
    """What an aggregation prints: the runs by state, ``body`` (its rankings and ensembles),
    then each failure and note."""
    failed = [r for r in records if r.status == RunStatus.FAILED]
    missing = [r.run_id for r in records if r.status == RunStatus.MISSING]
    done = len(records) - len(failed) - len(missing)
    lines = [f"[aggregate] {results_dir}: {done} done, {len(failed)} failed, {len(missing)} missing{what}", *body]
    lines += [f"[aggregate] failed: {r.run_id} ({r.reason})" for r in failed]
    lines += [f"[aggregate] missing (no final.json): {', '.join(missing)}"] if missing else []
    return "\n".join(lines + [f"[aggregate] note: {n}" for n in notes])
