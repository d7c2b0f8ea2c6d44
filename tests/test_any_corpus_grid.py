"""A 5-class audio-only manifest corpus and an EmoBox-layout corpus, 3 folds each, through
jobs/launch_grid.py --cluster local to a report with per-fold and mean ± std figures, then
jobs/predict.py on the fold ensembles."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.corpora import CLASSES, make_emobox_corpus, make_manifest_corpus

pytestmark = pytest.mark.slow  # end-to-end: real processes, real (tiny) backbones
PY = sys.executable


def _grid(tmp, name, data: dict, speech: str) -> str:
    base = {"data": {**data, "crop_seconds": 1.0, "eval_batch_size": 16, "dev_fraction": 0.2},
            "model": {"modalities": "audio", "speech": {"name": speech}, "head_width": 32},
            "train": {"lr": 2e-3, "batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 2}}
    (tmp / f"{name}_base.yaml").write_text(yaml.safe_dump(base))
    grid = {"name": name, "run_config": f"{name}_base.yaml",
            "backbone_pairs": [{"name": "w2v", "speech": speech}],  # a speech encoder alone
            "axes": {"data.fold": [1, 2, 3], "model.hidden_layers": [1, 2]},
            "pack_size": 2, "ensemble": {"top_k": 1, "method": "mean"}, "results_dir": str(tmp / "results")}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def _launch(grid: str):
    res = subprocess.run([PY, str(REPO / "jobs" / "launch_grid.py"), grid, "--cluster", "local"], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _check_fold_results(out, labels):
    meta = json.loads((out / "ensemble" / "ensemble.json").read_text())
    assert meta["labels"] == list(labels)
    folds = meta["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3]
    for key, field in (("macro_f1", "test_macro_f1"), ("ua", "test_ua"), ("wa", "test_wa")):
        values = [f[field] for f in folds]
        assert meta["mean"][key] == pytest.approx(np.mean(values))
        assert meta["std"][key] == pytest.approx(np.std(values, ddof=1))
    for f in folds:  # each fold ensemble is a complete ensemble over this grid's classes
        sub = json.loads((out / "ensemble" / f"fold_{f['fold']}" / "ensemble.json").read_text())
        assert sub["labels"] == list(labels) and sub["test_macro_f1"] == pytest.approx(f["test_macro_f1"])
        with open(out / "ensemble" / f"fold_{f['fold']}" / "test_probs.csv", newline="") as fh:
            assert next(csv.reader(fh)) == ["id", "label", *labels]
    report = (out / "ensemble" / "report.md").read_text()
    assert "±" in report and "fold" in report.lower()
    # every run's folder carries the classes it was trained on
    for run in (out / "runs").iterdir():
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["labels"] == list(labels)
        assert json.loads((run / "final.json").read_text())["labels"] == list(labels)
    return meta


def test_manifest_and_emobox_corpora_through_the_grid_with_folds(demo_assets, tmp_path):
    speech = str(demo_assets["backbones"]["wav2vec2-tiny"])
    # 1. A plain 5-class manifest (no neutral), speakers, 3 generated speaker-independent folds.
    manifest = make_manifest_corpus(tmp_path / "m", "csv", n_per_class=8, speakers=6)
    grid = _grid(tmp_path, "man", {"format": "manifest", "manifest": str(manifest),
                                   "audio_dir": str(tmp_path / "m" / "audio"), "folds": 3}, speech)
    _launch(grid)
    out = tmp_path / "results" / "man"
    meta = _check_fold_results(out, sorted(CLASSES))
    # predict with the fold ensembles together (mean of probabilities), and with one fold
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))[:6]
    inputs = tmp_path / "predict.csv"
    with open(inputs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        w.writerows([r["audio"], r["label"]] for r in rows)
    for extra in ([], ["--fold", "2"]):
        res = subprocess.run([PY, str(REPO / "jobs" / "predict.py"), str(out / "ensemble"),
                              "--csv", str(inputs), "--audio-dir", str(tmp_path / "m" / "audio"),
                              "--out", str(tmp_path / "pred.csv"), "--no-progress", *extra],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with open(tmp_path / "pred.csv", newline="") as fh:
            got = list(csv.reader(fh))
        assert got[0] == ["id", "label", *meta["labels"]] and len(got) == 7
        assert all(r[1] in meta["labels"] and sum(map(float, r[2:])) == pytest.approx(1, abs=1e-4) for r in got[1:])

    # 2. An EmoBox-layout corpus with its own 3 folds and label_map.json.
    data_root, audio_dir = make_emobox_corpus(tmp_path / "e", n_per_class=8, speakers=6, folds=3)
    grid = _grid(tmp_path, "ebx", {"format": "emobox", "root": str(data_root), "audio_dir": str(audio_dir)},
                 speech)
    _launch(grid)
    label_map = json.loads((data_root / "label_map.json").read_text())
    _check_fold_results(tmp_path / "results" / "ebx", list(dict.fromkeys(label_map.values())))
