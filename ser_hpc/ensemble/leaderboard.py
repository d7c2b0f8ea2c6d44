"""Rank finished runs and render the leaderboard as Markdown (humans) and CSV (scripts).

Rendering returns strings and never writes: the caller writes them atomically, and the
output contains no timestamp so a rerun on the same tree produces identical bytes.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

from ser_hpc.ensemble.collect import RunRecord


def rank_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Done runs, best dev macro-F1 first; ties by name then run_id so the order is stable."""
    done = [r for r in records if r.status == "done"]
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


def render_csv(ranked: Sequence[RunRecord], others: Sequence[RunRecord]) -> str:
    """One row per run: ranked done runs, then failed/missing (empty rank, status says why)."""
    keys = override_keys([*ranked, *others])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "run_id", "name", "status", "dev_macro_f1", "test_macro_f1", "best_step",
                     *keys, "reason"])
    for rank, r in [*enumerate(ranked, 1), *((None, r) for r in others)]:
        writer.writerow([_cell(rank), r.run_id, r.name, r.status, _cell(r.dev_macro_f1),
                         _cell(r.test_macro_f1), _cell(r.best_step),
                         *(_override(r.overrides.get(k)) for k in keys), _cell(r.reason)])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_md(ranked: Sequence[RunRecord], others: Sequence[RunRecord], members: Sequence[str] = (),
              title: str = "Leaderboard") -> str:
    """Markdown table of ranked runs (ensemble members starred), then a failed/missing section."""
    keys = override_keys([*ranked, *others])

    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.2f}"

    lines = [f"# {title}", "",
             f"{len(ranked)} done, {sum(r.status == 'failed' for r in others)} failed, "
             f"{sum(r.status == 'missing' for r in others)} missing. Macro-F1 in %; "
             "`*` marks ensemble members.", ""]
    head = ["rank", "run_id", "name", "dev macro-F1", "test macro-F1", "best step", *keys]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, r in enumerate(ranked, 1):
        star = " *" if r.run_id in members else ""
        row = [f"{rank}{star}", r.run_id, r.name, pct(r.dev_macro_f1), pct(r.test_macro_f1),
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
            reason = r.reason or ("no final.json (crashed, cancelled or never ran)" if r.status == "missing" else "")
            lines.append("| " + " | ".join(_md_escape(c) for c in [r.run_id, r.name, r.status, reason]) + " |")
    return "\n".join(lines) + "\n"
