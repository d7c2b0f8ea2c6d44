"""Cross-validation folds and dev splits for corpora that ship none.

Folds are stratified by label and, when speakers are known, grouped by speaker: a model
tested on a speaker it trained on scores too high, which is the mistake SER papers most
often make. Clips whose speaker is unknown (None) among known ones each count as a speaker
of their own: nothing says they match anyone, and refusing the corpus would help nobody.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from .corpus import CorpusError

log = logging.getLogger("ser_hpc.data.folds")


def _groups(speakers: Sequence[str | None] | None, n: int) -> list[str] | None:
    """One group name per clip, or None when no speaker is known at all."""
    if speakers is None:
        return None
    if len(speakers) != n:
        raise CorpusError(f"{len(speakers)} speakers for {n} labels; give one speaker (or None) per clip")
    if all(s is None for s in speakers):
        return None
    unknown = sum(s is None for s in speakers)
    if unknown:
        log.warning("%d of %d clips have no speaker; each is treated as a speaker of its own", unknown, n)
    # The prefix keeps an unknown clip's pseudo-speaker from matching a real speaker name.
    return [f"s:{s}" if s is not None else f"unknown:{i}" for i, s in enumerate(speakers)]


def _quiet_split(splitter, *args):
    # sklearn's "least populated class" warning goes to warnings; this module logs its own,
    # which names the class.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(*args))


def assign_folds(labels: Sequence[str], speakers: Sequence[str | None] | None, k: int, seed: int) -> list[int]:
    """Fold number (1..k) per clip: stratified by label, speaker-disjoint when speakers are known.

    Refuses k < 2, fewer clips than folds, and (with speakers) fewer speakers than folds.
    A class with fewer clips (or speakers) than k cannot be in every fold: that is logged as
    a warning, not refused, since small corpora often have a rare class.
    """
    n = len(labels)
    if k < 2:
        raise CorpusError(f"k-fold cross-validation needs at least 2 folds, got k={k}")
    if n < k:
        raise CorpusError(f"{k} folds requested but the corpus has only {n} clips")
    y = np.asarray([str(x) for x in labels])  # str: sklearn reads an object array of ints as "unknown"
    groups = _groups(speakers, n)
    counts = Counter(labels)
    if groups is None:
        rare = {c: m for c, m in counts.items() if m < k}
        if rare:
            log.warning("class(es) with fewer clips than the %d folds will be missing from some folds: %s",
                        k, ", ".join(f"{c!r} ({m})" for c, m in sorted(rare.items())))
        splits = _quiet_split(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed), np.zeros(n), y)
    else:
        n_speakers = len(set(groups))
        if n_speakers < k:
            raise CorpusError(f"{k} folds requested but the corpus has only {n_speakers} speakers; speaker-independent "
                              f"folds need at least as many speakers as folds (use k <= {n_speakers})")
        per_class = {c: len({g for g, l in zip(groups, labels) if l == c}) for c in counts}
        rare = {c: m for c, m in per_class.items() if m < k}
        if rare:
            log.warning("class(es) spoken by fewer speakers than the %d folds will be missing from some folds: %s",
                        k, ", ".join(f"{c!r} ({m} speakers)" for c, m in sorted(rare.items())))
        splits = _quiet_split(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed),
                              np.zeros(n), y, np.asarray(groups, dtype=object))
    folds = [0] * n
    for number, (_, test) in enumerate(splits, start=1):
        if len(test) == 0:
            raise CorpusError(f"fold {number} of {k} came out empty; use fewer folds")
        for i in test:
            folds[i] = number
    return folds


def split_dev(labels: Sequence[str], speakers: Sequence[str | None] | None, fraction: float,
              seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices), each sorted; about ``fraction`` of the clips go to dev.

    With speakers, dev takes whole speakers (none shared with train): the clips are cut into
    round(1/fraction) stratified speaker groups and the group closest to ``fraction`` that
    leaves every class in train becomes dev. Without speakers: a stratified random split;
    a class with a single clip stays in train (logged).
    """
    n = len(labels)
    if not 0.0 < fraction < 1.0:
        raise CorpusError(f"the dev fraction must be between 0 and 1 (exclusive), got {fraction}")
    if n < 2:
        raise CorpusError(f"cannot split a dev set off {n} clip(s)")
    groups = _groups(speakers, n)
    if groups is not None:
        dev = _dev_by_speaker(labels, groups, fraction, seed)
    else:
        dev = _dev_stratified(labels, fraction, seed)
    dev_set = set(dev)
    return [i for i in range(n) if i not in dev_set], sorted(dev_set)


def _dev_by_speaker(labels: Sequence[str], groups: list[str], fraction: float, seed: int) -> list[int]:
    n_speakers = len(set(groups))
    if n_speakers < 2:
        raise CorpusError("a speaker-independent dev split needs at least 2 speakers; the corpus has 1")
    n_splits = max(2, round(1 / fraction))
    if n_speakers < n_splits:
        log.warning("only %d speakers: the dev set takes one of them, about %.0f%% of the clips instead of %.0f%%",
                    n_speakers, 100 / n_speakers, 100 * fraction)
        n_splits = n_speakers
    n = len(labels)
    splits = _quiet_split(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed),
                          np.zeros(n), np.asarray([str(x) for x in labels]), np.asarray(groups, dtype=object))
    classes = set(labels)
    target = fraction * n

    def score(split) -> tuple[bool, float]:
        train, dev = split
        # Prefer a dev set that leaves every class in train, then the size closest to the target.
        return ({labels[i] for i in train} != classes or len(dev) == 0, abs(len(dev) - target))

    train, dev = min(splits, key=score)
    if {labels[i] for i in train} != classes:
        log.warning("no choice of dev speakers keeps every class in train; missing from train: %s",
                    ", ".join(sorted(classes - {labels[i] for i in train})))
    return [int(i) for i in dev]


def _dev_stratified(labels: Sequence[str], fraction: float, seed: int) -> list[int]:
    counts = Counter(labels)
    single = sorted(c for c, m in counts.items() if m == 1)
    if single:
        log.warning("class(es) with a single clip stay in train, none in dev: %s", ", ".join(map(repr, single)))
    rest = [i for i, label in enumerate(labels) if counts[label] > 1]
    if not rest:
        raise CorpusError("every class has a single clip; there is nothing to split a dev set from")
    y = [labels[i] for i in rest]
    n_dev = math.ceil(fraction * len(rest))
    n_classes = len(set(y))
    stratify = y
    if n_dev < n_classes or len(rest) - n_dev < n_classes:
        # sklearn cannot stratify when a side is smaller than the number of classes.
        log.warning("dev set of %d clips cannot hold all %d classes; splitting without stratification",
                    n_dev, n_classes)
        stratify = None
    _, dev = train_test_split(rest, test_size=n_dev, stratify=stratify, random_state=seed)
    return [int(i) for i in dev]


def check_leakage(train_ids: Sequence[str], test_ids: Sequence[str], where: str, *,
                  names: tuple[str, str] = ("train", "test")) -> None:
    """Refuse a split whose test list repeats clips of its train list."""
    train = set(train_ids)
    shared = list(dict.fromkeys(i for i in test_ids if i in train))
    if shared:
        shown = ", ".join(repr(i) for i in shared[:10]) + (", ..." if len(shared) > 10 else "")
        raise CorpusError(f"{where}: {len(shared)} clip id(s) are in both the {names[0]} and the {names[1]} list "
                          f"({shown}); a model must not be evaluated on clips it trained on")
