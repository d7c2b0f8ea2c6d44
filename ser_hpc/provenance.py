"""Where a result came from: the checkout's git commit (and whether it had uncommitted
changes) and the versions of the packages that shape the figures. The launcher records it
in manifest.json; an export's model card repeats it."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchaudio", "transformers", "submitit", "deepspeed", "scikit-learn", "numpy", "soundfile")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes to tracked files); (None, None) outside a git checkout."""
    commit = _git("rev-parse", "HEAD") or None
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, None if dirty is None else bool(dirty)


def provenance() -> dict:
    """The checkout and package versions this process runs with."""
    commit, dirty = git_state()
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": commit, "git_dirty": dirty, "versions": versions}
