"""Slurm job arrays for a grid: compact ``--array`` specs, and arrays split at MaxArraySize.

Slurm refuses an array whose largest index is >= MaxArraySize (slurm.conf; default 1001).
A grid of more packs is submitted as several arrays: each one's task ``i`` trains pack
``offset + i``, its indices stay below MaxArraySize, and the aggregation job depends on
all of them.

- sbatch (``slurm/submit_grid.sh``): the array index is the pack index minus the array's
  offset, which the script passes to the task (``slurm/train_array.sbatch PLAN OFFSET``).
  On a relaunch the finished packs are left out of the index list (``0-3,7,9-12%8``).
- submitit (``map_array``): each task gets its pack index as an argument and submitit
  numbers the tasks 0..n-1 itself, so the packs to run are cut into chunks of at most
  MaxArraySize.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize


def compress(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (sorted, duplicates dropped)."""
    ordered = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def array_spec(indices: list[int], parallelism: int | None = None) -> str:
    """The value of ``sbatch --array``: ``0-319%2``; empty when there is nothing to run."""
    if not indices:
        return ""
    spec = compress(indices)
    return f"{spec}%{parallelism}" if parallelism else spec


@dataclass
class ArrayChunk:
    """One array job of a split: task ``i`` runs item ``offset + i``."""
    offset: int
    items: list[int]          # the packs (or feature groups) it runs, in order

    @property
    def indices(self) -> list[int]:
        """Its array task indices: each item minus the offset, all < MaxArraySize."""
        return [i - self.offset for i in self.items]

    def spec(self, parallelism: int | None = None) -> str:
        return array_spec(self.indices, parallelism)


def split_by_index(items: list[int], max_size: int) -> list[ArrayChunk]:
    """Arrays for the sbatch path, where the task index names the item: the fewest arrays
    whose indices (item - offset) are all < ``max_size``. Each array starts at its first
    item, so 2,500 packs with MaxArraySize 1001 are 3 arrays at offsets 0, 1001 and 2002."""
    if max_size < 1:
        raise ValueError(f"MaxArraySize must be >= 1, got {max_size}")
    chunks: list[ArrayChunk] = []
    for item in sorted(set(items)):
        if chunks and item - chunks[-1].offset < max_size:
            chunks[-1].items.append(item)
        else:
            chunks.append(ArrayChunk(item, [item]))
    return chunks


def split_by_count(items: list[int], max_size: int) -> list[ArrayChunk]:
    """Arrays for submitit, which passes each task its item: ceil(n / max_size) arrays of
    consecutive items (their offset is the position in ``items``, for the logs)."""
    if max_size < 1:
        raise ValueError(f"MaxArraySize must be >= 1, got {max_size}")
    return [ArrayChunk(start, list(items[start:start + max_size])) for start in range(0, len(items), max_size)]


def dependency(kind: str, job_ids: list[str]) -> str:
    """``afterany:12:13:14``: after every one of the jobs (Slurm's ``:`` list means all)."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        raise ValueError("a dependency needs at least one job id")
    return f"{kind}:" + ":".join(ids)
