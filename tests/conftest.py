"""Shared fixtures: a real local Slurm cluster, and a small demo corpus with tiny backbones
built once per session (real files, loaded through the same code as real checkpoints)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEST_CORPUS = (240, 96)  # train / test clips of the session's demo corpus


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """A demo corpus (240/96 clips, mp3, 44.1 kHz: the demo's format at a third of its size,
    so that every run's evaluation and every feature store costs a third) and the tiny
    backbones. tests/test_demo_data.py checks this same corpus."""
    from ser_hpc.demo.backbones import build_demo_backbones
    from ser_hpc.demo.corpus import generate_corpus

    root = tmp_path_factory.mktemp("demo_assets")
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
