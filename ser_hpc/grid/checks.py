"""Everything the launcher checks before it submits anything, and the prefetch of a grid's
backbones (each checkpoint's own check and download: models/availability.py).

A grid of hundreds of GPU jobs must not fail one by one an hour later on a typo: the data
of every distinct data config is read and checked, and every backbone must resolve
offline (config, weights, tokenizer / feature extractor) as it will on a compute node.
Compute nodes usually have no internet: ``prefetch`` downloads a grid's backbones on the
login node into the shared Hugging Face cache (HF_HOME in the cluster profile and here).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ConfigError, config_from_dict
from ..data.audio import AudioError
from ..data.corpus import CorpusError
from ..data.sources import load_splits
from ..models.availability import check_available, fetch
from ..models.encoders import BackboneError, missing_model
from .plan import PlannedRun, expand, load_grid

log = logging.getLogger("ser_hpc.grid")


class CheckError(ValueError):
    """A pre-submission check failed; nothing was submitted."""


def backbones_used(runs: list[PlannedRun]) -> list[tuple[str, str]]:
    """(kind, name) of every backbone the runs load: speech models, then text models, sorted.
    The launcher checks these and ``prefetch_models.py`` downloads them."""
    return [(kind, name) for kind, modality in (("speech", "audio"), ("text", "text"))
            for name in sorted({r.config["model"][kind]["name"] for r in runs
                                if modality in r.config["model"]["modalities"].split("+")})]


def check_data(runs: list[PlannedRun], quick: bool, problems: list[str]) -> tuple[int, str]:
    """Read every distinct data config once (any data.format: files, columns, labels, folds and
    splits) and decode every clip it names (``decode_check``: once per clip content, ever);
    ``quick`` only checks that the audio files exist. Each failure goes to ``problems``.
    Returns how many data configs were read, and what the audio check covered, in words."""
    from ..data.decode_check import check_decoding
    from ..data.sources import all_clips
    seen: set[str] = set()
    clips: dict[str, str] = {}  # audio path -> where it is named (a CSV row)
    stores: set[tuple[str, int]] = set()
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
            if not quick and "audio" in run.config["model"]["modalities"]:
                for c in all_clips(data)[0]:
                    clips.setdefault(str(c.audio_path), f"{c.where}: ")
                if data.prepared_dir:
                    stores.add((data.prepared_dir, data.sample_rate))
        except (CorpusError, AudioError, CheckError, ConfigError) as exc:
            if str(exc) not in problems:  # e.g. one missing corpus folder, named once for all its folds
                problems.append(str(exc))
    if quick:
        return len(seen), ("audio: --quick-check: the files exist; they were not opened or decoded (a clip that "
                           "does not decode fails the preparation or training job that reads it)")
    result = check_decoding(list(clips.items()), sorted(stores))
    if result.errors:
        problems.append(f"{len(result.errors)} audio file(s) do not decode:\n  " + "\n  ".join(result.errors[:20])
                        + (f"\n  ... and {len(result.errors) - 20} more" if len(result.errors) > 20 else ""))
    return len(seen), f"audio: {result}"


def check_cross_corpus(runs: list[PlannedRun], cross: dict | None, problems: list[str]) -> None:
    """Each cross-corpus pair must share a class (by name, after each corpus's label map)."""
    from ..ensemble.cross_corpus import shared_classes
    if not cross:
        return
    labels: dict[str, list[str]] = {}
    for run in runs:
        if run.corpus not in labels:
            try:
                labels[run.corpus] = list(load_splits(config_from_dict(run.config).data, open_audio=False).labels)
            except (CorpusError, AudioError, ConfigError):
                labels[run.corpus] = []  # the data check names the problem
    for a in cross["train"]:
        for b in cross["test"]:
            if a != b and labels.get(a) and labels.get(b) and not shared_classes(labels[a], labels[b]):
                problems.append(f"cross_corpus: {a} ({', '.join(labels[a])}) and {b} ({', '.join(labels[b])}) share "
                                "no class: map the labels onto common names (data.label_map) or drop the pair")


MIN_FREE_GB = 1.0  # a grid writes checkpoints, probabilities and reports into its results folder


def check_results_dir(out_dir: Path, problems: list[str]) -> str:
    """The results folder (or the nearest folder above it that exists) takes a file, and its
    file system has room; returns the dry run's line, each failure goes to ``problems``."""
    import shutil
    import uuid
    where = Path(out_dir).absolute()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        problems.append(f"results folder {where}: {probe} is a file, not a folder; set results_dir in the grid "
                        "file to a folder you can write")
        return f"results: {where} (cannot be created)"
    test = probe / f".ser_hpc-write-test-{uuid.uuid4().hex[:8]}"
    try:
        test.write_bytes(b"ok")
    except OSError as exc:
        problems.append(f"results folder {where}: cannot write in {probe} ({exc.strerror or exc}); set results_dir "
                        "in the grid file to a folder you can write")
        return f"results: {where} (not writable)"
    finally:
        test.unlink(missing_ok=True)
    free = shutil.disk_usage(probe).free / 1e9
    if free < MIN_FREE_GB:
        problems.append(f"results folder {where}: only {free * 1000:.0f} MB free on its file system ({probe}); a grid "
                        f"needs at least {MIN_FREE_GB:.0f} GB there for checkpoints, probabilities and reports: free "
                        "some space or set results_dir in the grid file to a larger file system")
    return f"results: {where} (writable, {free:.1f} GB free)"


def check_backbones(runs: list[PlannedRun], grid_path: str, problems: list[str]) -> int:
    """Every backbone the runs load must load offline; each failure goes to ``problems``, with
    the prefetch command when hub models are not cached. Returns how many were checked."""
    names = {(kind, name): missing_model(kind, name) for kind, name in backbones_used(runs)}  # a missing folder
    not_cached = 0
    for (kind, name), error in names.items():
        try:
            if error is not None:
                raise error
            check_available(name, kind)
        except BackboneError as exc:
            problems.append(str(exc))
            not_cached += error is None and not Path(name).expanduser().exists()
    if not_cached:
        problems.append(f"to fetch the {not_cached} hub model(s) above on the login node: "
                        f"HF_HOME=<the cluster's shared cache> python jobs/prefetch_models.py {grid_path}")
    problems += layer_problems(runs, {key for key, error in names.items() if error is None})
    return len(names)


def layer_problems(runs: list[PlannedRun], readable: set[tuple[str, str]]) -> list[str]:
    """A layer list a head reads must exist in its encoder ([30] of a 24-layer model does not)."""
    from ..models.encoders import backbone_config
    from ..models.head import layers_used
    from ..models.speech_families import speech_spec
    states, problems = {}, []
    for run in runs:
        model = run.config["model"]
        for kind, modality in (("speech", "audio"), ("text", "text")):
            name, layers = model[kind]["name"], model[kind]["layers"]
            if modality not in model["modalities"].split("+") or (kind, name) not in readable:
                continue
            try:
                if (kind, name) not in states:
                    states[(kind, name)] = (speech_spec(name).num_states if kind == "speech"
                                            else backbone_config(kind, name).num_hidden_layers + 1)
                layers_used(layers, states[(kind, name)], f"model.{kind}.layers of {kind} model {name!r}")
            except (BackboneError, ConfigError, OSError) as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
    return problems


def prefetch(grid_path: str) -> list[tuple[str, str, str]]:
    """Download every backbone of a grid, then prove each loads offline. Returns (kind, name,
    outcome) per backbone; raises CheckError naming every one that cannot be had."""
    results, errors = [], []
    for kind, name in backbones_used(expand(load_grid(grid_path))):
        try:
            outcome = fetch(kind, name)
        except BackboneError as exc:
            errors.append(str(exc))
            continue
        log.info("%s model %s: %s, loads offline", kind, name, outcome)
        results.append((kind, name, outcome))
    if errors:
        raise CheckError("\n".join(errors))
    return results
