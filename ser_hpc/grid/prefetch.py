"""Download every backbone of a grid on the login node, then prove each loads offline.

Compute nodes usually have no internet; jobs run with HF_HUB_OFFLINE=1 and read the
shared Hugging Face cache (set HF_HOME to a shared file system in the cluster profile
and here).
"""
from __future__ import annotations

import logging
from pathlib import Path

from .checks import CheckError, backbones_used, check_backbone
from .expand import expand
from .spec import load_grid

log = logging.getLogger("ser_hpc.grid")

# What a frozen encoder needs; skips other frameworks' weights (tf, flax, onnx) to save space.
PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "merges.txt", "vocab.*", "*.py"]


def grid_backbones(grid_path: str) -> list[tuple[str, str]]:
    return backbones_used(expand(load_grid(grid_path)))


def prefetch(grid_path: str) -> list[tuple[str, str, str]]:
    """Returns (kind, name, outcome) per backbone; raises CheckError if any cannot be had."""
    results, errors = [], []
    for kind, name in grid_backbones(grid_path):
        if Path(name).expanduser().exists():
            outcome = "local folder"
        else:
            from huggingface_hub import snapshot_download
            try:
                path = snapshot_download(name, allow_patterns=PATTERNS)
                outcome = f"downloaded to {path}"
            except Exception as exc:  # offline, unknown repo, gated model, ...
                errors.append(f"{kind} model {name!r}: download failed: {exc}")
                continue
        try:
            check_backbone(name, kind)
        except CheckError as exc:
            errors.append(str(exc))
            continue
        log.info("%s model %s: %s, loads offline", kind, name, outcome)
        results.append((kind, name, outcome))
    if errors:
        raise CheckError("\n".join(errors))
    return results
