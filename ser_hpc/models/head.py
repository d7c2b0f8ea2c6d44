"""The trainable part of a run: layer mixing, fusion, attention pooling and the MLP.

Fusion follows the authors' code: each modality is (projected to a common width when the
encoders' widths differ,) layer-normalised, and audio frames and text tokens are joined
along time into one sequence, optionally passed through one multi-head self-attention
layer, then pooled once. The head sees only backbone outputs, so K heads can share one
backbone forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..data.labels import NUM_CLASSES
from .encoders import BackboneOutput
from .pooling import AttentionPooling


class LayerMix(nn.Module):
    """Softmax-normalised learned weights over hidden states (the public code left them raw)."""

    def __init__(self, num_states: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.logits, dim=0).to(states.dtype)
        return torch.einsum("l,lbtd->btd", w, states)


class ModalityInput(nn.Module):
    """One modality's states -> [B, T, E]: layer choice/mix, projection if needed, LayerNorm."""

    def __init__(self, num_states: int, width: int, common: int, layers: str):
        super().__init__()
        self.mix = LayerMix(num_states) if layers == "weighted" else None
        self.proj = nn.Linear(width, common) if width != common else nn.Identity()
        self.norm = nn.LayerNorm(common)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        h = self.mix(states) if self.mix is not None else states[-1]
        return self.norm(self.proj(h))


def mlp(width_in: int, width: int, hidden_layers: int, dropout: float) -> nn.Sequential:
    """Linear(E->W)+LN+GELU+Dropout, N x [Linear(W->W)+LN+GELU+Dropout], Linear(W->6)."""
    blocks: list[nn.Module] = []
    for i in range(hidden_layers + 1):
        blocks += [nn.Linear(width_in if i == 0 else width, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
    blocks.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*blocks)


class EmotionHead(nn.Module):
    def __init__(self, cfg: ModelConfig, speech_shape: tuple[int, int] | None, text_shape: tuple[int, int] | None):
        """``*_shape`` = (number of hidden states, width) of each encoder, or None if unused."""
        super().__init__()
        used = [s for s in (speech_shape, text_shape) if s is not None]
        if not used:
            raise ValueError("the head needs at least one modality")
        common = cfg.fusion_dim or max(width for _, width in used)
        self.speech = ModalityInput(*speech_shape, common, cfg.speech.layers) if speech_shape else None
        self.text = ModalityInput(*text_shape, common, cfg.text.layers) if text_shape else None
        self.attention = (nn.MultiheadAttention(common, cfg.fusion_attention_heads, dropout=cfg.dropout, batch_first=True)
                          if cfg.fusion_attention_heads else None)
        self.pool = AttentionPooling(common)
        self.classifier = mlp(common, cfg.head_width, cfg.hidden_layers, cfg.dropout)

    def fuse(self, feats: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the joint sequence [B, T_audio + T_text, E] and its mask."""
        parts, masks = [], []
        if self.speech is not None:
            parts.append(self.speech(feats.speech))
            masks.append(feats.speech_mask)
        if self.text is not None:
            parts.append(self.text(feats.text))
            masks.append(feats.text_mask)
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        h, mask = self.fuse(feats)
        if self.attention is not None:
            attended, _ = self.attention(h, h, h, key_padding_mask=~mask, need_weights=False)
            h = h + attended
        return self.classifier(self.pool(h, mask))


def build_head(cfg: ModelConfig, backbones) -> EmotionHead:
    speech = (backbones.speech.num_states, backbones.speech.width) if backbones.speech is not None else None
    text = (backbones.text.num_states, backbones.text.width) if backbones.text is not None else None
    return EmotionHead(cfg, speech, text)
