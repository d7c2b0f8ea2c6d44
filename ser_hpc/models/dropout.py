"""Dropout that does not depend on how a global batch is split over ranks.

Under DDP each rank holds a slice of every global batch. Plain dropout would draw each
rank's masks for its own slice from its own RNG stream (the same seed on every rank), so
a clip's mask would depend on which rank holds it, and N ranks would not train as one
process does. Here every rank draws the masks of the WHOLE global batch from the head's
stream (identical on every rank) and keeps the rows of the clips it holds: each clip gets
the mask it gets in one process. The training loop says where this rank's rows lie
(``global_batch_rows``); outside it (evaluation, inference) this is ordinary dropout.

In one process the draw is the one ``nn.Dropout`` makes on CPU (same shape, same
bernoulli call), so single-process results are unchanged.

Attention dropout (``model.fusion_attention_heads``) masks [heads, T, T] weights, and T is
the padded length of each rank's slice; so each clip's mask is drawn from a generator of
its own, seeded from one number per global-batch row, over its valid positions only.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch import nn
from torch.nn import functional as F

# (first row of this rank's slice, rows in the global batch) while a head trains on a batch.
_ROWS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("global_batch_rows", default=None)


@contextlib.contextmanager
def global_batch_rows(offset: int, total: int):
    """Within this block, dropout masks are drawn for ``total`` rows and rows
    ``offset .. offset + batch`` are applied (this rank's slice of the global batch)."""
    token = _ROWS.set((offset, total))
    try:
        yield
    finally:
        _ROWS.reset(token)


def _rows(batch: int) -> tuple[int, int] | None:
    rows = _ROWS.get()
    if rows is None:
        return None
    offset, total = rows
    if offset + batch > total:
        raise ValueError(f"a batch of {batch} rows at offset {offset} does not fit a global batch of {total}")
    return rows


class RowDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn for the whole global batch (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x.shape[0]) if self.training and self.p > 0 else None
        if rows is None:
            return super().forward(x)
        offset, total = rows
        keep = 1 - self.p
        noise = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)
        return x * noise[offset:offset + x.shape[0]]


def attention(mha: nn.MultiheadAttention, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Self-attention of ``h`` [B, T, E] over its valid positions (``mask`` [B, T] True where
    valid) with ``mha``'s weights. Training with attention dropout inside the loop: dropout
    masks per clip (see the module doc); anything else: ``mha`` itself."""
    rows = _rows(h.shape[0]) if mha.training and mha.dropout > 0 else None
    if rows is None:
        return mha(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
    b, t, e = h.shape
    heads = mha.num_heads
    q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (x.reshape(b, t, heads, e // heads).transpose(1, 2) for x in (q, k, v))  # [B, H, T, d]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(e // heads)
    weights = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    weights = weights * _clip_masks(mask, heads, mha.dropout, rows, weights.dtype)
    out = (weights @ v).transpose(1, 2).reshape(b, t, e)
    return mha.out_proj(out)


def _clip_masks(mask: torch.Tensor, heads: int, p: float, rows: tuple[int, int], dtype) -> torch.Tensor:
    """[B, H, T, T] keep-masks scaled by 1/(1-p): each clip's from its own generator, over its
    valid query x key positions (padding gets 0: padded keys weigh 0 anyway, padded queries
    are never pooled), so a clip's mask is the same whatever its rank pads it to."""
    offset, total = rows
    seeds = torch.randint(0, 2 ** 62, (total,))  # one per global row, from the head's stream
    b, t = mask.shape
    out = torch.zeros(b, heads, t, t, dtype=dtype, device=mask.device)
    for i in range(b):
        valid = mask[i].nonzero().squeeze(1)
        gen = torch.Generator(device=mask.device).manual_seed(int(seeds[offset + i]))
        keep = torch.empty(heads, len(valid), len(valid), dtype=dtype, device=mask.device)
        keep.bernoulli_(1 - p, generator=gen)
        out[i][:, valid[:, None], valid[None, :]] = keep / (1 - p)
    return out
