"""DEST appears whole or not at all: the export fills a temp folder beside it, renamed at the end.

A failure (bad input found late, a crash, Ctrl-C) removes the temp folder, so nothing
half-written is left; an existing DEST is only replaced with ``overwrite``, and then by
renames (old DEST aside, new one in, old one deleted).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from . import ExportError


def check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists: choose another --out, or pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder")


@contextlib.contextmanager
def staged_folder(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``dest``; on clean exit it becomes ``dest``."""
    dest = Path(dest).expanduser().absolute()
    check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
