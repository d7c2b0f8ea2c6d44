"""The code a launch's jobs run: a snapshot taken at submission.

A grid may wait hours in the queue; without a snapshot each task would run the checkout as
it is when the task starts, so an edit in the meantime would silently change part of a
grid. The launcher copies the package, ``jobs/`` and the sbatch templates into
``results/<grid>/code/<id>/`` (``id``: a hash of their content, so an unchanged checkout
reuses the snapshot of the last launch) and every job of that launch starts from there:
submitit jobs ``cd`` into it before Python starts, sbatch jobs get it as ``SER_HPC_CODE``
and run its ``jobs/*.py``, local packs run its ``jobs/train.py``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What a job runs: the package, the entry points, the sbatch templates.
PATTERNS = ("ser_hpc/**/*.py", "jobs/*.py", "slurm/*.sbatch", "slurm/submit_grid.sh")
ENV = "SER_HPC_CODE"  # the sbatch templates' variable: where the launch's code is


@dataclass(frozen=True)
class CodeVersion:
    id: str                  # content hash of the files (12 hex)
    files: tuple[str, ...]   # paths relative to the checkout
    bytes: int


def code_version(root: Path = REPO) -> CodeVersion:
    """The checkout's code as it is now (reads a few hundred small files)."""
    files = sorted({str(p.relative_to(root)) for pattern in PATTERNS for p in root.glob(pattern)
                    if p.is_file() and "__pycache__" not in p.parts})
    digest, size = hashlib.sha256(), 0
    for rel in files:
        data = (root / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
        size += len(data)
    return CodeVersion(digest.hexdigest()[:12], tuple(files), size)


def snapshot_dir(out_dir: Path, version: CodeVersion) -> Path:
    return out_dir / "code" / version.id


def take(out_dir: Path, version: CodeVersion, root: Path = REPO) -> tuple[Path, bool]:
    """The snapshot folder of ``version`` (absolute) and whether it was already there.
    Written to a temp folder and renamed, so a folder of that name is always complete."""
    target = snapshot_dir(out_dir, version).resolve()
    if target.is_dir():
        return target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version.id}-", dir=target.parent))
    try:
        for rel in version.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
        if code_version(tmp).id != version.id:  # edited while we copied: refuse a mixed snapshot
            raise RuntimeError(f"the code changed while it was copied into {target}; launch again")
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except FileExistsError:  # another launch wrote the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
        return target, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, False
