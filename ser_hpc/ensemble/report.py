"""ensemble/report.md: the grid's outcome laid out like the paper's poster, with uncertainty.

Sections: best dev macro-F1 per backbone pair (the poster's first table, with a bar
chart), configurations over seeds, the head grid (top runs with hidden layers and weight
decay, then the ensemble row), the pooling × fusion ablation, both ensemble selections,
paired tests, calibration (report_stats.py), chance levels, training curves of the top
runs, and the ensemble's confusion matrix and per-class F1. Every figure carries its
95 % bootstrap interval. Images sit next to report.md and are linked by relative name, so
the folder can be copied anywhere. Only small files are read: plan.json, run configs and metrics.jsonl of
the plotted runs. No timestamp, so a rerun on the same tree gives the same bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ser_hpc.atomic_io import write_text
from ser_hpc.ensemble import report_stats
from ser_hpc.ensemble.collect import RunRecord
from ser_hpc.ensemble.configurations import Configuration
from ser_hpc.ensemble.leaderboard import pct, pct_ci
from ser_hpc.ensemble.members import resolve_backbone
from ser_hpc.ensemble.report_stats import table
from ser_hpc.ensemble.report_plots import pair_bars, per_class_bars, training_curves
from ser_hpc.run_status import RunStatus
from ser_hpc.train.run_folder import RunFolder

REPORT_MD = "report.md"
PAIRS_PNG = "report_pairs.png"
CURVES_PNG = "report_curves.png"
PER_CLASS_PNG = "report_per_class_f1.png"
RELIABILITY_PNG = "reliability.png"  # drawn by the aggregation, linked here
REPORT_FILES = (REPORT_MD, PAIRS_PNG, CURVES_PNG, PER_CLASS_PNG, RELIABILITY_PNG)
TOP_RUNS = 10      # rows of the head-grid table
CURVE_RUNS = 5     # runs drawn in the training-curves figure


@dataclass
class RunInfo:
    pair: str
    speech: str | None
    text: str | None
    hidden_layers: Any
    weight_decay: Any


def _config(record: RunRecord, entry: dict) -> dict:
    """The run's resolved config: from plan.json when it has it, else the run's config.yaml."""
    if isinstance(entry.get("config"), dict):
        return entry["config"]
    try:
        tree = yaml.safe_load((record.run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, TypeError):
        return {}
    return tree if isinstance(tree, dict) else {}


def short(name: str | None, launch_dir: str | None = None) -> str:
    """A model's display name: a local folder's last part, or the hub id."""
    if not name:
        return "—"
    resolved = resolve_backbone(name, launch_dir)
    return Path(resolved).name if Path(resolved).exists() else name


def run_info(record: RunRecord, entry: dict) -> RunInfo:
    cfg = _config(record, entry)
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    used = str(model.get("modalities") or "audio+text").split("+")
    speech = (model.get("speech") or {}).get("name") if "audio" in used else None
    text = (model.get("text") or {}).get("name") if "text" in used else None
    pair = entry.get("pair") or (f"{short(text)}+{short(speech)}" if (speech or text) else "—")
    return RunInfo(pair, speech, text, model.get("hidden_layers", "—"), train.get("weight_decay", "—"))


def hidden_size(name: str | None, launch_dir: str | None) -> int | None:
    """The encoder's width from its config.json (``hidden_size``; Whisper's ``d_model``): a local
    folder, or the HF cache (offline)."""
    if not name:
        return None
    from ser_hpc.models.availability import resolve_offline
    try:
        found = resolve_offline(resolve_backbone(name, launch_dir), "config.json")
    except Exception:  # not a valid repo id, or no hub library: unknown, not an error
        return None
    if found is None:
        return None
    try:
        config = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    size = config.get("hidden_size") or config.get("d_model")  # d_model: Whisper
    return size if isinstance(size, int) else None


def _output_dim(info: RunInfo, launch_dir: str | None) -> str:
    """One number when the pair's encoders agree (as in the poster), else audio / text."""
    dims = [hidden_size(n, launch_dir) for n in (info.speech, info.text) if n]
    if not dims:
        return "?"
    if len(set(dims)) == 1:
        return "?" if dims[0] is None else str(dims[0])
    return " / ".join("?" if d is None else str(d) for d in dims)


def _pairs_section(out: Path, ranked: Sequence[RunRecord], infos: dict[str, RunInfo],
                   launch_dir: str | None, written: set[str], run_ci: dict) -> list[str]:
    best: dict[str, RunRecord] = {}
    count: dict[str, int] = {}
    for r in ranked:  # ranked best first: the first run seen of a pair is its best
        pair = infos[r.run_id].pair
        best.setdefault(pair, r)
        count[pair] = count.get(pair, 0) + 1
    rows, names, values = [], [], []
    for pair, r in best.items():
        info = infos[r.run_id]
        dim = _output_dim(info, launch_dir)
        ci = run_ci.get(r.run_id) or {}
        rows.append([pair, short(info.text, launch_dir), short(info.speech, launch_dir), dim, pct(r.dev_macro_f1),
                     pct(r.test_macro_f1), count[pair], pct_ci(ci.get("dev")),
                     pct_ci(ci.get("test")) if r.test_macro_f1 is not None else "—"])
        names.append(pair)
        values.append(r.dev_macro_f1)
    lines = ["## Backbone pairs", "",
             "Best dev macro-F1 (%) per backbone pair, the poster's first table recomputed from this grid. "
             "Output dimension: the encoders' `hidden_size` (audio / text when they differ). "
             "Test macro-F1 is that of the pair's best run; 95 % CIs are that run's (stratified bootstrap). "
             "The best of several runs is an optimistic pick on dev.", ""]
    lines += table(["pair", "text model", "audio model", "output dim", "best dev macro-F1",
                     "test macro-F1", "runs done", "dev 95% CI", "test 95% CI"], rows)
    if best:
        pair_bars(names, values, out / PAIRS_PNG, "Best dev macro-F1 per backbone pair")
        written.add(PAIRS_PNG)
        lines += ["", f"![Best dev macro-F1 per backbone pair]({PAIRS_PNG})"]
    return lines


def _head_grid_section(ranked: Sequence[RunRecord], infos: dict[str, RunInfo], result: dict,
                       run_ci: dict) -> list[str]:
    members = {m["run_id"] for m in result["members"]}
    rows = []
    for rank, r in enumerate(ranked[:TOP_RUNS], 1):
        info = infos[r.run_id]
        ci = run_ci.get(r.run_id) or {}
        rows.append([f"{rank}{' *' if r.run_id in members else ''}", r.name, info.pair, info.hidden_layers,
                     info.weight_decay, pct(r.dev_macro_f1), pct(r.test_macro_f1), pct_ci(ci.get("dev")),
                     pct_ci(ci.get("test")) if r.test_macro_f1 is not None else "—"])
    what = (f"{result['method']} of the top {result['n_members']}" if result.get("selection", "topk") == "topk"
            else f"{result['method']} of {result['n_members']} (greedy)")
    rows.append(["ensemble", what, "", "", "", pct(result["dev_macro_f1"]), pct(result.get("test_macro_f1")),
                 pct_ci(result.get("dev_macro_f1_ci95")),
                 pct_ci(result.get("test_macro_f1_ci95")) if result.get("test_macro_f1") is not None else "—"])
    more = f" ({len(ranked) - TOP_RUNS} more in [leaderboard.md](leaderboard.md))" if len(ranked) > TOP_RUNS else ""
    return (["## Head grid", "",
             f"Top {min(TOP_RUNS, len(ranked))} runs by dev macro-F1 (%){more}; `*` marks ensemble members. "
             f"{report_stats.BOOT}; the ensemble's dev figure is selection-biased (see Ensemble selection).", ""]
            + table(["rank", "run", "pair", "hidden layers", "weight decay", "dev macro-F1", "test macro-F1",
                      "dev 95% CI", "test 95% CI"], rows))


def _curves_section(out: Path, ranked: Sequence[RunRecord], written: set[str]) -> list[str]:
    series = []
    for r in ranked[:CURVE_RUNS]:
        recs = RunFolder(r.run_dir).read_metrics() if r.run_dir else []
        if recs:
            series.append({"label": r.name, "step": [x["step"] for x in recs],
                           **{k: [x.get(k) for x in recs] for k in ("dev_macro_f1", "train_loss", "dev_loss")}})
    lines = ["## Training curves", ""]
    if not series:
        return lines + ["No metrics.jsonl in the top runs: no curves to draw."]
    training_curves(series, out / CURVES_PNG, f"Top {len(series)} runs")
    written.add(CURVES_PNG)
    return lines + [f"Dev macro-F1 and loss vs optimizer step of the top {len(series)} runs.", "",
                    f"![Training curves of the top runs]({CURVES_PNG})"]


def _confusion_tables(cm: list[list[int]], labels: list[str]) -> list[str]:
    counts = [["**" + labels[i] + "**", *row] for i, row in enumerate(cm)]
    norm = [["**" + labels[i] + "**", *(f"{v / sum(row):.2f}" if sum(row) else "—" for v in row)]
            for i, row in enumerate(cm)]
    head = ["true \\ predicted", *labels]
    return (["Counts:", ""] + table(head, counts) + ["", "Normalised by true class (recall on the diagonal):", ""]
            + table(head, norm))


def _ensemble_section(out: Path, result: dict, written: set[str]) -> list[str]:
    lines = ["## Ensemble: confusion matrix and per-class F1", "",
             f"{result['method']} of {result['n_members']}: "
             + report_stats.bag_text([m["run_id"] for m in result["members"]]) + ".", "",
             f"### Dev (macro-F1 {pct(result['dev_macro_f1'])})", ""]
    labels = result["labels"]
    lines += _confusion_tables(result["confusion_matrix_dev"], labels)
    lines += ["", "![Dev confusion matrix](confusion_matrix.png)"]
    splits = {"dev": [result["per_class_f1_dev"][c] for c in labels]}
    if result.get("confusion_matrix_test"):
        lines += ["", f"### Test (macro-F1 {pct(result['test_macro_f1'])})", ""]
        lines += _confusion_tables(result["confusion_matrix_test"], labels)
        lines += ["", "![Test confusion matrix](confusion_matrix_test.png)"]
        splits["test"] = [result["per_class_f1_test"][c] for c in labels]
    rows = [[c, *(pct(v[k]) if v[k] is not None else "absent" for v in splits.values())]
            for k, c in enumerate(labels)]
    lines += ["", "### Per-class F1 (%)", ""] + table(["class", *splits], rows)
    for split in ("dev", "test"):
        absent = result.get(f"absent_{split}") or []
        if absent:
            lines += ["", f"**Warning:** class(es) {', '.join(absent)} have no {split} item: they are left out of "
                          f"the {split} macro-F1 and UA (not counted as 0)."]
    per_class_bars(labels, {k: [x if x is not None else 0.0 for x in v] for k, v in splits.items()},
                   out / PER_CLASS_PNG, "Ensemble per-class F1")
    written.add(PER_CLASS_PNG)
    return lines + ["", f"![Ensemble per-class F1]({PER_CLASS_PNG})"]


def write_report(out: Path, result: dict, ranked: Sequence[RunRecord], records: Sequence[RunRecord],
                 plan: dict, run_ci: dict | None = None, configs: Sequence[Configuration] = ()) -> set[str]:
    """Write report.md and its figures into ``out``; return the file names written.

    run_ci: run_id -> {"dev": [low, high] or None, "test": ...}; configs: the runs
    grouped over seeds (configurations.py), best mean first.
    """
    entries = {r.get("run_id"): r for r in plan.get("runs", [])}
    infos = {r.run_id: run_info(r, entries.get(r.run_id, {})) for r in ranked}
    written: set[str] = set()
    n_failed = sum(r.status == RunStatus.FAILED for r in records)
    n_missing = sum(r.status == RunStatus.MISSING for r in records)
    members = [m["run_id"] for m in result["members"]]
    lines = [f"# Report — {result['grid_name']}", "",
             f"{len(records)} runs: {len(ranked)} done, {n_failed} failed, {n_missing} missing "
             "(see [leaderboard.md](leaderboard.md)). Macro-F1 in %. " + report_stats.summary(result), ""]
    lines += _pairs_section(out, ranked, infos, plan.get("launch_dir"), written, run_ci or {}) + [""]
    lines += report_stats.configurations_section(configs, members, TOP_RUNS)
    lines += _head_grid_section(ranked, infos, result, run_ci or {}) + [""]
    lines += report_stats.ablation_section(result)
    lines += report_stats.selection_section(result)
    lines += report_stats.significance_section(result)
    png = RELIABILITY_PNG if (out / RELIABILITY_PNG).is_file() else None
    lines += report_stats.calibration_section(result, png)
    lines += report_stats.chance_section(result) + [""]
    lines += _curves_section(out, ranked, written) + [""]
    lines += _ensemble_section(out, result, written)
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    write_text(out / REPORT_MD, "\n".join(lines) + "\n")
    return written | {REPORT_MD}


def fold_section(result: dict) -> list[str]:
    """Grids with a data.fold axis: configurations over folds and the fold-averaged ensemble.

    ``result`` is the top-level ensemble.json of ensemble/folds.py; only such grids call this.
    """
    from ser_hpc.ensemble.leaderboard import mean_pm
    folds = [b["fold"] for b in result["folds"]]
    configs = result.get("configurations") or []
    top = set(result.get("top_configurations") or [])
    lines = ["## Configurations over folds", "",
             f"Per fold: macro-F1 (%) of the configuration, mean over its seeds; then mean ± sample std over "
             f"folds (EmoBox: per-fold scores, then mean). Ranked by mean dev macro-F1; `*`: in the ensemble "
             f"(top {result['top_k']}).", ""]
    rows = []
    for rank, c in enumerate(configs, 1):
        per = {f["fold"]: f for f in c["folds"]}
        cells = [("—" if f not in per else f"{pct(per[f]['dev_macro_f1'])} / {pct(per[f]['test_macro_f1']) or '—'}")
                 for f in folds]
        rows.append([f"{rank}{' *' if c['name'] in top else ''}", c["name"], *cells,
                     mean_pm(c["dev_mean"], c["dev_std"]), mean_pm(c["test_mean"], c["test_std"]) or "—"])
    lines += table(["rank", "configuration", *(f"fold {f} dev / test" for f in folds),
                     "dev (mean ± std)", "test (mean ± std)"], rows)
    lines += ["", "## Ensemble per fold", "",
              f"{result['method']} of every seed of the top {result['top_k']} configurations, built per fold "
              "from that fold's runs (details, members and intervals in each fold_K/report.md). Dev figures are "
              "selection-biased.", ""]
    rows = [[f"[{b['fold']}]({b['dir']}/report.md)", b["n_members"], pct(b["dev_macro_f1"]),
             pct(b["test_macro_f1"]) or "—", pct(b["test_ua"]) or "—", pct(b["test_wa"]) or "—"]
            for b in result["folds"]]
    m, s = result.get("mean") or {}, result.get("std") or {}
    dev, dev_s = result.get("dev_mean") or {}, result.get("dev_std") or {}
    rows.append(["**mean ± std**", "", mean_pm(dev.get("macro_f1"), dev_s.get("macro_f1")),
                 *(mean_pm(m.get(k), s.get(k)) or "—" for k in ("macro_f1", "ua", "wa"))])
    lines += table(["fold", "members", "dev macro-F1", "test macro-F1", "test UA", "test WA"], rows)
    return lines


def write_fold_report(out: Path, result: dict) -> set[str]:
    """report.md of a grid with folds: the fold sections; each fold_K/ has the full report."""
    lines = [f"# Report — {result['grid_name']} ({result['n_folds']} folds)", "",
             f"{result['n_done']} runs done, {result['n_failed']} failed, {result['n_missing']} missing "
             "(see [leaderboard.md](leaderboard.md)). Macro-F1, UA (unweighted average recall) and WA "
             "(accuracy) in %.", ""]
    lines += fold_section(result)
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    write_text(out / REPORT_MD, "\n".join(lines) + "\n")
    return {REPORT_MD}
