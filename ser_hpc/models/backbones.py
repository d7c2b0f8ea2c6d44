"""The backbones a run needs, built from their names: the speech encoder of the checkpoint's
family (speech_families.py) and the text encoder (encoders.py)."""
from __future__ import annotations

import torch
from torch import nn

from .encoders import BackboneOutput, TextEncoder
from .speech_families import speech_encoder


class FrozenBackbones(nn.Module):
    """The speech and/or text encoders a run needs; never trained, never checkpointed."""

    def __init__(self, speech_name: str | None, text_name: str | None, max_text_tokens: int = 128,
                 speech_finetune: int = 0, text_finetune: int = 0):
        super().__init__()
        self.speech = speech_encoder(speech_name, speech_finetune) if speech_name else None
        self.text = TextEncoder(text_name, max_text_tokens, text_finetune) if text_name else None

    @property
    def tuned(self) -> bool:
        """True when some backbone layers train (then no two heads can share a forward)."""
        return any(enc is not None and enc.tuned for enc in (self.speech, self.text))

    def forward(self, waves: torch.Tensor | None, wave_lengths: torch.Tensor | None,
                texts: list[str] | None, device: torch.device) -> BackboneOutput:
        out = BackboneOutput()
        if self.speech is not None:
            out.speech, out.speech_mask = self.speech(waves.to(device), wave_lengths.to(device))
        if self.text is not None:
            out.text, out.text_mask = self.text(texts, device)
        return out
