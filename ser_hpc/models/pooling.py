"""Pooling a padded sequence [B, T, E] into one vector per clip (``model.pooling``).

- ``attention`` (the poster): w_t = softmax_t(u^T h_t / sqrt(E)), c = sum_t w_t h_t.
  Unlike the public code, padded positions get no weight and the score is scaled by 1/sqrt(E).
- ``mean``: the masked mean, the baseline the poster argues against.
- ``attentive_stats``: attention-weighted mean and standard deviation, concatenated (2E),
  as in x-vector style attentive statistics pooling.

Every variant honours the padding mask: padded values never change the output.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class AttentionPooling(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.u = nn.Parameter(torch.randn(width) * 0.02)
        self.scale = 1.0 / math.sqrt(width)
        self.out_width = width

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h [B, T, E], mask [B, T] (True = real) -> w [B, T], zero on padding."""
        scores = (h @ self.u.to(h.dtype)) * self.scale
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(h, mask).to(h.dtype)
        return torch.einsum("bt,bte->be", w, h)


class MeanPooling(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.out_width = width

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(h.dtype)
        # where() and not a product: garbage (even inf) in the padding must not leak in.
        total = torch.where(mask[..., None], h, torch.zeros((), dtype=h.dtype)).sum(1)
        return total / m.sum(1, keepdim=True).clamp_min(1)


class AttentiveStatsPooling(AttentionPooling):
    def __init__(self, width: int):
        super().__init__(width)
        self.out_width = 2 * width

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(h, mask).to(h.dtype)
        h = torch.where(mask[..., None], h, torch.zeros((), dtype=h.dtype))
        mean = torch.einsum("bt,bte->be", w, h)
        var = torch.einsum("bt,bte->be", w, h * h) - mean * mean
        return torch.cat([mean, torch.sqrt(var.clamp_min(1e-6))], dim=-1)


POOLINGS = {"attention": AttentionPooling, "mean": MeanPooling, "attentive_stats": AttentiveStatsPooling}


def build_pooling(kind: str, width: int) -> nn.Module:
    return POOLINGS[kind](width)
