"""Torch datasets: random augmented crops for training, whole clips for evaluation.

Each training item's randomness comes from (seed, epoch, index), so a crop does not depend
on which worker loads it or on how many items came before: runs are reproducible and a
resumed run sees the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .audio import fit_length, load_audio, random_crop
from .augment import Augmenter
from .corpus import Example

# (example, sample_rate) -> mono float32 samples; decodes the source file by default.
AudioLoader = Callable[[Example, int], np.ndarray]


def decode_source(ex: Example, sample_rate: int) -> np.ndarray:
    return load_audio(ex.audio_path, sample_rate)


@dataclass
class Batch:
    ids: list[str]
    waves: torch.Tensor        # [B, T] float32, zero-padded
    wave_lengths: torch.Tensor  # [B] valid samples per clip
    texts: list[str]
    labels: torch.Tensor       # [B] long, -1 where unknown


class TrainCrops(Dataset):
    def __init__(self, examples: list[Example], sample_rate: int, crop_seconds: float,
                 augmenter: Augmenter | None, seed: int, with_audio: bool = True,
                 audio_loader: AudioLoader = decode_source):
        self.examples = examples
        self.audio_loader = audio_loader
        self.with_audio = with_audio  # a text-only run never decodes audio
        self.sample_rate = sample_rate
        self.crop = int(round(crop_seconds * sample_rate))
        self.augmenter = augmenter
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        if not self.with_audio:
            return _item(ex, np.zeros(1, np.float32))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        wave = self.audio_loader(ex, self.sample_rate)
        choice = self.augmenter.choose(rng) if self.augmenter else None
        if not self.crop:  # data.crop_seconds=0: whole clips
            return _item(ex, self.augmenter.apply(wave, choice, rng) if choice is not None else wave)
        need = Augmenter.input_length(choice, self.crop)
        crop = random_crop(wave, need, rng)
        if choice is not None:
            crop = fit_length(self.augmenter.apply(crop, choice, rng), self.crop)
        return _item(ex, crop)


class WholeClips(Dataset):
    """Evaluation: the whole clip, no augmentation."""

    # Shorter clips are repeat-padded to this: a backbone needs a few frames to say anything.
    MIN_SECONDS = 0.5

    def __init__(self, examples: list[Example], sample_rate: int, with_audio: bool = True,
                 audio_loader: AudioLoader = decode_source):
        self.examples = examples
        self.audio_loader = audio_loader
        self.sample_rate = sample_rate
        self.with_audio = with_audio

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        if not self.with_audio:
            return _item(ex, np.zeros(1, np.float32))
        wave = self.audio_loader(ex, self.sample_rate)
        minimum = int(self.MIN_SECONDS * self.sample_rate)
        return _item(ex, fit_length(wave, minimum) if len(wave) < minimum else wave)


def _item(ex: Example, wave: np.ndarray) -> dict:
    return {"id": ex.id, "wave": wave, "text": ex.text, "label": -1 if ex.label is None else ex.label}


def collate(items: list[dict]) -> Batch:
    lengths = torch.tensor([len(it["wave"]) for it in items], dtype=torch.long)
    waves = torch.zeros(len(items), int(lengths.max()), dtype=torch.float32)
    for i, it in enumerate(items):
        waves[i, : len(it["wave"])] = torch.from_numpy(np.asarray(it["wave"], dtype=np.float32))
    return Batch(
        ids=[it["id"] for it in items],
        waves=waves,
        wave_lengths=lengths,
        texts=[it["text"] for it in items],
        labels=torch.tensor([it["label"] for it in items], dtype=torch.long),
    )


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar-length clips: evaluation pads less and runs faster."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
