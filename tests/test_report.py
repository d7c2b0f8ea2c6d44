"""ensemble/report.md written by the aggregation job: sections, numbers, intervals and figures.

The main test reads the report of a real trained grid (the fixture shared with
test_predict.py); the others use synthetic results trees, which are enough for the
fallbacks (no training curves, unknown backbones) and for failure handling.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from ser_hpc.ensemble import build as build_module
from ser_hpc.ensemble.aggregate import AggregateError, aggregate
from ser_hpc.ensemble.report import REPORT_FILES, hidden_size
from ser_hpc.ensemble.stats import chance_macro_f1
from tests.test_aggregate import SEEDED, make_grid_tree, make_tree, write_run
from tests.test_predict import trained_grid  # noqa: F401  (session fixture: a real trained grid)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["## Backbone pairs", "## Head grid", "## Training curves", "## Ensemble: confusion matrix and per-class F1"]
STATS_SECTIONS = ["## Backbone pairs", "## Head grid", "## Ensemble selection", "## Significance", "## Calibration",
                  "## Chance level", "## Training curves"]
CI = re.compile(r"^\[\d+\.\d\d, \d+\.\d\d\]$")


def pct(x):
    return f"{100 * x:.2f}"


def pct_ci(ci):
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def table(md: str, header_start: str, nth: int = 0) -> list[list[str]]:
    """The rows of the nth Markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith(header_start)][nth]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def check_png(path: Path) -> None:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, path
    assert len(raw) > 10_000, (path, len(raw))  # a drawn figure, not an empty canvas
    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05, (path, img.shape)


@pytest.mark.slow
def test_report_of_a_trained_grid(trained_grid, demo_assets):  # noqa: F811
    ens_dir = trained_grid / "ensemble"
    md = (ens_dir / "report.md").read_text()
    meta = json.loads((ens_dir / "ensemble.json").read_text())
    assert [md.index(s) for s in SECTIONS] == sorted(md.index(s) for s in SECTIONS)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(images) >= {"report_pairs.png", "report_curves.png", "report_per_class_f1.png",
                           "confusion_matrix.png", "confusion_matrix_test.png", "reliability.png"}
    for name in images:
        check_png(ens_dir / name)

    finals = {p.parent.name: json.loads(p.read_text()) for p in trained_grid.glob("runs/*/final.json")}
    plan = json.loads((trained_grid / "plan.json").read_text())
    pair_of = {r["run_id"]: r["pair"] for r in plan["runs"]}

    # The poster's first table: best dev macro-F1 per pair, models and their output dims.
    bb = demo_assets["backbones"]
    configs = {k: json.loads((Path(v) / "config.json").read_text()) for k, v in bb.items()}
    dim = {k: c.get("hidden_size", c.get("d_model")) for k, c in configs.items()}
    expect = {"w2v+roberta": ("roberta-tiny", "wav2vec2-tiny", [dim["wav2vec2-tiny"], dim["roberta-tiny"]]),
              "wavlm+bert": ("bert-tiny", "wavlm-tiny", [dim["wavlm-tiny"], dim["bert-tiny"]]),
              "w2v-audio": ("—", "wav2vec2-tiny", [dim["wav2vec2-tiny"]]),
              "w2v-ft+roberta": ("roberta-tiny", "wav2vec2-tiny", [dim["wav2vec2-tiny"], dim["roberta-tiny"]])}
    pairs = table(md, "| pair | text model")
    assert sorted(r[0] for r in pairs) == sorted(expect)
    best = [float(r[4]) for r in pairs]
    assert best == sorted(best, reverse=True)
    for name, text, audio, out_dim, dev, _test, n, dev_ci, test_ci in pairs:
        assert CI.match(dev_ci) and CI.match(test_ci)
        e_text, e_audio, dims = expect[name]
        assert (text, audio) == (e_text, e_audio)
        assert out_dim == (str(dims[0]) if len(set(dims)) == 1 else " / ".join(map(str, dims)))
        top = max(f["dev_macro_f1"] for rid, f in finals.items() if pair_of[rid] == name)
        assert dev == f"{100 * top:.2f}" and n == "2"

    # The head grid: every run with its hidden layers and weight decay, then the ensemble row.
    grid = table(md, "| rank | run | pair | hidden layers")
    assert len(grid) == 8 + 1 and grid[-1][0] == "ensemble"
    assert grid[-1][5] == f"{100 * meta['dev_macro_f1']:.2f}" and grid[-1][6] == f"{100 * meta['test_macro_f1']:.2f}"
    assert grid[-1][7] == pct_ci(meta["dev_macro_f1_ci95"]) and grid[-1][8] == pct_ci(meta["test_macro_f1_ci95"])
    assert all(CI.match(row[7]) and CI.match(row[8]) for row in grid)  # every run's dev and test interval
    by_name = {r["name"]: r for r in plan["runs"]}
    for row in grid[:-1]:
        run = by_name[row[1]]
        assert row[0].endswith("*")  # all eight are members here
        assert row[3] == str(run["config"]["model"]["hidden_layers"])
        assert row[4] == str(run["config"]["train"]["weight_decay"])
        assert row[5] == f"{100 * finals[run['run_id']]['dev_macro_f1']:.2f}"
    assert [float(r[5]) for r in grid[:-1]] == sorted((float(r[5]) for r in grid[:-1]), reverse=True)

    # Confusion matrix as counts and normalised, and per-class F1, all from ensemble.json.
    counts = table(md, "| true \\ predicted")
    assert [r[0] for r in counts] == [f"**{c}**" for c in LABELS]
    assert [[int(v) for v in r[1:]] for r in counts] == meta["confusion_matrix_dev"]
    cm = np.array(meta["confusion_matrix_dev"], dtype=float)
    rows_with_examples = cm.sum(1) > 0
    norm_rows = table(md, "| true \\ predicted", nth=1)
    # a class with no dev item has no recall: its row reads "—", not a row of zeros
    assert all(set(r[1:]) == {"—"} for r, has in zip(norm_rows, rows_with_examples) if not has)
    norm = np.array([[float(v) for v in r[1:]] for r, has in zip(norm_rows, rows_with_examples) if has])
    expected = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(norm, expected[rows_with_examples], atol=0.005)
    per_class = table(md, "| class | dev | test")
    assert [r[0] for r in per_class] == list(LABELS)

    def cell(v):  # a class absent from a split is listed as absent, not scored 0
        return "absent" if v is None else f"{100 * v:.2f}"
    assert [r[1] for r in per_class] == [cell(meta["per_class_f1_dev"][c]) for c in LABELS]
    assert [r[2] for r in per_class] == [cell(meta["per_class_f1_test"][c]) for c in LABELS]
    for split in ("dev", "test"):
        absent = [c for c in LABELS if meta[f"per_class_f1_{split}"][c] is None]
        assert meta[f"absent_{split}"] == absent
        assert (f"have no {split} item" in md) == bool(absent)


def test_report_on_a_tree_without_curves_or_known_backbones(tmp_path):
    root = tmp_path / "g"
    make_tree(root)  # hand-made runs: no metrics.jsonl, no model names, no pair names
    res = aggregate(root)
    md = (root / "ensemble" / "report.md").read_text()
    for s in SECTIONS:
        assert s in md
    assert "No metrics.jsonl in the top runs" in md and not (root / "ensemble" / "report_curves.png").exists()
    pairs = table(md, "| pair | text model")
    assert len(pairs) == 1 and pairs[0][3] == "?"  # one unnamed pair; dimension unknown
    assert pairs[0][4] == f"{100 * max(m['dev_macro_f1'] for m in res['members']):.2f}"
    for name in ("report_pairs.png", "report_per_class_f1.png", "reliability.png"):
        check_png(root / "ensemble" / name)
    check_stats_sections(md, res)
    # Every member's head is in the folder: it serves jobs/predict.py.
    assert sorted(p.name for p in (root / "ensemble" / "members").iterdir()) == sorted(
        {m["run_id"] for m in res["members"]})

    # An aggregation that fails afterwards leaves no stale report beside its leaderboard, and
    # the complete ensemble before it stays published.
    for d in (root / "runs").iterdir():
        write_run(root, d.name, d.name, status="failed", reason="boom")
    with pytest.raises(AggregateError, match="the previous ensemble") as info:
        aggregate(root)
    failed_board = Path(str(info.value).rsplit("leaderboard is in ", 1)[1])
    assert "boom" in (failed_board / "leaderboard.md").read_text()
    assert not any((failed_board / name).exists() for name in REPORT_FILES)
    assert (root / "ensemble" / "ensemble.json").is_file() and (root / "ensemble" / "report.md").is_file()


def check_stats_sections(md: str, res: dict) -> None:
    """The statistical sections state exactly ensemble.json's numbers."""
    assert [md.index(s) for s in STATS_SECTIONS] == sorted(md.index(s) for s in STATS_SECTIONS)
    head = md.split("## Backbone pairs")[0]
    assert f"dev {pct(res['dev_macro_f1'])} {pct_ci(res['dev_macro_f1_ci95'])}" in head
    assert f"test {pct(res['test_macro_f1'])} {pct_ci(res['test_macro_f1_ci95'])}" in head
    assert "selection-biased" in head and f"cross-fitted estimate {pct(res['dev_macro_f1_crossfit'])}" in head
    chance = res["chance_macro_f1"]["dev"]
    assert f"uniform guessing {pct(chance['uniform'])}, always the majority class {pct(chance['majority'])}" in head
    # Both selections side by side, the configured one marked.
    sel = table(md, "| selection | size | members")
    assert [r[0] for r in sel] == [f"topk{' (used)' if res['selection'] == 'topk' else ''}",
                                   f"greedy{' (used)' if res['selection'] == 'greedy' else ''}"]
    for row, name in zip(sel, ("topk", "greedy")):
        s = res["selections"][name]
        assert row[1] == str(s["n_members"])
        assert row[3] == f"{pct(s['dev_macro_f1'])} {pct_ci(s['dev_macro_f1_ci95'])}"
        assert row[4] == pct(s["dev_macro_f1_crossfit"])
        assert row[5] == f"{pct(s['test_macro_f1'])} {pct_ci(s['test_macro_f1_ci95'])}"
        assert row[6] == pct(s["dev_ece"]) and row[7] == pct(s["test_ece"])
    assert "**The dev column is selection-biased**" in md
    sig = table(md, "| a | b | split")
    assert len(sig) == len(res["significance"]) >= 2
    for row, t in zip(sig, res["significance"]):
        assert row[:3] == [t["a"], t["b"], t["split"]]
        assert row[3] == f"{100 * t['delta']:+.2f}" and row[5] == f"{t['p']:.3f}"
    cal = md.split("## Calibration")[1].split("##")[0]
    assert f"Dev ECE {pct(res['dev_ece'])} %" in cal and f"test ECE {pct(res['test_ece'])} %" in cal
    assert "![Reliability diagram](reliability.png)" in cal
    rows = table(md, "| split | items | uniform guessing")
    assert rows[0] == ["dev", str(chance["n"]), pct(chance["uniform"]), pct(chance["majority"])]


def test_report_chance_levels_follow_the_dev_class_counts(tmp_path):
    root = tmp_path / "g"
    data = make_tree(root)
    res = aggregate(root)
    want = chance_macro_f1(data["dev_y"], len(LABELS))
    assert res["chance_macro_f1"]["dev"]["uniform"] == pytest.approx(want["uniform"])
    assert want["uniform"] == pytest.approx(1 / 6)  # this tree's dev set is balanced


def test_report_configurations_over_seeds(tmp_path):
    root = tmp_path / "g"
    make_grid_tree(root, SEEDED)
    res = aggregate(root)
    md = (root / "ensemble" / "report.md").read_text()
    assert md.index("## Configurations over seeds") < md.index("## Head grid")
    rows = table(md, "| rank | configuration | seeds")
    assert [r[1] for r in rows] == [c["name"] for c in res["configurations"]]
    for row, c in zip(rows, res["configurations"]):
        assert row[2] == "3" and row[3] == f"{pct(c['dev_mean'])} ± {pct(c['dev_std'])}"
        assert row[4] == f"{pct(c['test_mean'])} ± {pct(c['test_std'])}"
    assert "## Ablation" not in md and res["ablation"] is None  # pooling and fusion are not varied here


def test_report_ablation_table_for_pooling_and_fusion(tmp_path):
    root = tmp_path / "g"
    # (modalities, pooling, fusion): a text-only entry (fusion pinned to late) is a cell of its
    # own, fusion "—", never pooled with the fused late runs
    quality = {("audio+text", "attention", "early"): 3.8, ("audio+text", "attention", "late"): 3.4,
               ("text", "attention", "—"): 3.0, ("audio+text", "mean", "early"): 2.6,
               ("audio+text", "mean", "late"): 2.2}
    runs = []
    for (modalities, pooling, fusion), q in quality.items():
        for seed in (1, 2):
            runs.append((f"{modalities}-{pooling}-{fusion}-s{seed}", f"p pooling={pooling} fusion={fusion} seed={seed}",
                         {"model.modalities": modalities, "model.pooling": pooling,
                          "model.fusion": "late" if fusion == "—" else fusion, "train.seed": seed}, q + 0.1 * seed))
    make_grid_tree(root, runs)
    res = aggregate(root)
    finals = {p.parent.name: json.loads(p.read_text()) for p in root.glob("runs/*/final.json")}
    cells = res["ablation"]
    assert [(c["modalities"], c["pooling"], c["fusion"]) for c in cells] == list(quality)  # best mean first
    for c in cells:
        ids = [f"{c['modalities']}-{c['pooling']}-{c['fusion']}-s{s}" for s in (1, 2)]
        assert sorted(c["run_ids"]) == sorted(ids) and c["n_runs"] == 2
        dev = [finals[i]["dev_macro_f1"] for i in ids]
        assert c["dev_mean"] == pytest.approx(np.mean(dev)) and c["dev_std"] == pytest.approx(np.std(dev, ddof=1))
        lo, hi = c["dev_ci95"]
        assert lo < c["dev_mean"] < hi and len(c["test_ci95"]) == 2
    md = (root / "ensemble" / "report.md").read_text()
    assert md.index("## Head grid") < md.index("## Ablation: pooling × fusion") < md.index("## Ensemble selection")
    assert "the mean of the runs' paired bootstrap distributions" in md  # the caption says which CI
    rows = table(md, "| modalities | pooling | fusion | runs")
    assert len(rows) == 5
    for row, c in zip(rows, cells):
        assert row[:4] == [c["modalities"], c["pooling"], c["fusion"], "2"]
        assert row[4] == f"{pct(c['dev_mean'])} ± {pct(c['dev_std'])}" and row[5] == pct_ci(c["dev_ci95"])
        assert row[6] == f"{pct(c['test_mean'])} ± {pct(c['test_std'])}" and row[7] == pct_ci(c["test_ci95"])


def test_a_failing_report_does_not_lose_the_ensemble(tmp_path, monkeypatch):
    root = tmp_path / "g"
    make_tree(root)

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this node")

    monkeypatch.setattr(build_module, "write_report", broken)
    res = aggregate(root)
    assert any("report.md not written: RuntimeError: no fonts on this node" in n for n in res["notes"])
    assert (root / "ensemble" / "ensemble.json").exists() and not (root / "ensemble" / "report.md").exists()


def test_hidden_size_is_read_offline(tmp_path):
    model = tmp_path / "models" / "enc"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    assert hidden_size(str(model), None) == 1024
    assert hidden_size("models/enc", str(tmp_path)) == 1024  # relative to the launch dir
    assert hidden_size("nobody/not-a-cached-model", str(tmp_path)) is None
    assert hidden_size(None, None) is None
    (model / "config.json").write_text(yaml.safe_dump({"no": "json"}))
    assert hidden_size(str(model), None) is None
