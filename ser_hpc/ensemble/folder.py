"""results/<grid>/ensemble is a symlink to ensemble.<stamp>/, switched in one rename.

Each aggregation builds a fresh folder beside the current one and, once everything in it
is written, points the ``ensemble`` link at it with os.replace of a new symlink: atomic
on POSIX file systems, NFS and Lustre included. A job killed at any moment before that
leaves the link on the previous, complete folder, whose members/ are untouched; older
folders are deleted only after the switch. Readers (jobs/predict.py, inference) keep using
``results/<grid>/ensemble``. One aggregation per grid at a time (Slurm's dependency
gives that): a switch deletes every other ensemble.* folder, half-built ones included.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ser_hpc.ensemble.collect import AggregateError
from ser_hpc.ensemble.member_files import head_problem

LINK = "ensemble"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_stage(results_dir: Path) -> Path:
    """An empty, uniquely named folder next to the link (same file system, so rename works)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(tempfile.mkdtemp(prefix=f"{LINK}.{stamp}-", dir=results_dir))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; results are shared with the group
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def publish(results_dir: Path, stage: Path) -> None:
    """Point results_dir/ensemble at ``stage``, then delete every other ensemble.* folder."""
    link = results_dir / LINK
    if link.is_dir() and not link.is_symlink():
        # A real folder from before this layout: move it aside (two renames; the only
        # moment without an ``ensemble``), the cleanup below removes it after the switch.
        os.rename(link, results_dir / f"{LINK}.legacy-{stage.name.split('.', 1)[1]}")
    tmp = results_dir / f".{LINK}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(stage.name, tmp)  # relative: the results tree can be moved or copied whole
    os.replace(tmp, link)
    _fsync_dir(results_dir)
    for old in results_dir.glob(f"{LINK}.*"):
        if old != stage and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    for stray in results_dir.glob(f".{LINK}.link-*"):  # a job killed between symlink and replace
        stray.unlink(missing_ok=True)


def discard(stage: Path) -> None:
    """Drop a folder whose aggregation did not finish; the current ensemble stays as it was."""
    shutil.rmtree(stage, ignore_errors=True)


def complete_ensemble(folder: Path) -> bool:
    """Does ``folder`` (e.g. results_dir/ensemble) hold a built ensemble, not a leaderboard alone?"""
    return (folder / "ensemble.json").is_file()


def verify(folder: Path) -> None:
    """Every member file a new ensemble.json names is there and loads (fold ensembles: each
    fold's); raises AggregateError naming what is not, before the folder is published."""
    meta = json.loads((folder / "ensemble.json").read_text(encoding="utf-8"))
    for sub in (meta.get("fold_ensembles") or []) + list((meta.get("ensembles") or {}).values()):  # folds, corpora
        verify(folder / sub)
    problems = []
    for m in meta.get("members") or []:
        problem = head_problem(folder / m["head"], len(meta["labels"])) if m.get("head") else "no head"
        problem = problem or next((f"{m[k]} is missing" for k in ("config", "backbone_weights")
                                   if m.get(k) and not (folder / m[k]).is_file()), None)
        if problem:
            problems.append(f"member {m['run_id']}: {problem}")
    if problems:
        raise AggregateError(f"the new ensemble in {folder} is incomplete: " + "; ".join(problems))


def build_and_publish(results_dir: Path, build: Callable[[Path], dict],
                      finish: Callable[[Path, dict | None], None]) -> dict:
    """One aggregation: ``build(stage)`` writes a new ensemble into a fresh folder and returns
    its ensemble.json content; ``finish(stage, result)`` writes the leaderboard and, with a
    result, ensemble.json (last). The folder is published only once ``verify`` passes.

    When the build fails for a reason the user must fix (``AggregateError``: no finished run,
    inconsistent outputs, a broken copy), the leaderboard still reports it: published when
    there is no ensemble yet, else left beside the previous ensemble, which stays published.
    Any other error (a bug, an interrupt) discards the folder.
    """
    stage = new_stage(results_dir)
    try:
        result = build(stage)
        finish(stage, result)
        verify(stage)
    except AggregateError as exc:
        (stage / "ensemble.json").unlink(missing_ok=True)  # a broken build never passes for an ensemble
        finish(stage, None)
        if complete_ensemble(results_dir / LINK):
            raise AggregateError(f"{exc}\nthe previous ensemble ({results_dir / LINK} -> "
                                 f"{os.readlink(results_dir / LINK) if (results_dir / LINK).is_symlink() else LINK}) "
                                 f"is kept; this aggregation's leaderboard is in {stage}") from None
        publish(results_dir, stage)
        raise
    except BaseException:
        discard(stage)  # keep the previous ensemble as it was
        raise
    publish(results_dir, stage)
    return result
