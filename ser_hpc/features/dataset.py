"""Training and evaluation batches read from a feature store instead of running backbones.

Cropping happens in feature space: a random window of frames as long as the frames a
``data.crop_seconds`` crop would give (shorter clips are repeat-padded, like the audio);
augmentation picks, with probability ``data.augment_prob``, one of the store's augmented
views of the clip. Randomness comes from (seed, epoch, index), as in ``TrainCrops``, so
a resumed run sees the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.corpus import Example
from ..models.encoders import BackboneOutput
from .store import FeatureStore


@dataclass
class FeatureBatch:
    ids: list[str]
    feats: BackboneOutput   # on the CPU, float16
    labels: torch.Tensor    # [B] long, -1 where unknown


def crop_frames(store: FeatureStore, crop_seconds: float) -> int:
    """Frames of a ``crop_seconds`` crop, as the speech encoder counts them (0 = whole clips)."""
    from ..models.speech_families import frames_for
    if not crop_seconds or not store.meta.get("speech"):
        return 0
    s = store.meta["speech"]
    rule = s.get("frame_rule") or {"conv_kernel": s["conv_kernel"], "conv_stride": s["conv_stride"]}  # older stores
    return max(int(frames_for(rule, int(round(crop_seconds * s["sample_rate"])))), 1)


def _fit_frames(states: np.ndarray, n: int) -> np.ndarray:
    if len(states) >= n:
        return states[:n]
    return np.concatenate([states] * -(-n // len(states)))[:n]


class CachedCrops(Dataset):
    def __init__(self, examples: list[Example], store: FeatureStore, crop_seconds: float, augment_prob: float,
                 seed: int):
        self.examples, self.store, self.seed, self.epoch = examples, store, seed, 0
        self.crop = crop_frames(store, crop_seconds)
        self.augment_prob = augment_prob
        self.views = store.views

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        item = {"id": ex.id, "label": -1 if ex.label is None else ex.label, "speech": None, "text": None}
        if self.store.meta.get("speech"):
            rng = np.random.default_rng([self.seed, self.epoch, index])
            view = 0
            if self.views > 1 and rng.random() < self.augment_prob:
                view = int(rng.integers(1, self.views))
            states = self.store.speech(ex.id, view)
            if self.crop:
                if len(states) > self.crop:
                    start = int(rng.integers(0, len(states) - self.crop + 1))
                    states = states[start:start + self.crop]
                else:
                    states = _fit_frames(states, self.crop)
            item["speech"] = states
        if self.store.meta.get("text"):
            item["text"] = self.store.text(ex.id)
        return item


class CachedClips(Dataset):
    """Evaluation: the clean whole clip (view 0)."""

    def __init__(self, examples: list[Example], store: FeatureStore):
        self.examples, self.store = examples, store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        return {"id": ex.id, "label": -1 if ex.label is None else ex.label,
                "speech": self.store.speech(ex.id) if self.store.meta.get("speech") else None,
                "text": self.store.text(ex.id) if self.store.meta.get("text") else None}


def _pad(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, L, D] arrays -> ([L, B, T, D] float16, mask [B, T])."""
    lengths = [len(a) for a in arrays]
    _, layers, width = arrays[0].shape
    out = np.zeros((len(arrays), max(lengths), layers, width), dtype=np.float16)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return torch.from_numpy(out).permute(2, 0, 1, 3), mask


def collate_features(items: list[dict], speech_layers=None, text_layers=None) -> FeatureBatch:
    feats = BackboneOutput(speech_layers=speech_layers, text_layers=text_layers)
    if items[0]["speech"] is not None:
        feats.speech, feats.speech_mask = _pad([it["speech"] for it in items])
    if items[0]["text"] is not None:
        feats.text, feats.text_mask = _pad([it["text"] for it in items])
    return FeatureBatch([it["id"] for it in items], feats,
                        torch.tensor([it["label"] for it in items], dtype=torch.long))


class FeatureCollate:
    """A picklable collate_fn (DataLoader workers) that labels which layers the batch holds."""

    def __init__(self, store: FeatureStore):
        self.speech_layers, self.text_layers = store.speech_layers, store.text_layers

    def __call__(self, items: list[dict]) -> FeatureBatch:
        return collate_features(items, self.speech_layers, self.text_layers)
