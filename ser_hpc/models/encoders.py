"""Frozen pretrained encoders, loaded from a hub id or a local folder.

They return ALL hidden states; the layer mixing weights live in the trainable head, so
several heads can share one backbone forward and each learn its own mix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoTokenizer



class BackboneError(ValueError):
    """A backbone cannot be loaded; the message names it."""


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _hub_id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Hugging Face hub id ('name' or 'namespace/name'), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        return str(exc)
    return None


def missing_model(kind: str, name: str) -> BackboneError | None:
    """The error for a name that is neither an existing folder nor a possible hub id, else None.

    e.g. models/xlsr/checkpoint-5 that does not exist: transformers would only say
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    """
    folder = Path(name).expanduser()
    if folder.exists() or not (_looks_like_path(name) or _hub_id_problem(name)):
        return None
    return BackboneError(
        f"{kind} model path does not exist: {name} ({kind} model {name!r}: the folder {folder.absolute()} does not exist"
        + ("" if _looks_like_path(name) else
           ", and it is not a Hugging Face hub id either (those are 'name' or 'namespace/name')")
        + f"). Check the path (relative paths start from the current directory, {Path.cwd()}).")


def _load(kind: str, name: str, loader, **kwargs):
    if not name:
        raise BackboneError(f"no {kind} model name given")
    folder = Path(name).expanduser()
    error = missing_model(kind, name)
    if error is not None:
        raise error
    try:
        return loader(str(folder) if _looks_like_path(name) else name, **kwargs)
    except (OSError, ValueError) as exc:
        also = f" (there is no folder {folder.absolute()} either)" if "/" in name and not folder.exists() else ""
        raise BackboneError(
            f"cannot load {kind} model {name!r}{also}: {exc}\n"
            "Compute nodes are usually offline: prefetch hub models on the login node "
            "(jobs/prefetch_models.py) or give a local folder.") from None


def backbone_config(kind: str, name: str):
    """A checkpoint's config, or a ``BackboneError`` that names the model and what is wrong."""
    return _load(kind, name, AutoConfig.from_pretrained)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze_top_layers(model: nn.Module, n: int, layers: nn.ModuleList | None = None,
                        final_norm: nn.Module | None = None) -> list[str]:
    """Make the top ``n`` transformer layers trainable (and a final encoder LayerNorm after
    them, as in pre-LN XLS-R, or ``final_norm``); returns the names of the unfrozen parameters.
    ``layers``: the model's layer list when it is not ``model.encoder.layers`` (Whisper's encoder)."""
    if n <= 0:
        return []
    encoder = getattr(model, "encoder", None)
    layers = layers if layers is not None else getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    if layers is None:
        raise BackboneError(f"cannot find the transformer layers of {type(model).__name__} to fine-tune")
    if n > len(layers):
        raise BackboneError(f"finetune_top_layers={n} but {type(model).__name__} has {len(layers)} layers")
    modules = list(layers[-n:])
    if final_norm is not None:
        modules.append(final_norm)
    elif getattr(encoder, "layer_norm", None) is not None and getattr(model.config, "do_stable_layer_norm", False):
        modules.append(encoder.layer_norm)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


class SpeechEncoder(nn.Module):
    """The wav2vec2 family (wav2vec 2.0 / XLS-R, WavLM, HuBERT, data2vec-audio): waveform ->
    every layer's frame features. Other families: speech_families.py."""

    def __init__(self, name: str, finetune_top_layers: int = 0):
        super().__init__()
        self.name = name
        config = _load("speech", name, AutoConfig.from_pretrained)
        if getattr(config, "mask_time_prob", 0):
            config.mask_time_prob = 0.0  # SpecAugment masking is for pretraining only
        self.backbone = _freeze(_load("speech", name, AutoModel.from_pretrained, config=config))
        try:
            fe = AutoFeatureExtractor.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name)
            self.sample_rate = int(getattr(fe, "sampling_rate", 16000))
            self.normalize = bool(getattr(fe, "do_normalize", True))
        except (OSError, ValueError):
            self.sample_rate, self.normalize = 16000, True
        # Group-norm feature extractors (wav2vec2-base, HuBERT/WavLM base) mix statistics over
        # the whole padded input, so padding would change their output: run those clip by clip.
        self.accepts_padding_mask = getattr(config, "feat_extract_norm", "layer") == "layer"
        self.width = config.hidden_size
        self.num_states = config.num_hidden_layers + 1
        self.frame_rule = {"conv_kernel": list(config.conv_kernel), "conv_stride": list(config.conv_stride)}
        self.tuned = unfreeze_top_layers(self.backbone, finetune_top_layers)

    def train(self, mode: bool = True):  # the backbone stays in eval mode (no dropout)
        super().train(mode)
        self.backbone.eval()
        return self

    def frame_lengths(self, wave_lengths: torch.Tensor) -> torch.Tensor:
        return self.backbone._get_feat_extract_output_lengths(wave_lengths).long()

    def _normalise(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Zero mean, unit variance over each clip's valid samples (the feature extractor's do_normalize)."""
        if not self.normalize:
            return waves
        mask = (torch.arange(waves.shape[1], device=waves.device)[None] < lengths[:, None]).to(waves.dtype)
        n = lengths.to(waves.dtype)[:, None]
        mean = (waves * mask).sum(1, keepdim=True) / n
        var = (((waves - mean) * mask) ** 2).sum(1, keepdim=True) / n
        return (waves - mean) / torch.sqrt(var + 1e-7) * mask

    def forward(self, waves: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states [L, B, F, D], frame mask [B, F] bool)."""
        with torch.set_grad_enabled(bool(self.tuned) and torch.is_grad_enabled()):
            return self._forward(waves, wave_lengths)

    def _forward(self, waves: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waves = self._normalise(waves, wave_lengths)
        frames = self.frame_lengths(wave_lengths)
        if self.accepts_padding_mask:
            mask = torch.arange(waves.shape[1], device=waves.device)[None] < wave_lengths[:, None]
            out = self.backbone(waves, attention_mask=mask.long(), output_hidden_states=True)
            states = torch.stack(out.hidden_states)
        else:
            per_clip = [torch.stack(self.backbone(waves[i:i + 1, : wave_lengths[i]], output_hidden_states=True).hidden_states)
                        for i in range(waves.shape[0])]
            states = waves.new_zeros(len(per_clip[0]), waves.shape[0], int(frames.max()), per_clip[0].shape[-1],
                                     dtype=per_clip[0].dtype)
            for i, s in enumerate(per_clip):
                states[:, i, : s.shape[2]] = s[:, 0]
        f = states.shape[2]
        frame_mask = torch.arange(f, device=states.device)[None] < frames[:, None].to(states.device)
        return states, frame_mask


class TextEncoder(nn.Module):
    """RoBERTa, BERT, BETO, XLM-R: transcription -> every layer's token features."""

    def __init__(self, name: str, max_tokens: int = 128, finetune_top_layers: int = 0):
        super().__init__()
        self.name = name
        self.tokenizer = _load("text", name, AutoTokenizer.from_pretrained)
        self.backbone = _freeze(_load("text", name, AutoModel.from_pretrained))
        config = self.backbone.config
        self.max_tokens = min(max_tokens, getattr(config, "max_position_embeddings", max_tokens) - 2)
        self.width = config.hidden_size
        self.num_states = config.num_hidden_layers + 1
        self.tuned = unfreeze_top_layers(self.backbone, finetune_top_layers)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states [L, B, S, D], token mask [B, S] bool)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(device)
        with torch.set_grad_enabled(bool(self.tuned) and torch.is_grad_enabled()):
            out = self.backbone(**enc, output_hidden_states=True)
        return torch.stack(out.hidden_states), enc["attention_mask"].bool()


@dataclass
class BackboneOutput:
    speech: torch.Tensor | None = None       # [L, B, F, D]
    speech_mask: torch.Tensor | None = None  # [B, F]
    text: torch.Tensor | None = None         # [L, B, S, D]
    text_mask: torch.Tensor | None = None    # [B, S]
    # Which hidden states ``speech`` / ``text`` hold (None: all of them, in order); cached
    # features may hold only the layers the heads read.
    speech_layers: tuple[int, ...] | None = None
    text_layers: tuple[int, ...] | None = None
