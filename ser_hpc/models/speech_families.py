"""Speech encoder families: what each eats, how fast its frames come, which hidden states
it returns, how padding is masked and how long an input may be.

| family      | checkpoints (model_type)                   | input                  | frames            | input length  |
|-------------|--------------------------------------------|------------------------|-------------------|---------------|
| wav2vec2    | wav2vec2 / XLS-R, hubert, wavlm,           | 16 kHz waveform        | conv stack, ~50 Hz| any           |
|             | data2vec-audio                             |                        |                   |               |
| whisper     | whisper (encoder only)                     | log-mel, 30 s windows  | 50 Hz             | 30 s a window |
| emotion2vec | FunASR folder: model.pt + config.yaml      | 16 kHz waveform        | conv stack, ~50 Hz| any           |

The family is chosen from the checkpoint (its config's ``model_type``, or an emotion2vec
folder's files) before anything is submitted; another family is refused naming the
supported ones. Every encoder has the same interface (``SpeechEncoder`` in encoders.py is
the wav2vec2 family): ``forward(waves [B, T], lengths [B]) -> (states [L, B, F, D],
frame mask [B, F])``, ``frame_lengths``, ``frame_rule`` (how many frames a number of samples
gives, stored with cached features), ``width``, ``num_states``, ``sample_rate``, ``tuned``.

Whisper's encoder only takes 30 s of log-mel (3000 mel frames -> 1500 encoder frames):
every window is padded to 30 s, and of each window's 1500 frames only the
``ceil(samples / 320)`` that cover audio are kept, with a mask, so the padding is never
pooled. A longer clip is encoded in consecutive 30 s windows whose frames are joined. The
decoder is never loaded (the checkpoint's ``encoder.*`` tensors only). A 3 s clip costs a
30 s forward.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .encoders import (BackboneError, SpeechEncoder, _freeze, _load, _looks_like_path, backbone_config,
                       unfreeze_top_layers)

log = logging.getLogger("ser_hpc.models")

WAV2VEC2_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
FAMILIES = {"wav2vec2": WAV2VEC2_TYPES, "whisper": ("whisper",), "emotion2vec": ("FunASR emotion2vec folder",)}
WHISPER_HOP = 320  # samples per encoder frame at 16 kHz (mel hop 160, conv stride 2)


def supported() -> str:
    return "; ".join(f"{family} ({', '.join(types)})" for family, types in FAMILIES.items())


def frames_for(rule: dict, samples):
    """Frames a clip of ``samples`` gives under a frame rule (an int or a tensor of lengths)."""
    if "samples_per_frame" in rule:  # Whisper: the frames that cover any audio
        hop = rule["samples_per_frame"]
        return -(-samples // hop)
    n = samples
    for kernel, stride in zip(rule["conv_kernel"], rule["conv_stride"]):
        n = (n - kernel) // stride + 1
    return n


@dataclass
class SpeechSpec:
    """What a checkpoint is, read from its config alone (no weights loaded)."""
    name: str
    family: str
    model_type: str
    width: int
    num_states: int              # hidden states returned: the embedding / CNN output + one per layer
    sample_rate: int
    frame_rule: dict
    window_seconds: float | None = None   # Whisper: every input is padded to this
    notes: list[str] = field(default_factory=list)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / (self.frame_rule.get("samples_per_frame")
                                   or math.prod(self.frame_rule["conv_stride"]))


def _is_emotion2vec(name: str) -> bool:
    from .emotion2vec import is_emotion2vec_folder
    return _looks_like_path(name) and is_emotion2vec_folder(Path(name).expanduser())


def speech_spec(name: str) -> SpeechSpec:
    """The family and shapes of a speech checkpoint; ``BackboneError`` when it cannot be read
    or its family is not supported (naming the supported ones)."""
    if _is_emotion2vec(name):
        from .emotion2vec import read_emotion2vec_config
        cfg = read_emotion2vec_config(Path(name).expanduser() / "config.yaml")
        return SpeechSpec(name, "emotion2vec", "emotion2vec", cfg.embed_dim, cfg.depth + 1, 16000,
                          {"conv_kernel": [k for _, k, _ in cfg.conv_layers],
                           "conv_stride": [s for _, _, s in cfg.conv_layers]})
    config = backbone_config("speech", name)
    kind = getattr(config, "model_type", None)
    if kind == "whisper":
        rate = 16000
        return SpeechSpec(name, "whisper", kind, config.d_model, config.encoder_layers + 1, rate,
                          {"samples_per_frame": WHISPER_HOP}, window_seconds=30.0)
    if kind in WAV2VEC2_TYPES:
        rate = _sampling_rate(name)
        return SpeechSpec(name, "wav2vec2", kind, config.hidden_size, config.num_hidden_layers + 1, rate,
                          {"conv_kernel": list(config.conv_kernel), "conv_stride": list(config.conv_stride)})
    raise BackboneError(f"speech model {name!r} is a {kind!r} checkpoint, which ser_hpc cannot use as a speech "
                        f"encoder; supported families: {supported()}")


def _sampling_rate(name: str) -> int:
    from transformers import AutoFeatureExtractor
    try:
        fe = AutoFeatureExtractor.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name)
        return int(getattr(fe, "sampling_rate", 16000))
    except (OSError, ValueError):
        return 16000


def speech_encoder(name: str, finetune_top_layers: int = 0) -> nn.Module:
    """The frozen speech encoder of the checkpoint's family."""
    family = speech_spec(name).family
    if family == "whisper":
        return WhisperSpeech(name, finetune_top_layers)
    if family == "emotion2vec":
        return Emotion2VecSpeech(name, finetune_top_layers)
    return SpeechEncoder(name, finetune_top_layers)


class WhisperSpeech(nn.Module):
    """Whisper's encoder: log-mel of each 30 s window, the frames that cover audio kept."""

    def __init__(self, name: str, finetune_top_layers: int = 0):
        super().__init__()
        from transformers import WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder
        self.name = name
        spec = speech_spec(name)
        self.features = _load("speech", name, WhisperFeatureExtractor.from_pretrained)
        self.sample_rate = int(self.features.sampling_rate)
        self.window = int(self.features.n_samples)  # 30 s
        if self.sample_rate != 16000 or self.window % WHISPER_HOP:
            raise BackboneError(f"speech model {name!r}: a Whisper feature extractor at {self.sample_rate} Hz with "
                                f"{self.window}-sample windows is not the 16 kHz / 30 s one this encoder is built for")
        # The encoder's own tensors only: a full checkpoint's decoder is never loaded.
        encoder, info = _quiet(lambda: _load("speech", name, WhisperEncoder.from_pretrained,
                                             key_mapping={r"^(model\.)?encoder\.": ""}, output_loading_info=True))
        if info["missing_keys"]:
            raise BackboneError(f"speech model {name!r}: the checkpoint lacks encoder tensors "
                                f"{sorted(info['missing_keys'])[:4]} (is it a Whisper checkpoint?)")
        self.backbone = _freeze(encoder)
        self.width, self.num_states = spec.width, spec.num_states
        self.frame_rule = spec.frame_rule
        self.accepts_padding_mask = True  # each window is its own sequence: no padding crosses clips
        self.tuned = unfreeze_top_layers(self.backbone, finetune_top_layers, layers=self.backbone.layers,
                                         final_norm=self.backbone.layer_norm)

    def train(self, mode: bool = True):  # the backbone stays in eval mode (no dropout)
        super().train(mode)
        self.backbone.eval()
        return self

    def frame_lengths(self, wave_lengths: torch.Tensor) -> torch.Tensor:
        return frames_for(self.frame_rule, wave_lengths.long())

    def forward(self, waves: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states [L, B, F, D], frame mask [B, F]); F = the longest clip's frames."""
        windows = [(i, start, min(self.window, int(n) - start)) for i, n in enumerate(wave_lengths.tolist())
                   for start in range(0, max(int(n), 1), self.window)]
        audio = [waves[i, s:s + n].float().cpu().numpy() for i, s, n in windows]
        # The log-mel of each window (padded to 30 s), computed where the encoder runs.
        mel = self.features(audio, sampling_rate=self.sample_rate, return_tensors="pt",
                            device=waves.device.type).input_features
        dtype = next(self.backbone.parameters()).dtype
        with torch.set_grad_enabled(bool(self.tuned) and torch.is_grad_enabled()):
            hidden = self.backbone(mel.to(waves.device, dtype), output_hidden_states=True).hidden_states
        hidden = torch.stack(hidden)  # [L, windows, 1500, D]
        frames = self.frame_lengths(wave_lengths.to(waves.device))
        states = hidden.new_zeros(hidden.shape[0], waves.shape[0], int(frames.max()), hidden.shape[-1])
        for w, (i, start, n) in enumerate(windows):  # each window's frames that cover audio, in place
            first, count = start // WHISPER_HOP, -(-n // WHISPER_HOP)
            states[:, i, first:first + count] = hidden[:, w, :count]
        mask = torch.arange(states.shape[2], device=states.device)[None] < frames[:, None]
        return states, mask


def _quiet(load):
    """transformers prints a table of the decoder tensors it skips: not news here."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(level)


class Emotion2VecSpeech(nn.Module):
    """emotion2vec / emotion2vec+ (a FunASR folder), through the port in emotion2vec.py."""

    def __init__(self, name: str, finetune_top_layers: int = 0):
        super().__init__()
        from .emotion2vec import Emotion2VecEncoder, Emotion2VecError
        if finetune_top_layers:
            raise BackboneError(f"speech model {name!r}: fine-tuning emotion2vec layers is not supported; "
                                "set model.speech.finetune_top_layers=0")
        try:
            self.backbone = Emotion2VecEncoder(Path(name).expanduser())
        except Emotion2VecError as exc:
            raise BackboneError(f"speech model {name!r}: {exc}") from None
        self.name = name
        spec = speech_spec(name)
        self.width, self.num_states, self.sample_rate = spec.width, spec.num_states, spec.sample_rate
        self.frame_rule = spec.frame_rule
        self.accepts_padding_mask = self.backbone.accepts_padding_mask
        self.tuned: list[str] = []

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def frame_lengths(self, wave_lengths: torch.Tensor) -> torch.Tensor:
        return self.backbone.frame_lengths(wave_lengths)

    def forward(self, waves: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(waves.float(), wave_lengths)
