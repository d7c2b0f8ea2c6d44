"""Attention pooling (the poster): w_t = softmax_t(u^T h_t / sqrt(E)), c = sum_t w_t h_t.

Unlike the public code, padded positions get no weight and the score is scaled by 1/sqrt(E).
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

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h [B, T, E], mask [B, T] (True = real) -> w [B, T], zero on padding."""
        scores = (h @ self.u.to(h.dtype)) * self.scale
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(h, mask).to(h.dtype)
        return torch.einsum("bt,bte->be", w, h)
