"""Prepared audio, read back: ``PreparedAudio`` loads a clip's int16 samples from its
memory-mapped shard (``prepared_format.py``) as float32, without decoding anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .corpus import Example
from .prepared_format import (DTYPE, PREPARE_HINT, PreparedAudioError, abspath, available_rates, dequantise,
                              hash_file, read_sources, read_store, store_dir)


class PreparedAudio:
    """An ``audio_loader`` for ``TrainCrops`` / ``WholeClips`` that reads prepared audio.

    ``loader(example, sample_rate)`` returns the clip as float32 at ``sample_rate`` from a
    memory-mapped shard: no decoding, no resampling, no per-clip open. It raises
    ``PreparedAudioError`` when the clip was not prepared (or its source changed since) or
    when ``sample_rate`` is not the prepared rate. Picklable for DataLoader workers: the
    memory maps are not pickled; each worker opens its own on first use.
    """

    def __init__(self, root: str | os.PathLike, sample_rate: int = 16000):
        self.root = Path(root)
        self.sample_rate = int(sample_rate)
        self._folder = store_dir(self.root, self.sample_rate)
        self._resolved: dict[str, tuple[str, int, int, float]] = {}  # source path -> clip
        self._maps: dict[str, np.ndarray] = {}                       # shard -> memmap (per process)
        self._refresh()
        if not self._store.clips:
            rates = available_rates(self.root)
            there = (f"; it holds audio at {', '.join(f'{r} Hz' for r in rates)}" if rates
                     else "" if self.root.is_dir() else " (the folder does not exist)")
            raise PreparedAudioError(f"no audio prepared at {self.sample_rate} Hz in {self.root}{there}: {PREPARE_HINT}")

    def _refresh(self) -> None:
        self._store = read_store(self._folder, self.sample_rate)
        self._sources = read_sources(self.root)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __call__(self, example: Example | str | os.PathLike, sample_rate: int) -> np.ndarray:
        if sample_rate != self.sample_rate:
            raise PreparedAudioError(f"audio in {self.root} was prepared at {self.sample_rate} Hz, but "
                                     f"{sample_rate} Hz was asked for: prepare it at {sample_rate} Hz "
                                     f"(data.sample_rate={sample_rate}) or use a loader for {self.sample_rate} Hz")
        path = example.audio_path if isinstance(example, Example) else example
        clip = self._resolved.get(path) or self._resolve(path)
        shard, offset, length, scale = clip
        codes = self._maps.get(shard)
        if codes is None:
            codes = self._open(shard)
        return dequantise(codes[offset:offset + length], scale)

    def num_samples(self, example: Example | str | os.PathLike) -> int:
        """A prepared clip's length in samples (no audio is read)."""
        path = example.audio_path if isinstance(example, Example) else example
        return (self._resolved.get(path) or self._resolve(path))[2]

    def check(self, examples: Iterable[Example | str | os.PathLike]) -> None:
        """Find every clip now (one stat each), so a missing one fails before training starts."""
        missing = []
        for ex in examples:
            try:
                self.num_samples(ex)
            except PreparedAudioError as exc:
                missing.append(str(exc))
        if missing:
            shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise PreparedAudioError(f"{len(missing)} clip(s) are not prepared in {self.root}:\n  {shown}")

    def _resolve(self, path: str | os.PathLike) -> tuple[str, int, int, float]:
        full = abspath(path)
        try:
            st = os.stat(full)
        except OSError as exc:
            raise PreparedAudioError(f"audio file {full} cannot be checked against its prepared copy: {exc}") from None
        key = None
        for entry in self._sources.get(full, ()):
            if (entry.get("size"), entry.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) \
                    and entry.get("key") in self._store.clips:
                key = entry["key"]
                break
        if key is None:  # not in a catalogue as it is now (changed, copied, or never prepared)
            key = hash_file(full)
            if key not in self._store.clips:
                self._refresh()  # a preparation may have finished after this loader was made
        if key not in self._store.clips:
            raise PreparedAudioError(f"audio file {full} has no prepared copy at {self.sample_rate} Hz in "
                                     f"{self.root} (never prepared, or changed since): {PREPARE_HINT}")
        clip = self._store.clips[key]
        self._resolved[path] = clip
        return clip

    def _open(self, shard: str) -> np.ndarray:
        path = self._folder / f"{shard}.npy"
        try:
            codes = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise PreparedAudioError(f"prepared audio shard {path} cannot be read: {exc}") from None
        if codes.dtype != DTYPE or codes.shape != (self._store.shards[shard],):
            raise PreparedAudioError(f"prepared audio shard {path} does not match its index "
                                     f"({codes.dtype} {codes.shape}): delete {self._folder} and prepare again")
        self._maps[shard] = codes
        return codes



def audio_loader_for(data_cfg):
    """The ``audio_loader`` a data config asks for: prepared audio when ``data.prepared_dir`` is
    set, otherwise decoding the source files on the fly."""
    if data_cfg.prepared_dir:
        return PreparedAudio(data_cfg.prepared_dir, data_cfg.sample_rate)
    from .dataset import decode_source
    return decode_source
