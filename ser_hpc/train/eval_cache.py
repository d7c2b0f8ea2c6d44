"""Backbone outputs of the evaluation clips, computed once and reused.

Dev and test clips are neither cropped nor augmented, so with frozen backbones their
backbone outputs never change: a pack computes them once per task (in length-sorted
batches, little padding) and every dev evaluation of every head reads them back. The
padding masks are stored with them, so a prediction does not depend on the batching.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator

import torch

from ..data.dataset import Batch
from ..models.encoders import BackboneOutput

log = logging.getLogger("ser_hpc.train")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CachedBatch:
    ids: list[str]
    labels: torch.Tensor
    feats: BackboneOutput  # on the cache's storage device and dtype


def _map(feats: BackboneOutput, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> BackboneOutput:
    """Apply ``fn`` to every tensor of ``feats`` (the layer lists pass through)."""
    return BackboneOutput(**{f.name: fn(f.name, v) if isinstance(v := getattr(feats, f.name), torch.Tensor) else v
                             for f in fields(BackboneOutput)})


def nbytes(feats: BackboneOutput) -> int:
    return sum(t.numel() * t.element_size() for f in fields(BackboneOutput)
               if isinstance(t := getattr(feats, f.name), torch.Tensor))


class EvalFeatureCache:
    """Backbone outputs of a fixed list of batches, kept in host memory by default.

    ``dtype`` (train.eval_cache_dtype) trades exactness for memory: float32 reproduces a
    fresh forward exactly; float16 / bfloat16 halve the footprint of large backbones.
    """

    def __init__(self, compute: Callable[[Batch], BackboneOutput], batches: Iterable[Batch],
                 device: torch.device, dtype: str = "float32", storage: str = "cpu", label: str = "dev"):
        self.device = device
        self.batches: list[CachedBatch] = []
        store_dtype = DTYPES[dtype]
        start, clips, size = time.monotonic(), 0, 0
        with torch.no_grad():
            for batch in batches:
                feats = compute(batch)
                # Read back in the dtype the backbone produced; masks stay bool.
                self.compute_dtypes = {f.name: t.dtype for f in fields(BackboneOutput)
                                       if isinstance(t := getattr(feats, f.name), torch.Tensor)}
                stored = _map(feats, lambda _, t: t.to(storage, store_dtype if t.is_floating_point() else t.dtype))
                self.batches.append(CachedBatch(batch.ids, batch.labels, stored))
                clips += len(batch.ids)
                size += nbytes(stored)
        self.clips, self.nbytes = clips, size
        log.info("%s backbone outputs cached: %d clips in %d batches, %.1f MB (%s, %s), computed in %.1fs",
                 label, clips, len(self.batches), size / 1e6, dtype, storage, time.monotonic() - start)

    def __iter__(self) -> Iterator[CachedBatch]:
        for b in self.batches:
            yield CachedBatch(b.ids, b.labels, _map(b.feats, lambda name, t: t.to(self.device, self.compute_dtypes[name])))

    def __len__(self) -> int:
        return len(self.batches)
