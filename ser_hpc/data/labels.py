"""A run's class list: from the config or the corpus, and raw corpus labels mapped onto it.

The ordered class list travels with every artefact (config.yaml, probability CSV headers,
final.json, ensemble.json, predict output); nothing reads a global list. EmoSPeech keeps
its six classes in the authors' id order.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from .clips import CorpusError, Example, RawClip

log = logging.getLogger("ser_hpc.data")

EMOSPEECH_LABELS: tuple[str, ...] = ("neutral", "disgust", "anger", "sadness", "joy", "fear")


@dataclass(frozen=True)
class LabelMapping:
    """Raw corpus label -> class name (None drops the clip); unlisted raw labels map to themselves."""
    label_map: dict[str, str | None]

    def __call__(self, raw: str) -> str | None:
        return self.label_map.get(raw, raw)

    def classes(self, raw_labels) -> list[str]:
        """The class names ``raw_labels`` map to, first appearance first, dropped ones left out."""
        out: list[str] = []
        for raw in raw_labels:
            name = self(raw)
            if name is not None and name not in out:
                out.append(name)
        return out


def resolve_labels(configured: list[str] | None, mapping: LabelMapping, derived: list[str]) -> tuple[str, ...]:
    """The run's ordered classes: ``data.labels`` when set, else ``derived`` (already ordered)."""
    if configured is not None:
        return tuple(configured)
    if len(derived) < 2:
        raise CorpusError(f"the corpus has {len(derived)} class(es) after data.label_map ({derived}); "
                          "a classifier needs at least 2")
    return tuple(derived)


def to_examples(clips: list[RawClip], labels: tuple[str, ...], mapping: LabelMapping, *,
                what: str = "corpus") -> list[Example]:
    """Labelled (or unlabelled) examples with class ids; clips mapped to null are dropped
    and counted per raw label in the log."""
    index = {name: i for i, name in enumerate(labels)}
    dropped: Counter[str] = Counter()
    out = []
    for c in clips:
        label = None
        if c.label is not None:
            name = mapping(c.label)
            if name is None:
                dropped[c.label] += 1
                continue
            if name not in index:
                via = f" (data.label_map maps {c.label!r} to {name!r})" if name != c.label else ""
                raise CorpusError(f"{c.where}: label {c.label!r}{via} is not one of "
                                  f"{', '.join(labels)}; set data.labels or map it with data.label_map "
                                  f"(null drops the clip)")
            label = index[name]
        out.append(Example(c.id, c.audio_path, c.text or "", label, c.row, source=c.source, speaker=c.speaker))
    if dropped:
        log.info("%s: dropped %d clip(s) whose label data.label_map maps to null: %s", what, sum(dropped.values()),
                 ", ".join(f"{raw} {n}" for raw, n in sorted(dropped.items())))
    return out
