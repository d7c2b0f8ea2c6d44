"""Bad input and faults that used to arrive as tracebacks, too late, or left files behind:
a missing backbone on a cached run, an mp3 corrupt mid-stream, a torn feature shard, a
results folder that cannot be written, prefetch of impossible names, an EmoBox corpus
reached through a symlink."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, run_config_tree
from tests.test_grid import write_grid

PY = sys.executable


def _run(*args, cwd=REPO, timeout=300):
    return subprocess.run([PY, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def _dry_run(grid, *extra):
    return _run(REPO / "jobs" / "launch_grid.py", grid, "--cluster", "local", "--dry-run", *extra)


def test_a_missing_backbone_of_a_cached_run_is_a_clear_exit_2(demo_assets, tmp_path):
    for name, said in (("/nonexistent/a/b", "speech model path does not exist: /nonexistent/a/b"),
                       ("nonexistent/model", "cannot load speech model 'nonexistent/model'")):
        tree = run_config_tree(demo_assets, tmp_path / "run", **{"train.features": "cached",
                                                                 "data.features_dir": str(tmp_path / "feat"),
                                                                 "model.speech.name": name})
        cfg = tmp_path / "run.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        res = _run(REPO / "jobs" / "train.py", cfg)  # offline by default: no wait on the hub
        assert res.returncode == 2, res.stderr[-2000:]
        assert said in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def _corrupt_midstream(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


@pytest.mark.slow
def test_an_mp3_corrupt_mid_stream_stops_the_dry_run_and_is_decoded_once(demo_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SER_HPC_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_assets["corpus"], corpus)
    victim = sorted((corpus / "audio").iterdir())[5]
    _corrupt_midstream(demo_assets["corpus"] / "audio" / victim.name, victim)
    import soundfile as sf
    assert sf.info(str(victim)).frames > 0  # the header still reads: only a full decode finds it
    bb = demo_assets["backbones"]
    grid = write_grid(tmp_path, demo_assets, overrides={"data.train_csv": str(corpus / "train.csv"),
                                                        "data.audio_dir": str(corpus / "audio"),
                                                        "data.test_csv": str(corpus / "test.csv"),
                                                        "data.test_labels_csv": str(corpus / "test_labels.csv")},
                      pairs=[{"name": "p", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}])
    res = _dry_run(grid)
    assert res.returncode == 2, res.stdout + res.stderr[-2000:]
    assert "1 audio file(s) do not decode" in res.stderr and f"audio file {victim} is corrupt" in res.stderr
    assert "row " in res.stderr.split("do not decode")[1]  # names the CSV row
    victim.write_bytes((demo_assets["corpus"] / "audio" / victim.name).read_bytes())  # fixed
    res = _dry_run(grid)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "audio: 336 clip(s) decode completely (1 decoded now, 335 known" in res.stdout, res.stdout
    again = _dry_run(grid)
    assert "(0 decoded now, 336 known" in again.stdout  # decoded once, not once per launch
    quick = _dry_run(grid, "--quick-check")
    assert "audio: --quick-check: the files exist; they were not opened or decoded" in quick.stdout


@pytest.mark.slow
def test_a_torn_feature_shard_is_a_problem_with_its_fix(demo_assets, tmp_path):
    bb = demo_assets["backbones"]
    features = tmp_path / "feat"
    grid = write_grid(tmp_path, demo_assets, overrides={"train.features": "cached", "data.features_dir": str(features),
                                                        "train.max_steps": 2, "train.eval_every": 2},
                      pairs=[{"name": "p", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}],
                      axes={"model.hidden_layers": [1]})
    from ser_hpc.config import config_from_dict
    from ser_hpc.features.extract import extract
    from ser_hpc.grid.plan import expand, load_grid
    store = extract([config_from_dict(expand(load_grid(grid))[0].config)])
    shard = store.folder / "speech_v0.npy"
    shard.write_bytes(shard.read_bytes()[:-4096])
    res = _dry_run(grid)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"feature store shard {shard} is torn" in res.stderr and f"delete {store.folder}" in res.stderr


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MB file system of our own (root can mount one; CI runs as root)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_results_folder_without_room_or_write_access_stops_the_dry_run_and_a_failed_launch_cleans_up(
        demo_assets, tmp_path, tmpfs):
    from ser_hpc.grid.launch import launch, plan_launch
    bb = demo_assets["backbones"]
    pairs = [{"name": "p", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])}]
    # 1. A folder under a file, then a file system with less room than a grid needs.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    grid = write_grid(tmp_path, demo_assets, pairs=pairs, results_dir=str(blocker / "results"))
    res = _dry_run(grid, "--quick-check")
    assert res.returncode == 2 and f"{blocker} is a file, not a folder" in res.stderr, res.stderr[-2000:]
    grid = write_grid(tmp_path, demo_assets, pairs=pairs, results_dir=str(tmpfs / "results"))
    res = _dry_run(grid, "--quick-check")
    assert res.returncode == 2 and "MB free on its file system" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    # 2. The checks passed, then the file system turned read-only before the launch wrote:
    # the launch fails and leaves no lock, guard, temp file or grid file behind.
    import ser_hpc.grid.checks as checks
    old = checks.MIN_FREE_GB
    checks.MIN_FREE_GB = 0.01
    try:
        lp = plan_launch(str(grid), [], "local", quick_check=True)
    finally:
        checks.MIN_FREE_GB = old
    assert not lp.problems and "writable" in lp.results_check
    (tmpfs / "results").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        with pytest.raises(OSError):
            launch(lp, [])
        assert sorted(p.name for p in (tmpfs / "results").rglob("*")) == []  # nothing written, nothing stale
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    # A disk that fills up half-way: the same, on a file system with a few kB left.
    filler = tmpfs / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass
    shutil.rmtree(tmpfs / "results")
    with pytest.raises(OSError):
        launch(lp, [])
    left = sorted(str(p.relative_to(tmpfs)) for p in tmpfs.rglob("*") if p != filler)
    assert left == [], left


def test_prefetch_names_impossible_models_plainly(demo_assets, tmp_path):
    grid = write_grid(tmp_path, demo_assets, pairs=[{"name": "x", "speech": "a/b/c", "text": str(tmp_path / "nope")}])
    res = _run(REPO / "jobs" / "prefetch_models.py", grid)
    assert res.returncode == 1
    assert "speech model path does not exist: a/b/c" in res.stderr and "not a Hugging Face hub id" in res.stderr
    assert f"text model path does not exist: {tmp_path / 'nope'}" in res.stderr
    assert "download failed" not in res.stderr and "Traceback" not in res.stderr


def test_an_emobox_corpus_reached_through_a_symlink(tmp_path):
    from ser_hpc.config import DataConfig
    from ser_hpc.data.sources import load_splits
    from tests.corpora import make_emobox_corpus
    data_root, audio_dir = make_emobox_corpus(tmp_path / "store")
    link = tmp_path / "corpora" / data_root.name  # the corpus's name; its target is named otherwise
    target = data_root.rename(tmp_path / "store" / "copy-2024-11")
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    splits = load_splits(DataConfig(format="emobox", root=str(link), audio_dir=str(audio_dir), fold=1),
                         open_audio=False)
    assert splits.train and splits.test
