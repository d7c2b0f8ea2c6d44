"""The trainable part of a run: layer mixing, fusion, pooling and the MLP.

``model.fusion``:
- ``early`` follows the authors' code: each modality is (projected to a common width when
  the encoders' widths differ,) layer-normalised, and audio frames and text tokens are
  joined along time into one sequence, optionally passed through one multi-head
  self-attention layer, then pooled once.
- ``late`` is the authors' "option 1": each modality is pooled on its own and the pooled
  vectors are concatenated. Hundreds of audio frames then cannot drown a few dozen tokens.

``model.pooling`` picks the pooling (``pooling.py``). The head sees only backbone outputs,
so K heads can share one backbone forward (or read cached features).

Layer choice (``model.<speech|text>.layers``): ``weighted`` learns softmax weights over the
transformer layers only, as the authors do (hidden_states[1:]); ``weighted_all`` also
weights hidden_states[0] (the CNN / embedding output); ``last`` takes the top layer;
``every_N`` and a list of indices (``[6, 12, 18, 24]``) learn weights over those layers, and
a feature store then holds only them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .dropout import RowDropout, attention
from .encoders import BackboneOutput
from .pooling import build_pooling


def layers_used(mode: str | list[int], num_states: int, key: str = "layers") -> list[int]:
    """Absolute hidden-state indices a layer choice reads (0 = CNN / embedding output):
    ``last``; ``weighted`` (the transformer layers 1..L); ``weighted_all`` (0..L);
    ``every_N`` (N, 2N, ... up to L); or a list of indices."""
    if isinstance(mode, list):
        bad = [i for i in mode if not 0 <= i < num_states]
        if bad:
            raise ConfigError(f"{key} {mode} names hidden states {bad}, but the encoder has {num_states} "
                              f"(0 = embedding output, 1..{num_states - 1} = its layers)")
        return sorted(set(mode))
    if mode.startswith("every_"):
        step = int(mode[len("every_"):])
        return list(range(step, num_states, step)) or [num_states - 1]
    if mode == "last":
        return [num_states - 1]
    if mode == "weighted_all" or num_states == 1:
        return list(range(num_states))
    return list(range(1, num_states))


class LayerMix(nn.Module):
    """Softmax-normalised learned weights over hidden states (the public code left them raw)."""

    def __init__(self, num_states: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: torch.Tensor, positions: list[int] | None = None) -> torch.Tensor:
        """Mix ``states`` [L, B, T, D]; ``positions``: where this mix's states lie among the L
        (None: all L, in order). Unused states get weight 0 instead of being gathered out:
        the gather copied the whole stack for every head on every step."""
        w = torch.softmax(self.logits, dim=0)
        if positions is not None and positions != list(range(states.shape[0])):
            w = torch.zeros(states.shape[0], dtype=w.dtype, device=w.device).index_put((torch.tensor(positions),), w)
        return torch.einsum("l,lbtd->btd", w.to(states.dtype), states)


class ModalityInput(nn.Module):
    """One modality's states -> [B, T, E]: layer choice/mix, projection if needed, LayerNorm."""

    def __init__(self, num_states: int, width: int, common: int, layers: str | list[int], key: str = "layers"):
        super().__init__()
        self.used = layers_used(layers, num_states, key)
        self.mix = LayerMix(len(self.used)) if layers != "last" else None
        self.proj = nn.Linear(width, common) if width != common else nn.Identity()
        self.norm = nn.LayerNorm(common)

    def forward(self, states: torch.Tensor, held: tuple[int, ...] | None = None) -> torch.Tensor:
        """``states`` [L, B, T, D] hold the hidden states ``held`` (None: all, in order)."""
        positions = [held.index(i) for i in self.used] if held is not None else self.used
        h = self.mix(states, positions) if self.mix is not None else states[positions[-1]]
        return self.norm(self.proj(h))


def mlp(width_in: int, width: int, hidden_layers: int, dropout: float, num_classes: int) -> nn.Sequential:
    """Linear(E->W)+LN+GELU+Dropout, N x [Linear(W->W)+LN+GELU+Dropout], Linear(W->classes)."""
    blocks: list[nn.Module] = []
    for i in range(hidden_layers + 1):
        blocks += [nn.Linear(width_in if i == 0 else width, width), nn.LayerNorm(width), nn.GELU(), RowDropout(dropout)]
    blocks.append(nn.Linear(width, num_classes))
    return nn.Sequential(*blocks)


class EmotionHead(nn.Module):
    def __init__(self, cfg: ModelConfig, speech_shape: tuple[int, int] | None, text_shape: tuple[int, int] | None,
                 num_classes: int):
        """``*_shape`` = (number of hidden states, width) of each encoder, or None if unused."""
        super().__init__()
        used = [s for s in (speech_shape, text_shape) if s is not None]
        if not used:
            raise ValueError("the head needs at least one modality")
        self.fusion = cfg.fusion
        common = cfg.fusion_dim or max(width for _, width in used)
        self.speech = (ModalityInput(*speech_shape, common, cfg.speech.layers, "model.speech.layers")
                       if speech_shape else None)
        self.text = ModalityInput(*text_shape, common, cfg.text.layers, "model.text.layers") if text_shape else None
        n_seq = 1 if cfg.fusion == "early" else len(used)  # sequences that are attended and pooled
        self.attention = (nn.ModuleList(nn.MultiheadAttention(common, cfg.fusion_attention_heads, dropout=cfg.dropout,
                                                              batch_first=True) for _ in range(n_seq))
                          if cfg.fusion_attention_heads else None)
        self.pools = nn.ModuleList(build_pooling(cfg.pooling, common) for _ in range(n_seq))
        # The authors' classifier drops its input too (a module of its own: the MLP's keys stay put).
        self.input_dropout = RowDropout(cfg.dropout)
        self.classifier = mlp(sum(p.out_width for p in self.pools), cfg.head_width, cfg.hidden_layers, cfg.dropout,
                              num_classes)

    def sequences(self, feats: BackboneOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each modality's [B, T, E] sequence and mask, in the order speech, text."""
        out = []
        if self.speech is not None:
            out.append((self.speech(feats.speech, feats.speech_layers), feats.speech_mask))
        if self.text is not None:
            out.append((self.text(feats.text, feats.text_layers), feats.text_mask))
        return out

    def fuse(self, feats: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the joint sequence [B, T_audio + T_text, E] and its mask (early fusion)."""
        parts = self.sequences(feats)
        return torch.cat([h for h, _ in parts], dim=1), torch.cat([m for _, m in parts], dim=1)

    def forward(self, feats: BackboneOutput) -> torch.Tensor:
        seqs = [self.fuse(feats)] if self.fusion == "early" else self.sequences(feats)
        pooled = []
        for k, (h, mask) in enumerate(seqs):
            if self.attention is not None:
                h = h + attention(self.attention[k], h, mask)
            pooled.append(self.pools[k](h, mask))
        return self.classifier(self.input_dropout(torch.cat(pooled, dim=-1)))


def build_head(cfg: ModelConfig, backbones, num_classes: int) -> EmotionHead:
    """``backbones``: anything with ``speech`` / ``text`` members exposing num_states and width;
    ``num_classes``: the length of the run's class list (data.labels)."""
    # A head reads only its own modalities (a text-only head in a pack on a store of both).
    modalities = cfg.modalities.split("+")
    speech = ((backbones.speech.num_states, backbones.speech.width)
              if backbones.speech is not None and "audio" in modalities else None)
    text = ((backbones.text.num_states, backbones.text.width)
            if backbones.text is not None and "text" in modalities else None)
    return EmotionHead(cfg, speech, text, num_classes)
