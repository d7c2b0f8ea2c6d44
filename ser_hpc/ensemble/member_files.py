"""What makes a finished run usable as an ensemble member, checked before it is ranked and
again on the copies in a new ensemble folder before that folder is published.

A member needs its head (``best_head.safetensors``: readable, the head's tensors, a
classifier with one row per class, finite), its ``config.yaml`` and, for a run that
fine-tuned backbone layers, those layers (``best_backbone.safetensors``). A run whose
files fail is left out of the ranking with the reason, so an aggregation never publishes
an ensemble that ``jobs/predict.py`` cannot load.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

HEAD_FILE = "best_head.safetensors"
CONFIG_FILE = "config.yaml"
BACKBONE_FILE = "best_backbone.safetensors"  # only runs with finetune_top_layers > 0 have one
CLASSIFIER_RE = re.compile(r"classifier\.(\d+)\.weight")


def read_config(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def finetuned(config: dict[str, Any]) -> bool:
    model = config.get("model") or {}
    return any(((model.get(k) or {}).get("finetune_top_layers") or 0) > 0 for k in ("speech", "text"))


def _tensors(path: Path) -> tuple[dict | None, str | None]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path)), None
    except Exception as exc:  # a torn or overwritten file: safetensors' own error says how
        return None, f"{path.name} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"


def head_problem(path: Path, n_classes: int | None) -> str | None:
    """Why ``path`` is not a usable head, or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    tensors, problem = _tensors(path)
    if problem:
        return problem
    layers = sorted((int(m[1]), k) for k in tensors if (m := CLASSIFIER_RE.fullmatch(k)))
    if not layers:
        return f"{path.name} holds no classifier weights ({len(tensors)} tensors: {', '.join(sorted(tensors)[:4])})"
    rows = tensors[layers[-1][1]].shape[0]
    if n_classes is not None and rows != n_classes:
        return f"{path.name}: its classifier has {rows} outputs for {n_classes} classes"
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        return f"{path.name}: non-finite values in {', '.join(bad[:3])}"
    return None


def member_problem(run_dir: Path, n_classes: int | None) -> str | None:
    """Why a done run cannot be an ensemble member, or None."""
    problem = head_problem(run_dir / HEAD_FILE, n_classes)
    if problem:
        return problem
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        return f"{CONFIG_FILE} is missing"
    if finetuned(read_config(config)):
        tuned = run_dir / BACKBONE_FILE
        if not tuned.is_file():
            return f"it fine-tuned backbone layers but {BACKBONE_FILE} is missing"
        return _tensors(tuned)[1]
    return None


def same_tensors(a: Path, b: Path) -> bool:
    """Do two safetensors files hold the same tensors (a copy checked against its source)?"""
    ta, tb = _tensors(a)[0], _tensors(b)[0]
    return ta is not None and tb is not None and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all()) for k in ta)
