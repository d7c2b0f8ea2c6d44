"""The order of training examples: seeded, resumable, and the same for 1 or N ranks."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from ..config import ConfigError
from . import distributed as D


class GlobalBatchSampler(Sampler):
    """This rank's share of each global batch of a seeded per-epoch permutation.

    Global batch k is perm[k*B:(k+1)*B]; rank r takes its r-th slice of it, so the same
    seed and global batch give the same examples per step with 1 or N ranks. A resumed
    run starts at ``start_batch`` instead of replaying (and decoding) what it has seen.
    """

    def __init__(self, n: int, global_batch: int, seed: int, env: D.DistEnv):
        if n < global_batch:
            raise ConfigError(f"train.batch_size {global_batch} is larger than the {n} training clips")
        if global_batch % env.world:
            raise ConfigError(f"train.batch_size {global_batch} is not divisible by the {env.world} ranks")
        self.n, self.batch, self.seed, self.env = n, global_batch, seed, env
        self.per_rank = global_batch // env.world
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch  # the last partial global batch is dropped

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        lo = self.env.rank * self.per_rank
        for k in range(self.start_batch, self.batches_per_epoch):
            yield from perm[k * self.batch + lo: k * self.batch + lo + self.per_rank].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank
