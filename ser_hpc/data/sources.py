"""From the data config to checked train / dev / test example lists.

Everything a run reads is validated here, before any model is built: columns, labels,
that each audio file exists, opens and is not empty.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import DataConfig
from .corpus import Example, check_audio, read_corpus
from .split import stratified_split

log = logging.getLogger("ser_hpc.data")


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]                   # may be empty
    durations: dict[str, float]           # clip id -> seconds, for length-sorted evaluation
    test_has_labels: bool = False


def load_splits(cfg: DataConfig) -> Splits:
    train = read_corpus(cfg.train_csv, cfg.audio_dir, require_labels=True)
    durations = dict(zip((e.id for e in train), check_audio(train, cfg.train_csv)))
    if cfg.dev_csv:
        dev = read_corpus(cfg.dev_csv, cfg.audio_dir, require_labels=True)
        durations.update(zip((e.id for e in dev), check_audio(dev, cfg.dev_csv)))
        # The dev CSV is used exactly as given; its clips never train, so the full release CSV
        # plus the authors' dev_split.csv gives their 2520 / 480 split.
        dev_ids = {e.id for e in dev}
        held_out = [e for e in train if e.id in dev_ids]
        if held_out:
            log.info("%d clip(s) of %s are in data.dev_csv %s: they are dev clips, not trained on",
                     len(held_out), cfg.train_csv, cfg.dev_csv)
            train = [e for e in train if e.id not in dev_ids]
    else:
        train, dev = stratified_split(train, cfg.dev_fraction, cfg.split_seed)
    test: list[Example] = []
    if cfg.test_csv:
        test = read_corpus(cfg.test_csv, cfg.test_audio_dir or cfg.audio_dir, require_labels=bool(cfg.test_labels_csv),
                           labels_csv=cfg.test_labels_csv)
        durations.update(zip((e.id for e in test), check_audio(test, cfg.test_csv)))
    has_labels = bool(test) and all(e.label is not None for e in test)
    return Splits(train, dev, test, durations, has_labels)
