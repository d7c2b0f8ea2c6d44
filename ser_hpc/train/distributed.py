"""Process-group set-up for the three launch modes, and the few collectives we need.

The same training loop runs as one process, under torchrun (RANK/WORLD_SIZE set), under
``srun --ntasks=N`` (SLURM_PROCID/SLURM_NTASKS set) and as a submitit task with several
tasks per node (which is srun underneath). nccl on GPU, gloo on CPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import slurm

log = logging.getLogger("ser_hpc.train")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def detect() -> DistEnv:
    """Ranks from torchrun's variables, else from srun's; one process otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    ntasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
    if ntasks > 1 and "SLURM_PROCID" in os.environ:
        env = DistEnv(int(os.environ["SLURM_PROCID"]), ntasks, int(os.environ.get("SLURM_LOCALID", 0)))
        os.environ.setdefault("MASTER_ADDR", slurm.first_host())
        # One port per job, so two jobs sharing a node do not collide.
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world), LOCAL_RANK=str(env.local_rank))
        return env
    return DistEnv()


def init(env: DistEnv, device: torch.device) -> None:
    if not env.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world, timeout=timedelta(minutes=30))
    log.info("rank %d/%d joined process group (%s) at %s:%s", env.rank, env.world, backend,
             os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))


def device_for(env: DistEnv, name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return device


def all_sum(value: float | torch.Tensor, env: DistEnv) -> float:
    if not env.enabled:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def any_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is True on one (e.g. a preemption signal reached one rank)."""
    return all_sum(1.0 if flag else 0.0, env) > 0


def all_gather(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
