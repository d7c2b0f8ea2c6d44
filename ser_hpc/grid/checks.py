"""Everything the launcher checks before it submits anything, and the prefetch of backbones.

A grid of hundreds of GPU jobs must not fail one by one an hour later on a typo: the data
of every distinct data config is read and checked, and every backbone must resolve
offline (config, weights, tokenizer / feature extractor) as it will on a compute node.
Compute nodes usually have no internet: ``prefetch`` downloads a grid's backbones on the
login node into the shared Hugging Face cache (HF_HOME in the cluster profile and here).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..config import ConfigError, config_from_dict
from ..data.audio import AudioError
from ..data.corpus import CorpusError
from ..data.sources import load_splits
from ..models.encoders import BackboneError, missing_model
from .plan import PlannedRun, expand, load_grid

log = logging.getLogger("ser_hpc.grid")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckError(ValueError):
    """A pre-submission check failed; nothing was submitted."""


def backbones_used(runs: list[PlannedRun]) -> list[tuple[str, str]]:
    """(kind, name) of every backbone the runs load: speech models, then text models, sorted.
    The launcher checks these and ``prefetch_models.py`` downloads them."""
    return [(kind, name) for kind, modality in (("speech", "audio"), ("text", "text"))
            for name in sorted({r.config["model"][kind]["name"] for r in runs
                                if modality in r.config["model"]["modalities"].split("+")})]


def check_data(runs: list[PlannedRun], quick: bool = False, problems: list[str] | None = None) -> int:
    """Read every distinct data config once (any data.format: files, columns, labels, folds and
    splits); ``quick`` checks the audio files exist but does not open them. With ``problems``,
    each failure is appended there instead of raised. Returns how many were read."""
    seen: set[str] = set()
    for run in runs:
        needs_text = "text" in run.config["model"]["modalities"]
        key = json.dumps([run.config["data"], needs_text], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        data = config_from_dict(run.config).data  # a Config only for each distinct data section
        try:
            load_splits(data, needs_text=needs_text, open_audio=not quick)
            for folder in (data.noise_dir, data.rir_dir):
                if folder and not Path(folder).is_dir():
                    raise CheckError(f"augmentation folder not found: {folder}")
        except (CorpusError, AudioError, CheckError, ConfigError) as exc:
            if problems is None:
                raise
            if str(exc) not in problems:  # e.g. one missing corpus folder, named once for all its folds
                problems.append(str(exc))
    return len(seen)


def check_backbones(runs: list[PlannedRun], grid_path: str, problems: list[str]) -> int:
    """Every backbone the runs load must load offline; each failure goes to ``problems``, with
    the prefetch command when hub models are not cached. Returns how many were checked."""
    names = {(kind, name): missing_model(kind, name) for kind, name in backbones_used(runs)}  # a missing folder
    not_cached = 0
    for (kind, name), error in names.items():
        try:
            if error is not None:
                raise error
            check_backbone(name, kind)
        except (BackboneError, CheckError) as exc:
            problems.append(str(exc))
            not_cached += error is None and not Path(name).expanduser().exists()
    if not_cached:
        problems.append(f"to fetch the {not_cached} hub model(s) above on the login node: "
                        f"HF_HOME=<the cluster's shared cache> python jobs/prefetch_models.py {grid_path}")
    return len(names)


def _resolve_offline(name: str, filename: str) -> str | None:
    """Path of ``filename`` for a local folder or a hub id in the local cache, or None."""
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local / filename) if (local / filename).is_file() else None
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(name, filename)
    return found if isinstance(found, str) else None


def check_backbone(name: str, kind: str) -> None:
    """The checkpoint must load with no network: config, weights, and the preprocessor."""
    if _resolve_offline(name, "config.json") is None:
        where = "folder" if Path(name).expanduser().exists() or name.startswith(("/", ".")) else "hub cache"
        hint = ("" if where == "folder" else
                f" (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); run jobs/prefetch_models.py on the login node")
        raise CheckError(f"{kind} model {name!r}: no config.json in the {where}{hint}")
    if not any(_resolve_offline(name, f) for f in WEIGHT_FILES):
        raise CheckError(f"{kind} model {name!r}: no weights ({', '.join(WEIGHT_FILES)}) available offline")
    if kind == "text":
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckError(f"text model {name!r}: tokenizer does not load offline: {exc}") from None
        if len(tok) < 100:
            raise CheckError(f"text model {name!r}: tokenizer has only {len(tok)} tokens; the tokenizer files "
                             "were probably not found")


# What a frozen encoder needs; skips other frameworks' weights (tf, flax, onnx) to save space.
PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "merges.txt", "vocab.*", "*.py"]


def prefetch(grid_path: str) -> list[tuple[str, str, str]]:
    """Download every backbone of a grid, then prove each loads offline. Returns (kind, name,
    outcome) per backbone; raises CheckError naming every one that cannot be had."""
    results, errors = [], []
    for kind, name in backbones_used(expand(load_grid(grid_path))):
        if Path(name).expanduser().exists():
            outcome = "local folder"
        else:
            from huggingface_hub import snapshot_download
            try:
                outcome = f"downloaded to {snapshot_download(name, allow_patterns=PATTERNS)}"
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
