"""The feature store on disk: frozen backbones' hidden states, once per corpus and backbone.

Layout (``<data.features_dir>/<key>/``)::

    speech_v0.npy    float16 [frames of all clips, layers held, width]: clean whole clips
    speech_v0.json   its index: clip id -> [offset, frames]; written after the shard
    speech_vK.npy    K = 1..data.cached_augment_copies: augmented views of the train clips
    text.npy/.json   the same for the text encoder's token states
    meta.json        what the store holds (spec, shapes, sizes, shards); written LAST: its
                     presence means the store is complete

A corpus longer than ``data.features_shard_hours`` is written in S shards (one features
array task each): ``speech_vK_s<k>.npy``, ``text_s<k>.npy`` for k = 0..S-1, each with its
index; a shard whose files are complete is never written again (a killed job resumes).

Keys. ``key`` is a hash of everything that changes what is stored: each backbone (a hub id's
name; a local folder's file contents, not its path), the hidden states held, the sample
rate, the text token limit, the augmentation that made the views, and the corpus content
(every clip's id, audio bytes and transcription). A relaunch or a second grid with the same
key reuses the store; a changed corpus or backbone gets a new key, so a stale store is
never read. Crops are not part of the key: whole clips are stored (true lengths, no
padding) and training crops a window of frames.

Like prepared audio, each file is written to a temp name and renamed, an index only after
its shard and meta.json only after everything, so a reader sees a complete store or none.
A shard whose size disagrees with its index (a torn copy, a disk error) is refused by name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_open, write_json
from ..content_hash import file_hashes

FORMAT_VERSION = 1
DTYPE = np.dtype("<f2")  # float16: half of fp32, and what XLS-R-sized stores can afford on disk
META = "meta.json"


class FeatureStoreError(RuntimeError):
    """A feature store is missing, torn, or does not hold what a run needs; names the file."""


def content_key(spec: dict) -> str:
    """The store's folder name: a hash of its canonical spec."""
    blob = json.dumps({"version": FORMAT_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def model_fingerprint(name: str) -> dict:
    """What identifies a backbone: a hub id by name; a local folder by the content of its files
    (weights, config, tokenizer), never by where it lives: the same checkpoint in another
    checkout or a moved folder finds its stores, and overwriting it in place invalidates them."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return {"name": name}
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    return {"files": dict(zip((f.name for f in files), file_hashes(files)))}


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": DTYPE.str, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def shard_bytes(rows: int, layers: int, width: int) -> int:
    return len(_npy_header((rows, layers, width))) + rows * layers * width * DTYPE.itemsize


def check_free_space(folder: Path, need: int) -> None:
    """Refuse before writing when the target file system cannot hold the store."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free * 0.95:
        raise FeatureStoreError(f"the feature store needs about {need / 1e9:.2f} GB but {probe} has "
                                f"{free / 1e9:.2f} GB free: point data.features_dir at a larger file system "
                                "(a scratch or project space), or store fewer layers (model.*.layers=last)")


class ShardWriter:
    """Streams clips' [frames, layers, width] arrays into one .npy shard, then its index."""

    def __init__(self, path: Path, layers: int, width: int):
        self.path, self.layers, self.width = path, layers, width
        self.index: dict[str, list[int]] = {}
        self.rows = 0
        self.closed = False
        self._ctx = atomic_open(path, "wb")
        self._fh = self._ctx.__enter__()
        self._fh.write(_npy_header((0, layers, width)))  # placeholder: the row count is known at the end

    def add(self, clip_id: str, states: np.ndarray) -> None:
        if states.shape[1:] != (self.layers, self.width):
            raise ValueError(f"{self.path}: clip {clip_id} has shape {states.shape}, "
                             f"expected [frames, {self.layers}, {self.width}]")
        self._fh.write(np.ascontiguousarray(states, dtype=DTYPE).tobytes())
        self.index[clip_id] = [self.rows, int(states.shape[0])]
        self.rows += int(states.shape[0])

    def close(self) -> None:
        header = _npy_header((self.rows, self.layers, self.width))
        if len(header) != len(_npy_header((0, self.layers, self.width))):
            raise RuntimeError("numpy .npy header size changed with the array length")
        self._fh.seek(0)
        self._fh.write(header)
        self._ctx.__exit__(None, None, None)  # rename into place
        self.closed = True
        write_json(self.path.with_suffix(".json"), {"rows": self.rows, "layers": self.layers,
                                                     "width": self.width, "clips": self.index})

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # temp file removed, target untouched


@dataclass
class Shard:
    """One memory-mapped shard: a clip's states are a contiguous row range (page faults, no copy)."""
    path: Path
    rows: np.ndarray
    index: dict[str, list[int]]

    @classmethod
    def open(cls, path: Path) -> "Shard":
        index_path = path.with_suffix(".json")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FeatureStoreError(f"feature store index {index_path} cannot be read: {exc}") from None
        expected = shard_bytes(index["rows"], index["layers"], index["width"])
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FeatureStoreError(f"feature store shard {path} cannot be read: {exc}") from None
        if size != expected:
            raise FeatureStoreError(f"feature store shard {path} is torn: {size} bytes where its index says "
                                    f"{expected}; delete {path.parent} and extract the features again")
        rows = np.load(path, mmap_mode="r")
        return cls(path, rows, index["clips"])

    def get(self, clip_id: str) -> np.ndarray:
        try:
            offset, n = self.index[clip_id]
        except KeyError:
            raise FeatureStoreError(f"clip {clip_id!r} is not in feature store shard {self.path}") from None
        return self.rows[offset:offset + n]

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


class ShardSet:
    """The shards of one view (a store extracted in shards): a clip's states are in one of them."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.index = {clip: shard for shard in shards for clip in shard.index}

    def get(self, clip_id: str) -> np.ndarray:
        try:
            return self.index[clip_id].get(clip_id)
        except KeyError:
            raise FeatureStoreError(f"clip {clip_id!r} is not in feature store shards "
                                    f"{', '.join(s.path.name for s in self.shards)}") from None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


class FeatureStore:
    """A complete store, opened read-only: ``speech(clip_id, view)`` and ``text(clip_id)``
    return [frames, layers, width] float16 views into memory-mapped shards."""

    def __init__(self, folder: str | os.PathLike, modalities: tuple[str, ...] | None = None):
        """``modalities`` ("speech", "text"): read the store as if it held only these (a
        text-only run reading the fused runs' store sees no speech); None: all it holds."""
        self.folder, self.modalities = Path(folder), modalities
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FeatureStoreError(f"no complete feature store in {self.folder} (no {META}): run "
                                    "`python jobs/extract_features.py RUN.yaml` or launch the grid, whose "
                                    "features job writes it")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if modalities is not None:
            self.meta.update({k: None for k in ("speech", "text") if k not in modalities})
        self.views = int(self.meta["views"])
        n = int(self.meta.get("shards", 1))
        suffixes = [f"_s{k}" if n > 1 else "" for k in range(n)]
        self._speech = [ShardSet([Shard.open(self.folder / f"speech_v{view}{s}.npy") for s in suffixes])
                        for view in range(self.views)] if self.meta.get("speech") else []
        self._text = ShardSet([Shard.open(self.folder / f"text{s}.npy") for s in suffixes]) \
            if self.meta.get("text") else None

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memory maps, never copy them
        return {"folder": self.folder, "modalities": self.modalities}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state.get("modalities"))

    @property
    def speech_layers(self) -> tuple[int, ...] | None:
        return tuple(self.meta["speech"]["layers"]) if self.meta.get("speech") else None

    @property
    def text_layers(self) -> tuple[int, ...] | None:
        return tuple(self.meta["text"]["layers"]) if self.meta.get("text") else None

    def speech(self, clip_id: str, view: int = 0) -> np.ndarray:
        return self._speech[view].get(clip_id)

    def has_view(self, clip_id: str, view: int) -> bool:
        return clip_id in self._speech[view].index

    def text(self, clip_id: str) -> np.ndarray:
        return self._text.get(clip_id)

    def check(self, ids) -> None:
        """Every clip a run reads is in the store (clean view), or one error naming them."""
        shards = self._speech[:1] + ([self._text] if self._text else [])
        missing = sorted({i for s in shards for i in ids if i not in s.index})
        if missing:
            raise FeatureStoreError(f"{len(missing)} clip(s) are not in feature store {self.folder}, e.g. "
                                    f"{', '.join(missing[:5])}: the corpus changed since extraction")

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._speech) + (self._text.nbytes if self._text else 0)
