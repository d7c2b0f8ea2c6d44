"""The pre-submission audio check: every clip of a grid decodes, start to end.

Opening a file's header (``corpus.check_audio``) does not find an mp3 that is corrupt in
the middle of its stream; on Slurm that clip would fail the preparation or a training task
after the whole chain was submitted. Only decoding finds it, and a decode costs about what
preparing the clip costs, so each result is remembered by the file's content hash (the
prepared-audio store's key): a clip is decoded once, not once per launch. Clips that a
prepared-audio store already holds decoded there and are not decoded again.

The known-good hashes live in ``$SER_HPC_CACHE`` (default ``~/.cache/ser_hpc``),
``decoded_ok.json``: shared by every grid and checkout of this user, valid while the
bytes do not change (a changed file has another hash).
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic_io import write_json
from ..content_hash import cache_dir, file_hashes
from .prepared_format import read_store, store_dir

log = logging.getLogger("ser_hpc.data")


def cache_file() -> Path:
    return cache_dir() / "decoded_ok.json"


def _known() -> set[str]:
    try:
        return set(json.loads(cache_file().read_text(encoding="utf-8"))["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remember(keys: set[str]) -> None:
    if not keys:
        return
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"sha256": sorted(_known() | keys)})
    except OSError as exc:  # a read-only home: the check still ran, it only is not remembered
        log.warning("cannot remember decoded clips in %s: %s", path, exc)


def _decodes(path: str) -> str | None:
    """Why the file does not decode completely to finite samples, or None."""
    import soundfile as sf
    from .audio import why_undecodable
    try:
        data, _ = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:
        return why_undecodable(path, exc)
    if data.shape[0] == 0:
        return f"audio file {path} is empty (0 samples)"
    if not np.isfinite(data).all():
        return f"audio file {path} decodes to non-finite samples"
    return None


@dataclass
class DecodeCheck:
    clips: int
    decoded: int        # decoded now
    known: int          # decoded by an earlier check or held by the prepared-audio store
    errors: list[str]   # "<where>: <why>", one per clip that does not decode

    def __str__(self) -> str:
        return (f"{self.clips} clip(s) decode completely ({self.decoded} decoded now, {self.known} known from "
                f"earlier checks or the prepared-audio store)" if not self.errors else
                f"{len(self.errors)} of {self.clips} clip(s) do not decode")


def check_decoding(clips: list[tuple[str, str]], stores: list[tuple[str, int]] = (),
                   workers: int | None = None) -> DecodeCheck:
    """Decode every ``(path, where)`` not known to decode; ``where`` names its CSV row.
    ``stores``: (data.prepared_dir, sample rate) of prepared-audio stores whose clips count as known."""
    workers = workers or min(8, os.cpu_count() or 1)
    unique = list(dict.fromkeys(clips))
    keys = file_hashes([path for path, _ in unique])
    known = _known()
    for root, rate in stores:
        known |= set(read_store(store_dir(root, rate), rate).clips)
    todo = [(c, k) for c, k in zip(unique, keys) if k not in known]
    if todo:
        log.info("decoding %d clip(s) to check them (%d known to decode)", len(todo), len(unique) - len(todo))
    with ThreadPoolExecutor(workers) as pool:  # libsndfile releases the GIL while it decodes
        results = list(pool.map(lambda t: _decodes(t[0][0]), todo))
    errors = [f"{where}{why}" for ((_, where), _), why in zip(todo, results) if why]
    _remember({k for (_, k), why in zip(todo, results) if why is None})
    return DecodeCheck(len(unique), len(todo), len(unique) - len(todo), errors)
