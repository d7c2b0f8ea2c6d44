"""Prepare audio: decode every clip once (in worker processes), downmix, resample to the
backbones' rate and append the new clips to the prepared store as one shard
(``prepared_format.py``: layout, keys, concurrency, precision). An unchanged corpus
decodes nothing; a clip that cannot be decoded is reported with its CSV row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..atomic_io import atomic_open, write_json
from .audio import AudioError, load_audio
from .corpus import Example, read_corpus
from .prepared_format import (DTYPE, FORMAT_VERSION, abspath, hash_file, header_len, npy_header, quantise,
                              read_store, sources_dir, store_dir)

log = logging.getLogger(__name__)

MAX_WORKERS = 8          # decoding processes at most (a login node or a small CPU allocation)
_IN_PROCESS_BELOW = 16   # fewer clips than this are decoded in-process (spawning workers costs seconds)



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
    n_header = header_len()
    with atomic_open(folder / f"{name}.npy", "wb") as fh:
        fh.write(npy_header(0))  # placeholder: the length is known at the end
        offset = 0
        for key, (codes, scale, error) in zip(keys, _decode_all(jobs, workers, progress)):
            if error:
                errors.append(error)
                continue
            fh.write(codes.tobytes())
            clips[key] = [offset, int(len(codes)), scale]
            offset += len(codes)
        header = npy_header(offset)
        if len(header) != n_header:  # numpy pads 1-D headers to a fixed size; never expected
            raise RuntimeError("numpy .npy header size changed with the array length")
        if not clips or set(clips) <= set(read_store(folder, sample_rate).clips):
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
    store = read_store(folder, sample_rate)
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
        store = read_store(folder, sample_rate)

    # 3. the source catalogue: how a loader finds a clip's key without re-reading the source
    files = {src.path: entry for src, key, entry in keyed if key in store.clips}
    if files:
        name = hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:24]
        _write_catalogue(sources_dir(root) / f"{name}.json", files)

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
    items = [_Source(abspath(s.audio_path if isinstance(s, Example) else s), "") for s in sources]
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
            items.append(_Source(abspath(ex.audio_path), f"{csv_path}, row {ex.row}: "))
    return _prepare(items, out_dir, sample_rate, workers, progress)



def prepare_for_data_config(data_cfg, *, workers: int | None = None, progress: bool = True) -> PrepareSummary:
    """Prepare the train, dev and test clips of a ``DataConfig`` into ``data_cfg.prepared_dir``
    at ``data_cfg.sample_rate`` (the grid's first job)."""
    if not data_cfg.prepared_dir:
        from ..config import ConfigError
        raise ConfigError("data.prepared_dir is not set: nowhere to store prepared audio")
    from .sources import all_clips  # any data.format: every clip of the corpus once
    items = [_Source(abspath(c.audio_path), f"{c.where}: ") for c in all_clips(data_cfg)[0]]
    return _prepare(items, data_cfg.prepared_dir, data_cfg.sample_rate, workers, progress)
