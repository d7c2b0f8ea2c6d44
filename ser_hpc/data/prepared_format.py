"""The prepared-audio format: every clip decoded, downmixed, resampled to the backbones'
rate and stored as memory-mapped int16, so training and evaluation never decode an mp3.
``prepare.py`` writes it (decodes the audio), ``prepared.py`` reads it::

    summary = prepare_for_data_config(cfg.data)           # the grid's first job
    loader = PreparedAudio(cfg.data.prepared_dir, cfg.data.sample_rate)
    TrainCrops(..., audio_loader=loader)                  # or audio_loader_for(cfg.data)

Keys. A clip is keyed by the SHA-256 of its source file's bytes plus the target rate (the
rate is the ``sr<rate>`` folder). Two grids, or two copies of the corpus at different
paths, share the prepared clips; a source file whose bytes change gets a new key and is
prepared again on the next call; an unchanged corpus decodes nothing.

Layout (``<prepared_dir>/v1/``)::

    sr16000/<shard>.npy    int16 1-D array: the clips decoded by one preparation, end to end
    sr16000/<shard>.json   its index: key -> [offset, length, scale]; written after the shard
    sources/<set>.json     source path -> key, size, mtime_ns (lets a loader find a clip's key
                           from a stat instead of re-reading the source; re-hashed on mismatch)

Why packed shards and not one file per clip: on a shared cluster file system (Lustre, GPFS,
NFS) every file costs a metadata-server round trip to open and counts against the inode
quota, and tens of jobs reading thousands of small files at once is the classic way to
slow the whole file system down. Here a corpus is one large file per preparation (the
EmoSPeech release: about 1.1 GB for 3750 clips), which each DataLoader worker opens and
memory-maps once; a clip is a contiguous byte range, read by page faults through the page
cache, with no decoding and no per-clip open. A later preparation that finds new or changed
clips adds one more shard with only those clips; clips that are no longer used stay in
their old shard until the folder is deleted (it is only a cache).

Concurrency. Every file is written to a temp file in the same folder and renamed
(``ser_hpc.atomic_io``), and an index is written only after its shard, so a reader sees a
complete shard or none. Names are derived from content (the shard's name from its keys), so
two jobs that prepare the same corpus at the same time decode the same clips and rename
identical files over each other; nothing needs a lock (``flock`` is often unavailable on
cluster file systems). A job that finds the index already written by the other keeps the
existing files.

Precision. Each clip is scaled by its own peak: ``q = round(x / s)`` with ``s = peak / 32767``,
and loaded as ``q * s`` in float32. The error is at most ``s / 2 = peak / 65534`` per sample;
the quantisation noise is uniform with RMS ``s / sqrt(12)``, 101 dB below the clip's peak
(98 dB SNR for a full-scale sine: the usual "16 bit = 96 dB"). Speech sits 15-20 dB below
its peak, so the signal-to-quantisation-noise ratio of a prepared clip is about 80-90 dB
(86-90 dB measured on the demo corpus against ``load_audio``): far below the coding noise
of the mp3 sources and below anything a speech encoder resolves. Because the scale is per
clip, a quiet clip keeps all 16 bits, and a resampled peak above 1.0 is not clipped.
float16 would take the same space with an 11-bit significand (about 66 dB), so int16 it is.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import AudioError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1      # bump when what a prepared clip holds changes (resampler, scaling, layout)
FULL_SCALE = 32767       # int16 code of a clip's peak

DTYPE = np.dtype("<i2")
_HASH_CHUNK = 1 << 20

PREPARE_HINT = "run `python jobs/prepare_audio.py RUN_CONFIG.yaml` (or prepare_for_data_config) first"



class PreparedAudioError(AudioError):
    """Prepared audio is missing, stale or unreadable; the message names the clip or file."""



def store_dir(root: str | os.PathLike, sample_rate: int) -> Path:
    """The folder holding the shards of one target rate."""
    return Path(root) / f"v{FORMAT_VERSION}" / f"sr{int(sample_rate)}"



def sources_dir(root: str | os.PathLike) -> Path:
    return Path(root) / f"v{FORMAT_VERSION}" / "sources"



def quantise(wave: np.ndarray) -> tuple[np.ndarray, float]:
    """Float samples -> (int16 codes, scale) with ``wave ~= codes * scale`` (peak -> 32767)."""
    peak = float(np.max(np.abs(wave))) if len(wave) else 0.0
    scale = peak / FULL_SCALE if peak > 0 else 1.0
    codes = np.clip(np.rint(np.asarray(wave, np.float64) / scale), -FULL_SCALE, FULL_SCALE).astype(DTYPE)
    return codes, scale



def dequantise(codes: np.ndarray, scale: float) -> np.ndarray:
    """int16 codes -> float32 samples, in one pass (this is the whole cost of loading a clip)."""
    return np.multiply(codes, np.float32(scale), dtype=np.float32)



def hash_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()



def abspath(path: str | os.PathLike) -> str:
    # abspath, not resolve(): no per-component lstat on a cluster file system. A clip reached
    # through another path (a symlink, a copy) is still found, by hashing it.
    return os.path.abspath(os.fspath(path))



@dataclass
class Store:
    """What is prepared at one rate: key -> (shard, offset, length, scale), shard -> samples."""
    clips: dict[str, tuple[str, int, int, float]] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)



def shard_bytes(n_samples: int) -> int:
    return header_len() + n_samples * DTYPE.itemsize



def npy_header(n_samples: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": DTYPE.str, "fortran_order": False, "shape": (n_samples,)})
    return buf.getvalue()



def header_len() -> int:
    return len(npy_header(0))



def read_store(folder: Path, sample_rate: int) -> Store:
    """Every complete shard in ``folder``: its index exists and the shard has the indexed size."""
    store = Store()
    if not folder.is_dir():
        return store
    for index_path in sorted(folder.glob("*.json")):
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            shard = index_path.stem
            if index.get("version") != FORMAT_VERSION or int(index["sample_rate"]) != sample_rate:
                continue
            if (folder / f"{shard}.npy").stat().st_size != shard_bytes(int(index["n_samples"])):
                log.warning("prepared audio: shard %s does not match its index; ignored", folder / f"{shard}.npy")
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a shard deleted by hand, or a foreign file: those clips count as not prepared
        store.shards[shard] = int(index["n_samples"])
        for key, (offset, length, scale) in index["clips"].items():
            store.clips.setdefault(key, (shard, int(offset), int(length), float(scale)))
    return store



def read_sources(root: Path) -> dict[str, list[dict]]:
    """Source path -> catalogue entries ({key, size, mtime_ns}) from every preparation."""
    out: dict[str, list[dict]] = {}
    folder = sources_dir(root)
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            files = json.loads(path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError):
            continue
        for src, entry in files.items():
            out.setdefault(src, []).append(entry)
    return out



def available_rates(root: Path) -> list[int]:
    base = Path(root) / f"v{FORMAT_VERSION}"
    rates = []
    for d in base.glob("sr*") if base.is_dir() else []:
        if d.is_dir() and d.name[2:].isdigit() and any(d.glob("*.json")):
            rates.append(int(d.name[2:]))
    return sorted(rates)
