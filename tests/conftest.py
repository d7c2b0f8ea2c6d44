"""Shared fixtures: a real local Slurm cluster, and a small demo corpus with tiny backbones
built once per session (real files, loaded through the same code as real checkpoints)."""
from __future__ import annotations

import csv
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
TEST_CORPUS = (240, 96)  # train / test clips of the session's demo corpus
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (`-n 2`, pyproject addopts): one thread per worker and per process it
    # starts, set before torch is imported; two workers each asking for every core would
    # oversubscribe them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """One xdist group per test, so each expensive thing is built once per run:
    every test on the Slurm cluster runs on one worker (the one cluster it starts, or CI's),
    and a module whose tests share a module-scoped fixture stays on one worker. The
    remaining tests are spread one by one. The Slurm tests go first: they are the longest
    group, so one worker starts on them while the other takes everything else."""
    on_slurm = {id(item) for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())}
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = [d for ds in fixtures.name2fixturedefs.values() for d in ds] if fixtures else []
        if id(item) in on_slurm:
            item.add_marker(pytest.mark.xdist_group("slurm-cluster"))
        elif any(d.scope == "module" for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: id(item) not in on_slurm)  # stable: module order otherwise kept


@contextmanager
def shared_folder(tmp_path_factory, name: str):
    """A folder every xdist worker of this run shares (the parent of their base temp dirs;
    the base temp dir itself without xdist), held under an exclusive lock: the first test
    to ask builds what goes in it, the next ones find it built."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder.mkdir(exist_ok=True)
        yield folder


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """A demo corpus (240/96 clips, mp3, 44.1 kHz: the demo's format at a third of its size,
    so that every run's evaluation and every feature store costs a third) and the tiny
    backbones. tests/test_demo_data.py checks this same corpus."""
    from ser_hpc.demo.backbones import build_demo_backbones
    from ser_hpc.demo.corpus import generate_corpus

    # Under pytest-xdist every worker asks for it: the first renders it, the others wait and
    # reuse it (both builders return at once on a complete folder). Tests only read it.
    with shared_folder(tmp_path_factory, "demo_assets") as root:
        corpus = root / "corpus"
        generate_corpus(corpus, n_train=TEST_CORPUS[0], n_test=TEST_CORPUS[1], seed=1234, progress=False)
        with open(corpus / "train.csv", newline="", encoding="utf-8") as fh:
            texts = [row["transcription"] for row in csv.DictReader(fh)]
        backbones = build_demo_backbones(root / "backbones", seed=1234, corpus_texts=texts)
    return {"root": root, "corpus": corpus, "backbones": backbones}


def run_config_tree(assets, run_dir, **overrides) -> dict:
    """A small, fast run config on the session's demo assets."""
    corpus, bb = assets["corpus"], assets["backbones"]
    tree = {
        "data": {"train_csv": str(corpus / "train.csv"), "audio_dir": str(corpus / "audio"),
                 "test_csv": str(corpus / "test.csv"), "test_labels_csv": str(corpus / "test_labels.csv"),
                 "crop_seconds": 2.0, "eval_batch_size": 16},
        "model": {"speech": {"name": str(bb["wav2vec2-tiny"])}, "text": {"name": str(bb["roberta-tiny"])},
                  "head_width": 64},
        "train": {"lr": 2e-3, "batch_size": 16, "max_steps": 6, "eval_every": 3, "log_every": 3},
        "run": {"dir": str(run_dir), "name": "test"},
    }
    for key, value in overrides.items():
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree
