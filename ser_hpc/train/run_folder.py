"""One run's folder in the results tree, and every file in it.

All writes are atomic (``ser_hpc.atomic_io``): a reader on another node or a rerun after a
crash never sees a torn file. A finished run (``final.json`` with status done) is never
redone; a folder holding a different config is never overwritten.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import atomic_io
from ..config import Config, ConfigError
from ..data.labels import LABELS


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
        except FileNotFoundError:
            return None

    def is_done(self) -> bool:
        final = self.read_final()
        return bool(final) and final.get("status") == "done"

    def claim(self, cfg: Config) -> None:
        """Claim the folder for this config; refuse one that holds another config's results."""
        text = cfg.to_yaml()
        if self.config.exists():
            old = yaml.safe_load(self.config.read_text(encoding="utf-8"))
            if old != yaml.safe_load(text):
                raise ConfigError(
                    f"run folder {self.path} already holds a run with a different config ({self.config}); "
                    "choose another run.dir or remove the folder")
        else:
            atomic_io.write_text(self.config, text)

    def start_attempt(self) -> None:
        """A restart from scratch: the earlier attempt's log and best-so-far no longer apply."""
        for path in (self.metrics, self.best_head, self.best_backbone, self.dev_probs, self.test_probs):
            path.unlink(missing_ok=True)

    def log_metrics(self, record: dict) -> None:
        atomic_io.append_line(self.metrics, json.dumps(record))

    def write_final(self, record: dict) -> None:
        atomic_io.write_json(self.final, record)

    best_backbone = property(lambda self: self.path / "best_backbone.safetensors")

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        """The best trainable weights: the head in best_head.safetensors (its own key names),
        unfrozen backbone layers, if any, in best_backbone.safetensors."""
        def pack(prefix):
            return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in weights.items() if k.startswith(prefix)}
        tuned = pack("backbones.")
        if tuned:
            atomic_io.write_bytes(self.best_backbone, st_save(tuned))
        atomic_io.write_bytes(self.best_head, st_save(pack("head.")))

    def load_best(self) -> dict[str, torch.Tensor]:
        """The best weights with model key names (``head.*``, ``backbones.*``)."""
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

    @staticmethod
    def write_probs(path: Path, ids: list[str], labels: np.ndarray, probs: np.ndarray) -> None:
        """``id,label,<one column per class>``; label is the gold name or empty."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["id", "label", *LABELS])
        for ident, label, row in zip(ids, labels, probs):
            writer.writerow([ident, LABELS[label] if label >= 0 else "", *(f"{p:.6f}" for p in row)])
        atomic_io.write_text(path, buf.getvalue())
