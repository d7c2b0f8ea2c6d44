"""Load an ensemble folder (results/<grid>/ensemble/, or a copy of it) for inference.

Everything comes from the folder itself: ensemble.json (members, method, labels,
backbone ids or paths) and members/<run_id>/{config.yaml, best_head.safetensors, and
best_backbone.safetensors for a run that fine-tuned top backbone layers}. Members are
grouped by the backbones they need, so a backbone pair is loaded once and run once per
batch however many heads use it; a single-modality member joins a group that already runs
its encoder (a head reads only the modalities it was built for). A member with fine-tuned
layers has its own copy of the backbone, since its weights are its own.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from ser_hpc.config import Config, ConfigError, config_from_dict
from ser_hpc.ensemble.combine import METHODS
from ser_hpc.models.backbones import FrozenBackbones
from ser_hpc.models.head import EmotionHead, build_head


class EnsembleError(ValueError):
    """The ensemble folder cannot be used; the message names the file."""


@dataclass
class Member:
    run_id: str
    name: str
    config: Config
    speech: str | None   # backbone id/path, None when the member does not use audio
    text: str | None
    backbone_weights: Path | None = None  # fine-tuned top layers (FrozenBackbones key names)
    head: EmotionHead | None = None

    @property
    def needs_audio(self) -> bool:
        return self.speech is not None

    @property
    def needs_text(self) -> bool:
        return self.text is not None

    @property
    def modalities(self) -> str:
        return self.config.model.modalities

    @property
    def bf16(self) -> bool:
        return self.config.train.bf16


@dataclass
class BackboneGroup:
    speech: str | None
    text: str | None
    max_text_tokens: int
    sample_rate: int
    members: list[int] = field(default_factory=list)   # indices into LoadedEnsemble.members
    tuned_weights: Path | None = None                  # a fine-tuned member's own backbone layers
    backbones: FrozenBackbones | None = None
    bf16: bool = False   # any member trained under bf16 autocast: its backbone forward was bf16


@dataclass
class LoadedEnsemble:
    path: Path
    method: str
    members: list[Member]
    groups: list[BackboneGroup]
    device: torch.device
    labels: tuple[str, ...] = ()   # the classes, in probability-column order

    @property
    def needs_audio(self) -> bool:
        return any(m.needs_audio for m in self.members)

    @property
    def audio_only(self) -> list[Member]:
        """The members that can label a clip without a transcription."""
        return [m for m in self.members if not m.needs_text]

    @property
    def sample_rates(self) -> list[int]:
        return sorted({g.sample_rate for g in self.groups if g.speech is not None})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise EnsembleError(f"{path} not found: give the ensemble folder written by jobs/aggregate.py "
                            "(results/<grid>/ensemble)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EnsembleError(f"{path}: not valid JSON ({exc})") from None


def _member(folder: Path, entry: dict, backbone_map: dict[str, str]) -> Member:
    run_id = entry.get("run_id", "?")
    if not entry.get("head") or not entry.get("config"):
        raise EnsembleError(f"{folder / 'ensemble.json'}: member {run_id} has no copied head/config "
                            "(an ensemble aggregated before members/ existed, or with incomplete runs); "
                            "re-run jobs/aggregate.py on the grid")
    config_path = folder / entry["config"]
    if not config_path.is_file():
        raise EnsembleError(f"member {run_id}: {config_path} not found")
    try:
        cfg = config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}, str(config_path))
    except (ConfigError, yaml.YAMLError) as exc:
        raise EnsembleError(f"member {run_id}: {config_path}: {exc}") from None
    used = cfg.model.modalities.split("+")
    # ensemble.json holds the names resolved at aggregation time (absolute paths or hub ids).
    names = entry.get("backbones") or {}
    speech = (names.get("speech") or cfg.model.speech.name) if "audio" in used else None
    text = (names.get("text") or cfg.model.text.name) if "text" in used else None
    tuned = folder / entry["backbone_weights"] if entry.get("backbone_weights") else None
    return Member(run_id, entry.get("name") or run_id, cfg,
                  backbone_map.get(speech, speech) if speech else None,
                  backbone_map.get(text, text) if text else None, tuned)


def _group(members: list[Member]) -> list[BackboneGroup]:
    groups: dict[tuple, BackboneGroup] = {}
    for i, m in enumerate(members):
        key = (m.speech, m.text, m.config.data.max_text_tokens if m.text else None,
               m.config.data.sample_rate if m.speech else None, m.run_id if m.backbone_weights else None)
        group = groups.setdefault(key, BackboneGroup(m.speech, m.text, key[2] or 128, key[3] or 16000,
                                                     tuned_weights=m.backbone_weights))
        group.members.append(i)
    # Fold single-modality groups into a two-modality group running the same (pretrained) encoder.
    full = [k for k in groups if k[0] and k[1] and not k[4]]
    for key in [k for k in groups if not (k[0] and k[1]) and not k[4]]:
        host = next((f for f in full if (key[0] and (f[0], f[3]) == (key[0], key[3]))
                     or (key[1] and (f[1], f[2]) == (key[1], key[2]))), None)
        if host is not None:
            groups[host].members += groups.pop(key).members
    return list(groups.values())


def _read_weights(path: Path, who: str) -> dict[str, torch.Tensor]:
    """A safetensors file; a corrupt or truncated one is named with its member."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError (not an OSError), and others
        size = path.stat().st_size if path.exists() else 0
        raise EnsembleError(
            f"{who}: {path} ({size} bytes) is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "it is corrupt or truncated. Copy it again from the run folder "
            "(results/<grid>/runs/<run_id>/), or re-run jobs/aggregate.py on the grid.") from None


def _load_tuned(backbones: FrozenBackbones, path: Path) -> None:
    """Put a member's fine-tuned top layers over the pretrained ones; every key must land."""
    if not path.is_file():
        raise EnsembleError(f"{path} not found (the member fine-tuned backbone layers)")
    weights = _read_weights(path, f"the member that fine-tuned backbone layers ({path.parent.name})")
    unexpected = backbones.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise EnsembleError(f"{path}: {len(unexpected)} weight(s) do not fit the backbones, e.g. {unexpected[0]}")


def _not_a_benchmark(folder: Path, meta: dict) -> None:
    if meta.get("kind") == "benchmark":
        raise EnsembleError(f"{folder} holds one ensemble per corpus of a benchmark grid "
                            f"({', '.join(meta.get('corpora') or [])}): give {folder}/<corpus>")


def ensemble_labels(folder: str | Path, meta: dict | None = None) -> tuple[str, ...]:
    """The ensemble's classes, in probability-column order, from ensemble.json."""
    folder = Path(folder).expanduser().resolve()
    meta = _read_json(folder / "ensemble.json") if meta is None else meta
    _not_a_benchmark(folder, meta)
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise EnsembleError(f"{folder / 'ensemble.json'}: 'labels' must list the class names, got {labels!r}")
    return tuple(labels)


def load_ensemble(folder: str | Path, device: torch.device | str = "cpu",
                  backbone_map: dict[str, str] | None = None) -> LoadedEnsemble:
    """Read the folder, load each backbone group once and every member's head onto ``device``.

    ``backbone_map`` replaces backbone names (old -> new), for a copy of the folder on a
    machine where the backbones live elsewhere.
    """
    folder = Path(folder).expanduser().resolve()
    device = torch.device(device)
    meta = _read_json(folder / "ensemble.json")
    _not_a_benchmark(folder, meta)
    labels = ensemble_labels(folder, meta)
    method = meta.get("method", "mean")
    if method not in METHODS:
        raise EnsembleError(f"{folder / 'ensemble.json'}: unknown ensemble method {method!r}")
    entries = meta.get("members") or []
    if not entries and meta.get("fold_ensembles"):
        raise EnsembleError(f"{folder / 'ensemble.json'}: a grid with folds has one ensemble per fold "
                            f"({', '.join(meta['fold_ensembles'])}): load each (fold_ensemble_dirs), "
                            "or give jobs/predict.py this folder (all folds) or --fold K")
    if not entries:
        raise EnsembleError(f"{folder / 'ensemble.json'}: no members")
    members = [_member(folder, e, backbone_map or {}) for e in entries]
    groups = _group(members)
    for g in groups:
        g.backbones = FrozenBackbones(g.speech, g.text, g.max_text_tokens)
        if g.tuned_weights is not None:
            _load_tuned(g.backbones, g.tuned_weights)
        g.backbones = g.backbones.to(device).eval()
        if g.backbones.speech is not None and g.backbones.speech.sample_rate != g.sample_rate:
            raise EnsembleError(f"backbone {g.speech} expects {g.backbones.speech.sample_rate} Hz but its members "
                                f"were trained at data.sample_rate {g.sample_rate}")
        g.bf16 = any(members[i].bf16 for i in g.members)
        for i in g.members:
            m = members[i]
            # The head is built for the member's own modalities even inside a wider group.
            view = SimpleNamespace(speech=g.backbones.speech if m.needs_audio else None,
                                   text=g.backbones.text if m.needs_text else None)
            head = build_head(m.config.model, view, len(labels))
            weights = folder / entries[i]["head"]
            if not weights.is_file():
                raise EnsembleError(f"member {m.run_id}: {weights} not found")
            state = _read_weights(weights, f"member {m.run_id} ({m.name})")
            try:
                head.load_state_dict(state)
            except RuntimeError as exc:
                raise EnsembleError(f"member {m.run_id}: {weights} does not match its config: {exc}") from None
            m.head = head.to(device).eval()
    return LoadedEnsemble(folder, method, members, groups, device, labels)


# ----------------------------------------------------------------------------- fold ensembles
# A grid with a data.fold axis publishes ensemble/ with one self-contained ensemble per
# fold (fold_K/, each loadable by load_ensemble) and a top-level ensemble.json listing them
# in ``fold_ensembles``. Inference uses them together (the mean of their scores: mean
# probabilities, or vote shares for vote ensembles) or one of them.

def fold_ensemble_dirs(folder: str | Path, fold: int | None = None) -> list[Path]:
    """The ensemble folders to run: [folder] for a plain ensemble; every fold_K/ of a fold
    ensemble, or only fold ``fold``. Checks that every fold ensemble has the top level's classes."""
    folder = Path(folder).expanduser().resolve()
    meta = _read_json(folder / "ensemble.json")
    _not_a_benchmark(folder, meta)
    dirs = meta.get("fold_ensembles")
    if not dirs:
        if fold is not None:
            raise EnsembleError(f"{folder / 'ensemble.json'}: not an ensemble of a grid with folds "
                                "(no 'fold_ensembles'); --fold applies only to those")
        return [folder]
    labels = ensemble_labels(folder, meta)
    by_fold = {r.get("fold"): r.get("dir") for r in meta.get("folds") or [] if isinstance(r, dict)}
    if fold is not None:
        if fold not in by_fold:
            raise EnsembleError(f"{folder / 'ensemble.json'}: no ensemble for fold {fold}; "
                                f"folds: {', '.join(str(f) for f in sorted(by_fold))}")
        dirs = [by_fold[fold]]
    out = []
    for name in dirs:
        path = (folder / name).resolve()
        if ensemble_labels(path) != labels:
            raise EnsembleError(f"{path / 'ensemble.json'}: classes {', '.join(ensemble_labels(path))} differ from "
                                f"{folder / 'ensemble.json'}'s {', '.join(labels)}: the fold ensembles cannot be "
                                "averaged")
        out.append(path)
    return out


def combine_fold_results(results: list):
    """One PredictionResult from the fold ensembles' results on the same rows: the mean of their
    scores, argmax for the label. A row any fold could not label stays unlabelled."""
    if not results:
        raise ValueError("no fold results to combine")
    if len(results) == 1:
        return results[0]
    first = results[0]
    if any(r.labels != first.labels for r in results) or any(len(r.rows) != len(first.rows) for r in results):
        raise EnsembleError("fold ensembles disagree on classes or rows: they cannot be averaged")
    errors: dict[int, str] = {}
    for r in results:
        for i, why in r.errors.items():
            errors.setdefault(i, why)
    stacked = np.stack([r.probs for r in results])          # (folds, n, C)
    n, c = stacked.shape[1], stacked.shape[2]
    probs, pred = np.full((n, c), np.nan), np.full(n, -1, dtype=np.int64)
    ok = [i for i in range(n) if i not in errors and not np.isnan(stacked[:, i]).any()]
    for i in range(n):
        if i not in errors and i not in ok:
            errors[i] = "not scored by every fold ensemble"
    if ok:
        probs[ok] = stacked[:, ok].mean(axis=0)
        pred[ok] = probs[ok].argmax(axis=1)
    notes = list(dict.fromkeys(note for r in results for note in r.notes))
    notes.append(f"mean of the scores of {len(results)} fold ensembles")
    return dataclasses.replace(first, probs=probs, pred=pred,
                               member_probs=np.concatenate([r.member_probs for r in results]),
                               errors=dict(sorted(errors.items())), notes=notes,
                               elapsed_s=sum(r.elapsed_s for r in results))
