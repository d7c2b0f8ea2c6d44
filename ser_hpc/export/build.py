"""From an ensemble folder to the standalone model (remote/modeling_ser_ensemble.py).

Every fold ensemble to export (``fold_ensemble_dirs``: the folder itself, every fold_K/ of
a fold ensemble, or one fold) is loaded with ser_hpc's own ``load_ensemble``, offline: a
backbone that cannot be found is a BackboneError naming it, a broken folder an
EnsembleError naming the file. Backbone groups with the same backbones are merged across
folds, so the exported model runs each backbone once per batch for all folds' heads.

A member whose top backbone layers were fine-tuned (best_backbone.safetensors) is exported
with its own copy of that backbone, the fine-tuned layers in place: it is saved as a full
backbone folder of its own (``backbones/<name>-ft-<run>``), as predict.py loads it.

The standalone model is checked against ser_hpc's forward (predictor._forward) on a
synthetic clip before anything is written: every member's probabilities must agree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from ser_hpc.data.dataset import WholeClips
from ser_hpc.inference.ensemble import LoadedEnsemble, fold_ensemble_dirs, load_ensemble
from ser_hpc.inference.predictor import _forward
from ser_hpc.inference.windows import DEFAULT_HOP_FRACTION, DEFAULT_WINDOW_S
from ser_hpc.models.encoders import SpeechEncoder

from . import ExportError
from .remote.configuration_ser_ensemble import SerEnsembleConfig
from .remote.modeling_ser_ensemble import SerEnsembleForAudioClassification

CHECK_TEXT = "hola, ¿qué tal estás hoy?"
CHECK_TOLERANCE = 1e-4
AUTO_MAP = {"AutoConfig": "configuration_ser_ensemble.SerEnsembleConfig",
            "AutoModelForAudioClassification": "modeling_ser_ensemble.SerEnsembleForAudioClassification"}
CUSTOM_PIPELINES = {"audio-classification": {"impl": "pipeline_ser_ensemble.SerAudioClassificationPipeline",
                                             "pt": ["AutoModelForAudioClassification"], "tf": [], "type": "audio"}}


@dataclass
class BackboneDir:
    """One backbone as it goes into the export: ``subfolder`` of DEST."""
    subfolder: str
    kind: str                      # speech | text
    source: str                    # the id or path ensemble.json names
    module: nn.Module              # the transformers model (fine-tuned layers loaded)
    tokenizer: object = None       # text backbones
    feature_extractor: object = None
    tuned_by: str | None = None    # run id whose fine-tuned layers it holds


@dataclass
class ExportModel:
    """The standalone model with backbones attached, and what the exports write beside it."""
    model: SerEnsembleForAudioClassification
    config: SerEnsembleConfig
    labels: tuple[str, ...]
    backbones: list[BackboneDir]
    folders: list[Path]            # the ensemble folders exported (one per fold)
    top: Path                      # ENSEMBLE_DIR as given (resolved)
    members_meta: list[dict]       # ensemble.json member entries, in config.members order
    check_max_diff: float = 0.0
    notes: list[str] = field(default_factory=list)


def _slug(name: str) -> str:
    base = Path(name.rstrip("/")).name or "backbone"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "backbone"


def _tuned_prefixes(path: Path) -> set[str]:
    """Which encoders a best_backbone.safetensors changes: {'speech', 'text'}."""
    with safe_open(str(path), framework="pt") as fh:
        return {key.split(".", 1)[0] for key in fh.keys()}


def _head_spec(model_cfg) -> dict:
    return {"fusion": model_cfg.fusion, "pooling": model_cfg.pooling, "fusion_dim": model_cfg.fusion_dim,
            "fusion_attention_heads": model_cfg.fusion_attention_heads, "head_width": model_cfg.head_width,
            "hidden_layers": model_cfg.hidden_layers, "dropout": model_cfg.dropout,
            "speech_layers": model_cfg.speech.layers, "text_layers": model_cfg.text.layers}


def _check_input(sample_rate: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(1.7 * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


class _Builder:
    def __init__(self):
        self.groups: list[dict] = []
        self.group_keys: dict[tuple, int] = {}
        self.members: list[dict] = []
        self.members_meta: list[dict] = []
        self.ensembles: list[dict] = []
        self.heads: dict[int, dict] = {}                  # global member -> head state dict
        self.backbones: dict[tuple, BackboneDir] = {}
        self.reference: dict[int, np.ndarray] = {}        # global member -> probs on the check clip
        self.notes: list[str] = []

    def backbone(self, kind: str, name: str, encoder, tuned_by: str | None) -> BackboneDir:
        key = (kind, name, tuned_by)
        if key not in self.backbones:
            sub = _slug(name) + (f"-ft-{_slug(tuned_by)}" if tuned_by else "")
            taken = {b.subfolder for b in self.backbones.values()}
            folder, k = f"backbones/{sub}", 2
            while folder in taken:
                folder, k = f"backbones/{sub}-{k}", k + 1
            fe = None
            if kind == "speech" and not isinstance(encoder, SpeechEncoder):
                from ser_hpc.models.speech_families import speech_spec
                raise ExportError(f"speech model {name!r} is a {speech_spec(name).family} encoder: export writes "
                                  "wav2vec2-family backbones (wav2vec2 / XLS-R, HuBERT, WavLM, data2vec-audio) "
                                  "only; jobs/predict.py runs this ensemble as it is")
            if kind == "speech":
                from transformers import Wav2Vec2FeatureExtractor
                fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=encoder.sample_rate, padding_value=0.0,
                                              do_normalize=encoder.normalize, return_attention_mask=True)
            self.backbones[key] = BackboneDir(folder, kind, name, encoder.backbone,
                                              getattr(encoder, "tokenizer", None), fe, tuned_by)
        return self.backbones[key]

    def add(self, folder: Path, ens: LoadedEnsemble, meta: dict) -> None:
        entries = meta.get("members") or []
        global_ids: dict[int, int] = {}
        for group in ens.groups:
            bb = group.backbones
            tuned = _tuned_prefixes(group.tuned_weights) if group.tuned_weights else set()
            run = group.tuned_weights.parent.name if group.tuned_weights else None
            speech = (self.backbone("speech", group.speech, bb.speech, run if "speech" in tuned else None)
                      if bb.speech is not None else None)
            text = (self.backbone("text", group.text, bb.text, run if "text" in tuned else None)
                    if bb.text is not None else None)
            key = (speech.subfolder if speech else None, text.subfolder if text else None,
                   bb.text.max_tokens if bb.text else None, group.sample_rate if speech else None)
            if key not in self.group_keys:
                self.group_keys[key] = len(self.groups)
                self.groups.append({
                    "speech": key[0], "text": key[1],
                    "speech_source": group.speech, "text_source": group.text,
                    "speech_states": bb.speech.num_states if bb.speech else None,
                    "speech_width": bb.speech.width if bb.speech else None,
                    "text_states": bb.text.num_states if bb.text else None,
                    "text_width": bb.text.width if bb.text else None,
                    "normalize": bool(bb.speech.normalize) if bb.speech else None,
                    "accepts_padding_mask": bool(bb.speech.accepts_padding_mask) if bb.speech else True,
                    "sample_rate": group.sample_rate if bb.speech else None,
                    "max_text_tokens": bb.text.max_tokens if bb.text else None,
                    "members": []})
            g = self.group_keys[key]
            reference = self._reference(ens, group)
            for mi in group.members:
                m = ens.members[mi]
                gid = len(self.members)
                global_ids[mi] = gid
                self.members.append({"run_id": m.run_id, "name": m.name, "modalities": m.config.model.modalities,
                                     "group": g, "ensemble": len(self.ensembles), "seed": m.config.train.seed,
                                     "head": _head_spec(m.config.model)})
                self.members_meta.append({**(entries[mi] if mi < len(entries) else {}), "folder": str(folder)})
                self.groups[g]["members"].append(gid)
                self.heads[gid] = {k: v.detach().clone() for k, v in m.head.state_dict().items()}
                self.reference[gid] = reference[mi]
                if m.bf16:
                    self.notes.append(f"member {m.run_id} trained under bf16 autocast (train.bf16): predict.py scores "
                                      "it under bf16 autocast, the export runs float32; expect differences of "
                                      "about 1e-2 in its probabilities")
        fold = meta.get("fold")
        self.ensembles.append({"name": "ensemble" if fold is None else f"fold_{fold}", "fold": fold,
                               "method": ens.method,
                               "members": [global_ids[mi] for mi in range(len(ens.members))]})

    @staticmethod
    def _reference(ens: LoadedEnsemble, group) -> dict[int, np.ndarray]:
        """ser_hpc's own forward of this group on the check clip (with text)."""
        wave = _check_input(group.sample_rate) if group.speech is not None else np.zeros(1, np.float32)
        out = _forward(ens, group, [(0, wave, CHECK_TEXT)])
        return {mi: p[0] for mi, p in out.items()}


def build_export_model(ensemble_dir: str | Path, fold: int | None = None) -> ExportModel:
    """Load the ensemble (every fold, or ``fold``) and build the standalone model from it.

    Raises EnsembleError / BackboneError (bad folder, missing backbone) and ExportError."""
    top = Path(ensemble_dir).expanduser().resolve()
    folders = fold_ensemble_dirs(top, fold)
    builder = _Builder()
    labels: tuple[str, ...] | None = None
    for folder in folders:
        meta = json.loads((folder / "ensemble.json").read_text(encoding="utf-8"))
        ens = load_ensemble(folder, "cpu")
        labels = labels or ens.labels
        builder.add(folder, ens, meta)
        del ens  # the backbones kept for the export stay referenced by builder.backbones
    assert labels is not None
    rates = sorted({g["sample_rate"] for g in builder.groups if g["sample_rate"]})
    if len(rates) > 1:
        raise ExportError(f"{top / 'ensemble.json'}: the members' backbones expect different sample rates "
                          f"({', '.join(map(str, rates))} Hz, data.sample_rate); one exported model takes one rate")
    config = SerEnsembleConfig(
        groups=builder.groups, members=builder.members, ensembles=builder.ensembles,
        sampling_rate=rates[0] if rates else 16000, min_seconds=WholeClips.MIN_SECONDS,
        window_seconds=DEFAULT_WINDOW_S, hop_seconds=DEFAULT_WINDOW_S * DEFAULT_HOP_FRACTION,
        id2label={i: name for i, name in enumerate(labels)}, label2id={name: i for i, name in enumerate(labels)},
        auto_map=AUTO_MAP, custom_pipelines=CUSTOM_PIPELINES,
        architectures=["SerEnsembleForAudioClassification"])
    model = SerEnsembleForAudioClassification(config)
    for g, group in enumerate(model.groups):
        for j, gid in enumerate(config.groups[g]["members"]):
            try:
                group.heads[j].load_state_dict(builder.heads[gid], strict=True)
            except RuntimeError as exc:  # the standalone head no longer mirrors ser_hpc's EmotionHead
                raise ExportError(f"member {config.members[gid]['run_id']}: its head does not fit the exported "
                                  f"model code ({exc})") from None
    by_folder = {b.subfolder: b for b in builder.backbones.values()}
    for group in model.groups:
        if group.has_speech:
            group.speech_model = by_folder[group.spec["speech"]].module
        if group.has_text:
            group.text_model = by_folder[group.spec["text"]].module
            group.tokenizer = by_folder[group.spec["text"]].tokenizer
    model.eval()
    out = ExportModel(model, config, labels, list(builder.backbones.values()), folders, top, builder.members_meta,
                      notes=list(dict.fromkeys(builder.notes)))
    out.check_max_diff = check_against_reference(out, builder.reference)
    return out


def group_check_inputs(model: SerEnsembleForAudioClassification, g: int) -> dict[str, torch.Tensor]:
    """The check clip (and text) as one group's forward arguments."""
    group, spec = model.groups[g], model.config.groups[g]
    args = {}
    if group.has_speech:
        wave = torch.from_numpy(_check_input(spec["sample_rate"]))
        args.update(input_values=wave[None], wave_lengths=torch.tensor([wave.shape[0]]))
    if group.has_text:
        enc = group.tokenizer([CHECK_TEXT], padding=True, truncation=True, max_length=spec["max_text_tokens"],
                              return_tensors="pt")
        args.update(input_ids=enc["input_ids"], text_attention_mask=enc["attention_mask"])
    return args


@torch.inference_mode()
def check_against_reference(export: ExportModel, reference: dict[int, np.ndarray]) -> float:
    """Largest |standalone - ser_hpc| member probability on the check clip; ExportError past the tolerance."""
    worst = 0.0
    for g, group in enumerate(export.model.groups):
        probs = group(**group_check_inputs(export.model, g))[0].double().numpy()
        for j, gid in enumerate(export.config.groups[g]["members"]):
            diff = float(np.abs(probs[j] - reference[gid]).max())
            worst = max(worst, diff)
            if not diff <= CHECK_TOLERANCE:
                raise ExportError(f"member {export.config.members[gid]['run_id']}: the exported model gives "
                                  f"probabilities {diff:.2e} away from ser_hpc's on a check clip (tolerance "
                                  f"{CHECK_TOLERANCE:g}); its architecture is not supported by the export")
    return worst
