"""Ablation of the pooling and fusion choices: one row per (modalities, pooling, fusion) cell.

Shown only when the grid varies ``model.pooling`` and/or ``model.fusion``. A cell pools
every done run with those values, whatever their seeds and other axes, so its mean ± std
says how the choice does across the rest of the grid, not at one lucky point. Runs of one
modality (text-only or audio-only entries) get cells of their own, fusion "—": they are
the baselines the fused rows are read against, never mixed into them.
"""
from __future__ import annotations

from typing import Any, Sequence

from ser_hpc.ensemble.analysis import SplitStats
from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.stats import mean_std, percentile_ci

KEYS = ("model.pooling", "model.fusion")


def _value(record: RunRecord, entry: dict, key: str) -> Any:
    """The run's value: its grid override, else its resolved config in plan.json, else unknown."""
    if key in record.overrides:
        return record.overrides[key]
    node: Any = entry.get("config") or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if node is not None else "—"


def varied(records: Sequence[RunRecord]) -> bool:
    return any(len({str(r.overrides[k]) for r in records if k in r.overrides}) > 1 for k in KEYS)


def ablation_rows(ranked: Sequence[RunRecord], records: Sequence[RunRecord], plan: dict,
                  stats: dict[str, SplitStats | None]) -> list[dict] | None:
    """Cells, best mean dev macro-F1 first, or None when neither key varies.

    The interval of a cell is that of its mean macro-F1 under the stratified resampling of
    the items, the runs held fixed (the mean of the runs' paired bootstrap distributions);
    the spread over runs is the ± std beside it.
    """
    if not varied(records):
        return None
    entries = {e.get("run_id"): e for e in plan.get("runs", [])}
    cells: dict[tuple, list[RunRecord]] = {}
    for r in ranked:
        entry = entries.get(r.run_id, {})
        modalities = str(_value(r, entry, "model.modalities"))
        pooling, fusion = (str(_value(r, entry, k)) for k in KEYS)
        one_modality = modalities in ("audio", "text")
        cells.setdefault((modalities, pooling, "—" if one_modality else fusion), []).append(r)
    rows = []
    for (modalities, pooling, fusion), runs in cells.items():
        row: dict[str, Any] = {"modalities": modalities, "pooling": pooling, "fusion": fusion, "n_runs": len(runs),
                               "run_ids": [r.run_id for r in runs]}
        for split in ("dev", "test"):
            mean, std = mean_std([getattr(r, f"{split}_macro_f1") for r in runs])
            s = stats.get(split)
            ids = [r.run_id for r in runs]
            ci = list(percentile_ci(s.runs_mean(ids)[0])) if s is not None and s.covers(ids) else None
            row.update({f"{split}_mean": mean, f"{split}_std": std, f"{split}_ci95": ci})
        rows.append(row)
    return sorted(rows, key=lambda row: -row["dev_mean"])
