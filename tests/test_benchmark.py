"""Benchmark mode: several corpora in one grid (corpora:), one ensemble per corpus, one table
across corpora, and cross-corpus evaluation over shared classes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ser_hpc.config import ConfigError
from ser_hpc.grid.plan import expand, load_grid, make_packs
from tests.conftest import REPO, run_config_tree, shared_folder

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def acted(tmp_path_factory):
    from ser_hpc.demo.corpus import generate_variant_corpus
    with shared_folder(tmp_path_factory, "acted_corpus") as root:
        return generate_variant_corpus(root, "acted", n_per_class=16, progress=False)


def _grid(tmp_path, assets, acted, name="bench", corpora=None, **extra):
    base = run_config_tree(assets, "unused", **{"train.features": "cached", "data.features_dir": str(tmp_path / "feat"),
                                                "train.max_steps": 6, "train.eval_every": 3, "data.crop_seconds": 0.0})
    del base["run"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bb = assets["backbones"]
    acted_data = {"format": "manifest", "manifest": acted["manifest_path"], "audio_dir": acted["audio_dir"],
                  "columns": {"audio": "path", "label": "emotion", "text": "text", "speaker": "speaker"},
                  "label_map": acted["label_map"], "folds": 4, "dev_fraction": 0.25, "test_csv": None,
                  "test_labels_csv": None}
    grid = {"name": name, "run_config": "base.yaml",
            "corpora": corpora if corpora is not None else [
                {"name": "demo", "data": {}}, {"name": "acted", "data": acted_data, "folds": [1, 2]}],
            "backbone_pairs": [{"name": "w2v+roberta", "speech": str(bb["wav2vec2-tiny"]),
                                "text": str(bb["roberta-tiny"])}],
            "axes": {"model.hidden_layers": [1]}, "pack_size": 4, "ensemble": {"top_k": 1, "method": "mean"},
            "results_dir": str(tmp_path / "results"), **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_bad_benchmark_grids_are_refused_by_name(demo_assets, acted, tmp_path):
    demo = {"name": "demo", "data": {}}
    with pytest.raises(ConfigError, match="two corpora are named 'demo'"):
        load_grid(_grid(tmp_path, demo_assets, acted, corpora=[demo, demo]))
    with pytest.raises(ConfigError, match="cross_corpus.test names nope, which is not a corpus of this grid"):
        load_grid(_grid(tmp_path, demo_assets, acted, cross_corpus={"train": ["demo"], "test": ["nope"]}))
    with pytest.raises(ConfigError, match=r"run 'demo .*fold=1'.*data.fold=1 but this corpus has no folds \(data.format "
                                          "emospeech"):
        expand(load_grid(_grid(tmp_path, demo_assets, acted, corpora=[{"name": "demo", "data": {}, "folds": [1, 2]}])))
    with pytest.raises(ConfigError, match="give each corpus its own folds"):
        load_grid(_grid(tmp_path, demo_assets, acted, axes={"data.fold": [1, 2]}))


def test_a_pair_without_a_shared_class_stops_the_dry_run(demo_assets, acted, tmp_path):
    path = _grid(tmp_path, demo_assets, acted, cross_corpus={"train": ["demo"], "test": ["acted"]})
    tree = yaml.safe_load(path.read_text())
    tree["corpora"][1]["data"]["label_map"] = {"A": "rage", "H": "glee", "N": "calm", "S": "gloom"}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(path), "--dry-run",
                          "--cluster", "local", "--quick-check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "cross_corpus: demo" in res.stderr and "share no class" in res.stderr, \
        res.stderr[-2000:]
    assert "corpora (2):" in res.stdout and "acted: 2 run(s)" in res.stdout and "folds [1, 2]" in res.stdout


def test_two_thousand_runs_expand_with_the_corpus_in_every_name(tmp_path):
    corpora = [{"name": f"c{i}", "folds": [1, 2, 3, 4, 5],
                "data": {"format": "manifest", "manifest": f"/data/c{i}.csv", "folds": 5}} for i in range(10)]
    pairs = [{"name": f"enc{j}", "speech": f"/models/enc{j}"} for j in range(5)]
    grid = {"name": "big", "corpora": corpora, "backbone_pairs": pairs,
            "axes": {"model.hidden_layers": [1, 2], "model.dropout": [0.1, 0.2], "train.lr": [1e-3, 3e-3]},
            "overrides": {"data.features_dir": "f", "train.features": "cached"}, "pack_size": 8}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    runs = expand(load_grid(tmp_path / "g.yaml"))
    assert len(runs) == 2000 and len({r.run_id for r in runs}) == 2000
    assert runs[0].name.startswith("c0 enc0 ") and runs[-1].run_id.startswith("c9.enc4.") and "fold5" in runs[-1].run_id
    packs = make_packs(runs, 8)
    assert len(packs) == 10 * 5 * 5  # the 8 head settings of a corpus, encoder and fold share a pack
    assert all(len({r.corpus for r in p}) == 1 for p in packs)


@pytest.mark.slow
def test_a_benchmark_grid_end_to_end(demo_assets, acted, tmp_path):
    path = _grid(tmp_path, demo_assets, acted, cross_corpus={"train": ["demo", "acted"], "test": ["demo", "acted"]})
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(path), "--cluster", "debug"],
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ens = tmp_path / "results" / "bench" / "ensemble"
    meta = json.loads((ens / "ensemble.json").read_text())
    assert meta["kind"] == "benchmark" and meta["ensembles"] == {"demo": "demo", "acted": "acted"}
    bench = json.loads((ens / "benchmark.json").read_text())
    assert bench["corpora"] == ["demo", "acted"]
    rows = {r["corpus"]: r for r in bench["table"]}
    assert rows["acted"]["folds"] == 2 and rows["acted"]["std_over"] == "folds" and rows["demo"]["std_over"] is None
    for r in rows.values():
        assert r["config"] == "w2v+roberta hidden_layers=1" and r["split"] == "test"
        assert r["macro_f1_ci95"][0] <= r["macro_f1"] <= r["macro_f1_ci95"][1] and 0 <= r["ua"] <= 1
    md = (ens / "benchmark.md").read_text()
    assert "| configuration | demo | acted | mean | mean rank |" in md and "**" in md
    assert "[report](acted/report.md)" in md and "## Cross-corpus" in md
    assert (ens / "benchmark.png").read_bytes()[:8] == PNG and (ens / "cross_corpus.png").read_bytes()[:8] == PNG
    cross = {(c["train"], c["test"]): c for c in bench["cross_corpus"]}
    assert set(cross) == {("demo", "acted"), ("acted", "demo")}
    shared = ["neutral", "anger", "sadness", "joy"]
    assert cross[("demo", "acted")]["classes"] == shared and cross[("demo", "acted")]["dropped_test_clips"] == {}
    assert cross[("acted", "demo")]["classes"] == ["anger", "joy", "neutral", "sadness"]
    dropped = cross[("acted", "demo")]["dropped_test_clips"]
    assert set(dropped) == {"disgust", "fear"} and cross[("acted", "demo")]["n_clips"] == 96 - sum(dropped.values())
    # acted's test split is the union of the grid's test folds: the items its table row scores
    assert cross[("demo", "acted")]["n_clips"] == rows["acted"]["n_items"] == 32
    # Each corpus's ensemble is a complete one that jobs/predict.py loads; the top folder says where they are.
    clip = next((demo_assets["corpus"] / "audio").iterdir())
    for corpus in ("demo", "acted"):
        out = subprocess.run([sys.executable, str(REPO / "jobs" / "predict.py"), str(ens / corpus), "--audio",
                              str(clip), "--text", "hola"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "predict.py"), str(ens), "--audio", str(clip),
                          "--text", "hola"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "one ensemble per corpus of a benchmark grid (demo, acted)" in out.stderr
    status = subprocess.run([sys.executable, str(REPO / "jobs" / "status.py"), str(ens.parent), "--no-slurm"],
                            capture_output=True, text=True, timeout=120)
    assert "3 runs" in status.stdout and "acted.w2v+roberta.hidden_layers1.fold2-" in status.stdout
