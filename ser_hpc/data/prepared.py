"""Audio prepared once: every clip decoded, downmixed, resampled to the backbones' rate and
stored as memory-mapped int16, so training and evaluation never decode an mp3.

Usage::

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
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..atomic_io import atomic_open, write_json
from .audio import AudioError, load_audio
from .corpus import Example, read_corpus

log = logging.getLogger(__name__)

FORMAT_VERSION = 1      # bump when what a prepared clip holds changes (resampler, scaling, layout)
MAX_WORKERS = 8          # decoding processes at most (a login node or a small CPU allocation)
FULL_SCALE = 32767       # int16 code of a clip's peak
DTYPE = np.dtype("<i2")
_IN_PROCESS_BELOW = 16   # fewer clips than this are decoded in-process (spawning workers costs seconds)
_HASH_CHUNK = 1 << 20

PREPARE_HINT = "run `python jobs/prepare_audio.py RUN_CONFIG.yaml` (or prepare_for_data_config) first"


class PreparedAudioError(AudioError):
    """Prepared audio is missing, stale or unreadable; the message names the clip or file."""


def store_dir(root: str | os.PathLike, sample_rate: int) -> Path:
    """The folder holding the shards of one target rate."""
    return Path(root) / f"v{FORMAT_VERSION}" / f"sr{int(sample_rate)}"


def _sources_dir(root: str | os.PathLike) -> Path:
    return Path(root) / f"v{FORMAT_VERSION}" / "sources"


# ------------------------------------------------------------------ quantisation

def quantise(wave: np.ndarray) -> tuple[np.ndarray, float]:
    """Float samples -> (int16 codes, scale) with ``wave ~= codes * scale`` (peak -> 32767)."""
    peak = float(np.max(np.abs(wave))) if len(wave) else 0.0
    scale = peak / FULL_SCALE if peak > 0 else 1.0
    codes = np.clip(np.rint(np.asarray(wave, np.float64) / scale), -FULL_SCALE, FULL_SCALE).astype(DTYPE)
    return codes, scale


def dequantise(codes: np.ndarray, scale: float) -> np.ndarray:
    """int16 codes -> float32 samples, in one pass (this is the whole cost of loading a clip)."""
    return np.multiply(codes, np.float32(scale), dtype=np.float32)


# ------------------------------------------------------------------ hashing

def hash_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _abspath(path: str | os.PathLike) -> str:
    # abspath, not resolve(): no per-component lstat on a cluster file system. A clip reached
    # through another path (a symlink, a copy) is still found, by hashing it.
    return os.path.abspath(os.fspath(path))


# ------------------------------------------------------------------ the store on disk

@dataclass
class _Store:
    """What is prepared at one rate: key -> (shard, offset, length, scale), shard -> samples."""
    clips: dict[str, tuple[str, int, int, float]] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)


def _shard_bytes(n_samples: int) -> int:
    return _header_len() + n_samples * DTYPE.itemsize


def _npy_header(n_samples: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": DTYPE.str, "fortran_order": False, "shape": (n_samples,)})
    return buf.getvalue()


def _header_len() -> int:
    return len(_npy_header(0))


def _read_store(folder: Path, sample_rate: int) -> _Store:
    """Every complete shard in ``folder``: its index exists and the shard has the indexed size."""
    store = _Store()
    if not folder.is_dir():
        return store
    for index_path in sorted(folder.glob("*.json")):
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            shard = index_path.stem
            if index.get("version") != FORMAT_VERSION or int(index["sample_rate"]) != sample_rate:
                continue
            if (folder / f"{shard}.npy").stat().st_size != _shard_bytes(int(index["n_samples"])):
                log.warning("prepared audio: shard %s does not match its index; ignored", folder / f"{shard}.npy")
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a shard deleted by hand, or a foreign file: those clips count as not prepared
        store.shards[shard] = int(index["n_samples"])
        for key, (offset, length, scale) in index["clips"].items():
            store.clips.setdefault(key, (shard, int(offset), int(length), float(scale)))
    return store


def _read_sources(root: Path) -> dict[str, list[dict]]:
    """Source path -> catalogue entries ({key, size, mtime_ns}) from every preparation."""
    out: dict[str, list[dict]] = {}
    folder = _sources_dir(root)
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


def _available_rates(root: Path) -> list[int]:
    base = Path(root) / f"v{FORMAT_VERSION}"
    rates = []
    for d in base.glob("sr*") if base.is_dir() else []:
        if d.is_dir() and d.name[2:].isdigit() and any(d.glob("*.json")):
            rates.append(int(d.name[2:]))
    return sorted(rates)


# ------------------------------------------------------------------ preparation

@dataclass
class PrepareSummary:
    root: str
    sample_rate: int
    clips: int                 # distinct source files asked for
    decoded: int               # decoded by this call (0 when everything was already prepared)
    reused: int                # already prepared, by an earlier call or another grid
    audio_seconds: float       # total duration of the asked-for clips, prepared
    seconds: float             # wall time of this call
    shard: str | None = None   # the shard this call wrote, if any

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"prepared audio in {self.root} at {self.sample_rate} Hz: {self.clips} clips "
                f"({self.audio_seconds / 3600:.2f} h), {self.decoded} decoded now, {self.reused} already "
                f"prepared, {self.seconds:.1f} s")


@dataclass
class _Source:
    path: str    # absolute
    where: str   # "train.csv, row 12: " or ""


def _hash_source(src: _Source) -> tuple[str | None, dict | None, str | None]:
    """(key, catalogue entry, error). The stat is taken first: a file that changes while it is
    read gets a stat a loader will not match, so the loader re-hashes rather than trust it."""
    try:
        st = os.stat(src.path)
        key = hash_file(src.path)
    except FileNotFoundError:
        return None, None, f"{src.where}audio file not found: {src.path}"
    except OSError as exc:
        return None, None, f"{src.where}unreadable audio file {src.path}: {exc}"
    return key, {"key": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, None


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)  # the pool is the parallelism; threads per process would oversubscribe


def _decode(job: tuple[str, str, int]) -> tuple[np.ndarray | None, float, str | None]:
    """Decode one clip (a top-level function so worker processes can run it)."""
    path, where, sample_rate = job
    try:
        wave = load_audio(path, sample_rate)
    except AudioError as exc:
        return None, 0.0, f"{where}{exc}"
    except Exception as exc:  # a resampler or libsndfile surprise: still name the file
        return None, 0.0, f"{where}cannot decode audio file {path}: {type(exc).__name__}: {exc}"
    if not np.all(np.isfinite(wave)):
        return None, 0.0, f"{where}audio file {path} decodes to non-finite samples"
    codes, scale = quantise(wave)
    return codes, scale, None


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus))


def _decode_all(jobs: list[tuple[str, str, int]], workers: int, progress: bool):
    """Yield each job's result in order, from a capped pool of spawned processes."""
    bar = tqdm(total=len(jobs), desc="preparing audio", unit="clip", disable=not progress)
    try:
        if workers <= 1 or len(jobs) < _IN_PROCESS_BELOW:
            for job in jobs:
                yield _decode(job)
                bar.update()
            return
        # spawn, not fork: the caller may hold torch/OpenMP threads, which fork breaks
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn"),
                                 initializer=_init_worker) as pool:
            for result in pool.map(_decode, jobs, chunksize=4):
                yield result
                bar.update()
    finally:
        bar.close()


def _write_shard(folder: Path, name: str, sample_rate: int, keys: list[str],
                 jobs: list[tuple[str, str, int]], workers: int, progress: bool) -> tuple[dict, list[str]]:
    """Decode ``jobs`` into shard ``name`` (streamed, never all in memory); returns (clips, errors)."""
    clips: dict[str, list] = {}
    errors: list[str] = []
    header_len = _header_len()
    with atomic_open(folder / f"{name}.npy", "wb") as fh:
        fh.write(_npy_header(0))  # placeholder: the length is known at the end
        offset = 0
        for key, (codes, scale, error) in zip(keys, _decode_all(jobs, workers, progress)):
            if error:
                errors.append(error)
                continue
            fh.write(codes.tobytes())
            clips[key] = [offset, int(len(codes)), scale]
            offset += len(codes)
        header = _npy_header(offset)
        if len(header) != header_len:  # numpy pads 1-D headers to a fixed size; never expected
            raise RuntimeError("numpy .npy header size changed with the array length")
        if not clips or set(clips) <= set(_read_store(folder, sample_rate).clips):
            # nothing decoded, or another job prepared the same clips first: keep its files
            raise _Discard(clips, errors)
        fh.seek(0)
        fh.write(header)
    write_json(folder / f"{name}.json", {"version": FORMAT_VERSION, "sample_rate": sample_rate, "dtype": DTYPE.str,
                            "n_samples": offset, "clips": clips})
    return clips, errors


class _Discard(Exception):
    """Leave ``atomic_open`` without renaming the temp file over the target."""

    def __init__(self, clips: dict, errors: list[str]):
        super().__init__("discard")
        self.clips, self.errors = clips, errors


def _prepare(sources: list[_Source], root: str | os.PathLike, sample_rate: int,
             workers: int | None, progress: bool) -> PrepareSummary:
    start = time.perf_counter()
    root = Path(root)
    folder = store_dir(root, sample_rate)
    folder.mkdir(parents=True, exist_ok=True)
    unique = list({s.path: s for s in reversed(sources)}.values())[::-1]  # first occurrence, in order
    workers = max(1, min(MAX_WORKERS, workers or _default_workers()))

    # 1. key every source by its bytes (threads: hashing is I/O and hashlib releases the GIL)
    with ThreadPoolExecutor(min(workers, 8)) as pool:
        hashed = list(tqdm(pool.map(_hash_source, unique), total=len(unique), desc="hashing sources",
                           unit="file", disable=not progress))
    errors = [err for _, _, err in hashed if err]
    keyed = [(src, key, entry) for src, (key, entry, err) in zip(unique, hashed) if not err]

    # 2. decode only keys no shard holds yet, each once
    store = _read_store(folder, sample_rate)
    todo: dict[str, _Source] = {}
    for src, key, _ in keyed:
        if key not in store.clips and key not in todo:
            todo[key] = src
    shard = None
    if todo:
        keys = list(todo)
        shard = hashlib.sha256(f"{sample_rate}\n{chr(10).join(keys)}".encode()).hexdigest()[:24]
        jobs = [(todo[k].path, todo[k].where, sample_rate) for k in keys]
        try:
            _, decode_errors = _write_shard(folder, shard, sample_rate, keys, jobs, workers, progress)
        except _Discard as discard:
            decode_errors = discard.errors
        errors.extend(decode_errors)
        store = _read_store(folder, sample_rate)

    # 3. the source catalogue: how a loader finds a clip's key without re-reading the source
    files = {src.path: entry for src, key, entry in keyed if key in store.clips}
    if files:
        name = hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:24]
        _write_catalogue(_sources_dir(root) / f"{name}.json", files)

    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise AudioError(f"{len(errors)} audio file(s) could not be prepared "
                         f"(the other {len(files)} were prepared in {root}):\n  {shown}")
    decoded = sum(1 for k in todo if k in store.clips)
    samples = sum(store.clips[entry["key"]][2] for entry in files.values())
    return PrepareSummary(root=str(root), sample_rate=sample_rate, clips=len(unique), decoded=decoded,
                          reused=len(unique) - decoded, audio_seconds=samples / sample_rate,
                          seconds=time.perf_counter() - start, shard=shard if decoded else None)


def _write_catalogue(path: Path, files: dict[str, dict]) -> None:
    body = {"version": FORMAT_VERSION, "files": files}
    try:
        if json.loads(path.read_text(encoding="utf-8")) == body:
            return  # unchanged: an idempotent call rewrites nothing
    except (OSError, ValueError):
        pass
    write_json(path, body)


def prepare_audio(sources: Iterable[Example | str | os.PathLike], out_dir: str | os.PathLike,
                  sample_rate: int = 16000, *, workers: int | None = None,
                  progress: bool = True) -> PrepareSummary:
    """Prepare audio files (paths or corpus ``Example``s) into ``out_dir``; idempotent.

    Raises ``AudioError`` naming every file that is missing or cannot be decoded (after
    storing the others, so a rerun only retries those).
    """
    items = [_Source(_abspath(s.audio_path if isinstance(s, Example) else s), "") for s in sources]
    return _prepare(items, out_dir, sample_rate, workers, progress)


def prepare_corpus(csvs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], out_dir: str | os.PathLike,
                   sample_rate: int = 16000, *, workers: int | None = None,
                   progress: bool = True) -> PrepareSummary:
    """Prepare the clips of EmoSPeech-format CSVs, given as (csv, audio folder) pairs.

    Errors name the CSV and row (``CorpusError`` for a bad CSV or a missing file,
    ``AudioError`` for audio that does not decode).
    """
    items = []
    for csv_path, audio_dir in csvs:
        for ex in read_corpus(csv_path, audio_dir, require_labels=False):
            items.append(_Source(_abspath(ex.audio_path), f"{csv_path}, row {ex.row}: "))
    return _prepare(items, out_dir, sample_rate, workers, progress)


def prepare_for_data_config(data_cfg, *, workers: int | None = None, progress: bool = True) -> PrepareSummary:
    """Prepare the train, dev and test clips of a ``DataConfig`` into ``data_cfg.prepared_dir``
    at ``data_cfg.sample_rate`` (the grid's first job)."""
    if not data_cfg.prepared_dir:
        from ..config import ConfigError
        raise ConfigError("data.prepared_dir is not set: nowhere to store prepared audio")
    from .sources import all_clips  # any data.format: every clip of the corpus once
    items = [_Source(_abspath(c.audio_path), f"{c.where}: ") for c in all_clips(data_cfg)[0]]
    return _prepare(items, data_cfg.prepared_dir, data_cfg.sample_rate, workers, progress)


# ------------------------------------------------------------------ loading

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
            rates = _available_rates(self.root)
            there = (f"; it holds audio at {', '.join(f'{r} Hz' for r in rates)}" if rates
                     else "" if self.root.is_dir() else " (the folder does not exist)")
            raise PreparedAudioError(f"no audio prepared at {self.sample_rate} Hz in {self.root}{there}: {PREPARE_HINT}")

    def _refresh(self) -> None:
        self._store = _read_store(self._folder, self.sample_rate)
        self._sources = _read_sources(self.root)

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
        full = _abspath(path)
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
