"""One run's folder in the results tree, and every file in it.

All writes are atomic (``ser_hpc.atomic_io``): a reader on another node or a rerun after a
crash never sees a torn file. A finished run (``final.json`` with status done) is never
redone; a folder holding a run of a different config that got as far as a checkpoint is
never overwritten. A run that failed before its first checkpoint (bad data, a backbone
that does not load, a crash in the first steps) is only a failed attempt: a corrected
config may take the folder, and the attempt's files are moved to ``attempts/<stamp>/``.

``metrics.jsonl`` is the record of every evaluation. Each record is also written to
TensorBoard event files in ``tb/`` (train loss, lr, dev macro-F1, and any other dev_*
score), so ``tensorboard --logdir results/<grid>`` compares a whole grid. The event writer
is opened at the first record and flushed after each; a TensorBoard failure is logged
once and never fails training (``SER_HPC_TENSORBOARD=0`` turns it off).
"""
from __future__ import annotations

import atexit
import csv
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .. import atomic_io
from ..config import Config, ConfigError
from ..run_status import RunStatus

if TYPE_CHECKING:  # torch only where weights are read or written: the status command reads folders too
    import numpy as np
    import torch

log = logging.getLogger("ser_hpc.train")

# The files (and folders) a run writes; a failed attempt's are moved aside together.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "final.json", "best_head.safetensors", "best_backbone.safetensors",
               "dev_probs.csv", "test_probs.csv", "checkpoint", "tb")
# metrics.jsonl key -> TensorBoard tag; any other numeric dev_* key becomes dev/<rest>.
TB_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "dev_macro_f1": "dev/macro_f1", "dev_loss": "dev/loss",
           "dev_ua": "dev/UA", "dev_wa": "dev/WA"}
_WRITERS: dict[str, object] = {}   # run folder -> its open SummaryWriter (None: TensorBoard failed there)
_PURGE: dict[str, int] = {}        # run folder -> step from which a resumed run rewrites its events


def _tb_key(path: Path) -> str:
    return str(path.absolute())


def close_tracking(paths=None) -> None:
    """Flush and close the TensorBoard writers of these run folders (all when None)."""
    keys = list(_WRITERS) if paths is None else [_tb_key(Path(p)) for p in paths]
    for key in keys:
        writer = _WRITERS.pop(key, None)
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - tracking never fails a run
                log.warning("TensorBoard: closing the writer of %s failed: %s", key, exc)


atexit.register(close_tracking)


def same_run(old: dict, new: dict) -> bool:
    """Two configs describe the same run. ``data.labels`` null means "the corpus's classes":
    config.yaml records the resolved list, so null on either side matches any list there
    (the classes themselves are checked against the data when the run starts)."""
    if old == new:
        return True
    if not (isinstance(old, dict) and isinstance(new, dict)
            and isinstance(old.get("data"), dict) and isinstance(new.get("data"), dict)):
        return False
    a, b = old["data"].get("labels"), new["data"].get("labels")
    if a is not None and b is not None:
        return False
    strip = lambda tree: {**tree, "data": {k: v for k, v in tree["data"].items() if k != "labels"}}  # noqa: E731
    return strip(old) == strip(new)


def failure_record(run_id: str, name: str, reason: str, *, elapsed_s: float | None = None,
                   checkpoint_step: int | None = None, traceback: str | None = None) -> dict:
    """The one schema of a failed run's final.json, whoever writes it: the trainer (bad input,
    a crash, a diverged head) or a grid task (preempted more often than allowed)."""
    return {"run_id": run_id, "name": name, "status": RunStatus.FAILED, "reason": reason, "dev_macro_f1": None,
            "elapsed_s": elapsed_s, "checkpoint_step": checkpoint_step, "traceback": traceback}


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    final = property(lambda self: self.path / "final.json")
    best_head = property(lambda self: self.path / "best_head.safetensors")
    dev_probs = property(lambda self: self.path / "dev_probs.csv")
    test_probs = property(lambda self: self.path / "test_probs.csv")

    def read_final(self) -> dict | None:
        try:
            return json.loads(self.final.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # no run folder (yet)
            return None

    def read_metrics(self) -> list[dict]:
        """The evaluations in metrics.jsonl, in order; a torn or foreign line is skipped (a reader
        may look while the run appends)."""
        try:
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
        return records

    def progress(self) -> tuple[float | None, int | None, float | None]:
        """(best dev macro-F1 so far, last step, elapsed seconds) from metrics.jsonl."""
        best = step = elapsed = None
        for rec in self.read_metrics():
            f1 = rec.get("dev_macro_f1")
            if isinstance(f1, (int, float)) and (best is None or f1 > best):
                best = f1
            step, elapsed = rec.get("step", step), rec.get("elapsed_s", elapsed)
        return best, step, elapsed

    def is_done(self) -> bool:
        final = self.read_final()
        return RunStatus.of_final(final or None) == RunStatus.DONE

    tb_dir = property(lambda self: self.path / "tb")
    attempts = property(lambda self: self.path / "attempts")

    def has_checkpoint(self) -> bool:
        """True once a resumable checkpoint was completed (checkpoint/latest.json)."""
        return (self.path / "checkpoint" / "latest.json").is_file()

    def _old_config(self) -> dict | None:
        if not self.config.exists():
            return None
        return yaml.safe_load(self.config.read_text(encoding="utf-8"))

    def _leftovers(self) -> list[Path]:
        return [self.path / n for n in RUN_ENTRIES if (self.path / n).exists()]

    def check_claim(self, cfg: Config) -> None:
        """Refuse a folder holding another config's run that finished or reached a checkpoint.

        Writes nothing; ``claim`` does the writing once the run's inputs have been checked.
        """
        old = self._old_config()
        new = yaml.safe_load(cfg.to_yaml())
        if old is None or same_run(old, new):
            if old is None and (self.is_done() or self.has_checkpoint()):
                what = "a finished run" if self.is_done() else "a run with checkpoints"
                raise ConfigError(f"run folder {self.path} holds {what} but no config.yaml; "
                                  "choose another run.dir or remove the folder")
            return
        if self.is_done():
            what = "a finished run"
        elif self.has_checkpoint():
            what = "a run that reached a checkpoint (it can be resumed with its own config)"
        else:
            return  # a failed attempt: claim() moves it aside
        raise ConfigError(
            f"run folder {self.path} already holds {what} with a different config ({self.config}); "
            "choose another run.dir or remove the folder")

    def claim(self, cfg: Config) -> None:
        """Claim the folder for this config; refuse one that holds another config's results.

        A folder whose earlier attempt had another (or no recorded) config and failed
        before its first checkpoint is taken over; that attempt's files go to attempts/.
        """
        self.check_claim(cfg)
        text = cfg.to_yaml()
        old = self._old_config()
        if old == yaml.safe_load(text):
            return
        if old is not None and same_run(old, yaml.safe_load(text)):
            atomic_io.write_text(self.config, text)  # the same run, now with its resolved classes
            return
        if self._leftovers():
            final = self.read_final() or {}
            moved = self.set_aside()
            log.warning("run folder %s: the earlier attempt (%s%s) had %s and never reached a checkpoint; its files "
                        "were moved to %s", self.path, final.get("status", "unfinished"),
                        f": {final['reason']}" if final.get("reason") else "",
                        "another config" if old is not None else "no recorded config", moved)
        atomic_io.write_text(self.config, text)

    def set_aside(self) -> Path:
        """Move this folder's run files (not attempts/ nor the lock) to attempts/<stamp>/."""
        close_tracking([self.path])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.attempts / stamp, 1
        while dest.exists():
            n += 1
            dest = self.attempts / f"{stamp}-{n}"
        dest.mkdir(parents=True)
        for entry in self._leftovers():
            os.replace(entry, dest / entry.name)
        return dest

    def start_attempt(self) -> None:
        """A restart from scratch: the earlier attempt's log and best-so-far no longer apply."""
        for path in (self.metrics, self.best_head, self.best_backbone, self.dev_probs, self.test_probs):
            path.unlink(missing_ok=True)
        close_tracking([self.path])
        _PURGE.pop(_tb_key(self.path), None)
        shutil.rmtree(self.tb_dir, ignore_errors=True)

    def log_metrics(self, record: dict) -> None:
        atomic_io.append_line(self.metrics, json.dumps(record))
        self._track(record)

    def _track(self, record: dict) -> None:
        """The record as TensorBoard scalars at its step; never raises."""
        if os.environ.get("SER_HPC_TENSORBOARD", "1").lower() in ("0", "false", "no", "off"):
            return
        key = _tb_key(self.path)
        if key in _WRITERS and _WRITERS[key] is None:
            return  # failed before in this folder: logged once
        try:
            writer = _WRITERS.get(key)
            if writer is None:
                from torch.utils.tensorboard import SummaryWriter
                writer = _WRITERS[key] = SummaryWriter(str(self.tb_dir), purge_step=_PURGE.pop(key, None))
            step = int(record["step"])
            for name, value in record.items():
                tag = TB_TAGS.get(name) or (f"dev/{name[4:]}" if name.startswith("dev_") else None)
                if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(tag, value, step)
            writer.flush()
        except Exception as exc:  # noqa: BLE001 - TensorBoard must never fail training
            _WRITERS[key] = None
            log.warning("TensorBoard: cannot write events in %s (%s: %s); metrics.jsonl still has every "
                        "evaluation", self.tb_dir, type(exc).__name__, exc)

    def write_final(self, record: dict) -> None:
        atomic_io.write_json(self.final, record)

    def write_failure(self, name: str, reason: str, **details) -> dict:
        """Write the failure record (``failure_record``) as final.json; returns it."""
        record = failure_record(self.path.name, name, reason, **details)
        self.write_final(record)
        return record

    best_backbone = property(lambda self: self.path / "best_backbone.safetensors")

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        """The best trainable weights: the head in best_head.safetensors (its own key names),
        unfrozen backbone layers, if any, in best_backbone.safetensors."""
        from safetensors.torch import save as st_save

        def pack(prefix):
            return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in weights.items() if k.startswith(prefix)}
        tuned = pack("backbones.")
        if tuned:
            atomic_io.write_bytes(self.best_backbone, st_save(tuned))
        atomic_io.write_bytes(self.best_head, st_save(pack("head.")))

    def load_best(self) -> dict[str, torch.Tensor]:
        """The best weights with model key names (``head.*``, ``backbones.*``)."""
        from safetensors.torch import load as st_load
        weights = {f"head.{k}": v for k, v in st_load(self.best_head.read_bytes()).items()}
        if self.best_backbone.exists():
            weights.update({f"backbones.{k}": v for k, v in st_load(self.best_backbone.read_bytes()).items()})
        return weights

    def restore(self, saved: Path) -> None:
        """Put back a file kept in a checkpoint (the best-so-far at that step)."""
        atomic_io.write_bytes(self.path / saved.name, saved.read_bytes())

    def truncate_metrics(self, step: int) -> None:
        """Drop evaluations logged after the checkpoint a run resumes from (they will be redone)."""
        if not self.metrics.exists():
            return
        lines = [l for l in self.metrics.read_text(encoding="utf-8").splitlines()
                 if l.strip() and json.loads(l)["step"] <= step]
        atomic_io.write_text(self.metrics, "".join(l + "\n" for l in lines))
        # TensorBoard: the resumed run rewrites the steps after ``step``; readers drop the old ones.
        close_tracking([self.path])
        _PURGE[_tb_key(self.path)] = step + 1

    @staticmethod
    def write_probs(path: Path, ids: list[str], labels: np.ndarray, probs: np.ndarray, classes) -> None:
        """``id,label,<one column per class>``; label is the gold name or empty."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["id", "label", *classes])
        for ident, label, row in zip(ids, labels, probs):
            writer.writerow([ident, classes[label] if label >= 0 else "", *(f"{p:.6f}" for p in row)])
        atomic_io.write_text(path, buf.getvalue())
