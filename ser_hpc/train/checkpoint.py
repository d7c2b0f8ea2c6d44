"""Resumable training checkpoints, written so that a kill at any moment is harmless.

Layout, inside the run folder::

    checkpoint/step_000120/  weights.safetensors  (trainable weights)
                             trainer.pt           (optimizer state, torch RNG; tensors and
                                                   plain containers only: loaded weights_only)
                             state.json           (step, data position, best so far, lr, ...)
                             best_head.safetensors, dev_probs.csv  (the best so far, restored
                                                   on resume so a replayed step cannot disagree)
    checkpoint/latest.json   {"step": 120, "dir": "step_000120"}  <- written LAST

A checkpoint is built in ``.tmp-step_N``, renamed to ``step_N`` (atomic), and only then does
``latest.json`` point at it; older step folders are removed after that. A kill while
writing leaves a stray temp folder and the previous checkpoint in force.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import atomic_io

log = logging.getLogger("ser_hpc.train")
# Test hook: SIGKILL this process half-way through writing the checkpoint of that step.
FAULT_ENV = "SER_HPC_FAULT_KILL_IN_CHECKPOINT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    KEEP = 2  # the newest two, in case the newest is on a node that died mid-fsync

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "checkpoint"

    def tmp_dir(self, step: int) -> Path:
        """Where this step's checkpoint is built; the same on every rank (ZeRO writes shards there)."""
        return self.root / f".tmp-step_{step:06d}"

    def begin(self, step: int) -> Path:
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def write_files(self, tmp: Path, step: int, weights: dict[str, torch.Tensor] | None,
                    trainer_state: dict[str, Any] | None, state: dict[str, Any], copies: list[Path]) -> None:
        if weights is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if os.environ.get(FAULT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        for src in copies:
            if src.exists():
                shutil.copy2(src, tmp / src.name)
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())

    def commit(self, tmp: Path, step: int) -> Path:
        """Publish a fully written checkpoint, then forget the older ones."""
        final = self.root / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_io.write_json(self.root / "latest.json", {"step": step, "dir": final.name})
        for old in sorted(self.root.glob("step_*"))[:-self.KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        """The checkpoint folder ``latest.json`` points at, if complete."""
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        target = self.root / json.loads(pointer.read_text(encoding="utf-8"))["dir"]
        if not (target / "state.json").exists():
            log.warning("checkpoint pointer names %s, which is incomplete: ignoring it", target)
            return None
        return target

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (a step folder exists only once fully written)."""
        return sorted(int(p.name[len("step_"):]) for p in self.root.glob("step_*") if (p / "state.json").exists())

    def at(self, step: int) -> Path:
        folder = self.root / f"step_{step:06d}"
        if not (folder / "state.json").exists():
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.root}")
        return folder

    def drop_after(self, step: int) -> None:
        """Rolling back to ``step``: newer checkpoints would be replayed anyway, and must not
        outlive the older ones that the next commit keeps."""
        newer = [s for s in self.steps() if s > step]
        if not newer:
            return
        atomic_io.write_json(self.root / "latest.json", {"step": step, "dir": f"step_{step:06d}"})
        for s in newer:
            shutil.rmtree(self.root / f"step_{s:06d}", ignore_errors=True)

    def cleanup_partial(self) -> None:
        for tmp in self.root.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def read_state(folder: Path) -> dict[str, Any]:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))

    @staticmethod
    def read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        state = CheckpointStore.read_state(folder)
        weights = load_file(str(folder / "weights.safetensors")) if (folder / "weights.safetensors").exists() else None
        trainer = (torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
                   if (folder / "trainer.pt").exists() else None)
        return state, weights, trainer

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
