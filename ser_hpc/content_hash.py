"""Content hashes of files (SHA-256 of their bytes), remembered by their stat.

What a feature store, a decode check or a prepared clip is keyed by must be the content of
the files it came from, never where they live: the same corpus and checkpoint in another
checkout, or a moved project folder, must find the work already done. Hashing a 1.2 GB
checkpoint or a corpus of thousands of clips at every launch would cost seconds to
minutes, so each digest is remembered with the file's path, size and mtime in this user's
cache (``$SER_HPC_CACHE``, default ``~/.cache/ser_hpc``) and recomputed only when the
file changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("ser_hpc")
_CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("SER_HPC_CACHE") or Path.home() / ".cache" / "ser_hpc")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def file_hashes(paths: list[str | os.PathLike], workers: int = 8) -> list[str]:
    """SHA-256 of each file, from the cache where its size and mtime are unchanged."""
    from .atomic_io import write_json
    cache_path = cache_dir() / "file_sha256.json"
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    keys = [os.path.abspath(p) for p in paths]
    stamps = {k: _stamp(k) for k in keys}  # taken before reading: a file changed meanwhile is hashed again next time
    todo = sorted(k for k, st in stamps.items() if (cache.get(k) or [None])[:2] != st)
    if todo:
        with ThreadPoolExecutor(min(workers, len(todo))) as pool:  # I/O bound; hashlib releases the GIL
            for k, digest in zip(todo, pool.map(sha256_file, todo)):
                cache[k] = stamps[k] + [digest]
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_path, cache)
        except OSError as exc:  # a read-only home: correct, only slower next time
            log.warning("cannot remember file hashes in %s: %s", cache_path, exc)
    return [cache[k][2] for k in keys]
