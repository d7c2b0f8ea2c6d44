"""One head of a pack as a plain record, and what is written about it: checkpoints and the
final record. The training loop itself (``loop.py``) does the head's steps and evaluations.

Each head has its own model (its head on the pack's shared backbones), engine (optimizer
and, under DDP/DeepSpeed, the wrapper), loss weights, dropout RNG stream, loop state and run
folder, so every run of a pack ends exactly as it would trained alone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.split import class_weights
from ..metrics import score
from ..models.head import build_head
from ..run_status import RunStatus
from . import distributed as D
from .checkpoint import CheckpointStore
from .engine import Engine, SERModel, make_engine
from .inputs import PackInputs
from .run_folder import RunFolder

log = logging.getLogger("ser_hpc.train")


class RngStream:
    """A private torch RNG stream (CPU and CUDA) for one head's dropout.

    Swapped in around the head's training forward (``with head.rng:``), so each head of a pack draws exactly
    the dropout masks it would draw trained alone, whatever the other heads consume.
    """

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._outer = None

    def __enter__(self) -> "RngStream":
        self._outer = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.cuda is not None else None)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = torch.get_rng_state()
        if self.cuda is not None:
            self.cuda = torch.cuda.get_rng_state_all()
            torch.cuda.set_rng_state_all(self._outer[1])
        torch.set_rng_state(self._outer[0])

    def state(self) -> dict:
        return {"torch_rng": self.cpu, **({"cuda_rng": self.cuda} if self.cuda is not None else {})}

    def load(self, saved: dict) -> None:
        self.cpu = saved["torch_rng"]
        if self.cuda is not None and "cuda_rng" in saved:
            self.cuda = saved["cuda_rng"]


@dataclass
class Predictions:
    ids: list[str]
    labels: np.ndarray  # -1 where unknown
    probs: np.ndarray   # [N, classes]
    loss: float | None  # weighted CE when every label is known


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0             # global batches of `epoch` already consumed
    best: dict = field(default_factory=lambda: {"dev_macro_f1": -1.0, "step": 0, "epoch": 0})
    bad_evals: int = 0
    since_decay: int = 0
    plateau_scale: float = 1.0          # lr factor from decays on plateaus (train.lr_schedule=plateau)
    lrs: list = field(default_factory=list)
    window_loss: float = 0.0
    window_n: int = 0
    resumed_from: list = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_early: bool = False


@dataclass
class Head:
    """One run of a pack. ``status``: running, done (early stop or last step) or failed."""
    cfg: Config
    folder: RunFolder
    model: SERModel
    engine: Engine                      # the optimizer (and DDP / DeepSpeed wrapper) of this head
    loss_weights: torch.Tensor          # per class (train.class_weights)
    rng: RngStream
    checkpoints: CheckpointStore
    state: LoopState = field(default_factory=LoopState)
    status: RunStatus = RunStatus.RUNNING
    failure: str | None = None          # why it failed (training diverged)
    final: dict | None = None           # its failure record, once it failed
    clock: float = field(default_factory=time.monotonic)   # start of the time not yet in state.elapsed_s

    @property
    def name(self) -> str:
        return self.cfg.run.name

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.cfg.data.labels)

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self.clock

    def weighted_ce_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, weight=self.loss_weights, reduction="sum")


def new_head(cfg: Config, folder: RunFolder, backbones, train_labels: list[int], env: D.DistEnv,
             device: torch.device, labels_configured: bool) -> Head:
    torch.manual_seed(cfg.train.seed)  # the head's init must not depend on what loading consumed
    model = SERModel(backbones, build_head(cfg.model, backbones, len(cfg.data.labels)).to(device), device)
    rng = RngStream()
    engine = make_engine(cfg, model, env, device)
    weights = class_weights(train_labels, cfg.data.labels, cfg.train.class_weights, configured=labels_configured)
    return Head(cfg, folder, model, engine, torch.tensor(weights, dtype=torch.float32, device=device), rng,
                CheckpointStore(folder.path))


def predictions(head: Head, ids: list[str], labels: torch.Tensor, logits: torch.Tensor) -> Predictions:
    loss = None
    if len(labels) and (labels >= 0).all():
        lab = labels.to(head.loss_weights.device)
        loss = float(head.weighted_ce_sum(logits.to(lab.device), lab) / head.loss_weights[lab].sum())
    order = sorted(range(len(ids)), key=lambda i: ids[i])  # stable row order for ensembling
    return Predictions([ids[i] for i in order], labels.numpy()[order], torch.softmax(logits, dim=1).numpy()[order],
                       loss)


def predict(inputs: PackInputs, heads: list[Head], examples, cache: bool) -> list[Predictions]:
    """Every head's predictions for ``examples``: one backbone pass (or the cache) for all."""
    ids, labels, logits = inputs.logits_of([h.engine for h in heads], examples, cache)
    return [predictions(h, ids, labels, l) for h, l in zip(heads, logits)]


# ---- checkpoints ------------------------------------------------------------------------
def save_checkpoint(head: Head, env: D.DistEnv) -> None:
    s = head.state
    s.elapsed_s, head.clock = head.elapsed(), time.monotonic()
    s.lrs = head.engine.lrs()
    tmp = head.checkpoints.tmp_dir(s.step)
    if env.is_main:
        head.checkpoints.begin(s.step)
    D.barrier(env)
    trainer_state = head.engine.save(tmp)  # DeepSpeed writes its shards on every rank
    if env.is_main:
        weights = head.engine.trainable_state()
        head.checkpoints.write_files(tmp, s.step, weights, {**trainer_state, **head.rng.state()}, asdict(s),
                                     [head.folder.best_head, head.folder.best_backbone, head.folder.dev_probs])
    D.barrier(env)
    if env.is_main:
        head.checkpoints.commit(tmp, s.step)
        log.info("run %s: checkpoint at step %d", head.name, s.step)
    D.barrier(env)


def saved_state(head: Head) -> LoopState | None:
    """The loop state of the head's newest checkpoint, if any."""
    folder = head.checkpoints.latest()
    return None if folder is None else LoopState(**CheckpointStore.read_state(folder))


def load_checkpoint(head: Head, step: int, env: D.DistEnv) -> None:
    """Bring the head back to its checkpoint of ``step`` (files written after it are dropped)."""
    folder = head.checkpoints.at(step)
    saved, weights, trainer_state = CheckpointStore.read(folder)
    head.state = LoopState(**saved)
    head.engine.load(folder, weights, trainer_state)
    head.rng.load(trainer_state)
    if env.is_main:
        head.checkpoints.drop_after(step)
        for name in ("best_head.safetensors", "best_backbone.safetensors", "dev_probs.csv"):
            if (folder / name).exists():
                head.folder.restore(folder / name)
        head.folder.truncate_metrics(step)
    head.state.resumed_from.append(step)
    if head.state.stopped_early:
        head.status = RunStatus.DONE
    log.info("run %s: resumed from checkpoint at step %d (epoch %d)", head.name, step, head.state.epoch)


# ---- the end ----------------------------------------------------------------------------
def final_record(head: Head, test: Predictions | None, has_test_labels: bool, env: D.DistEnv) -> dict:
    """The record of a head that trained to the end or stopped early (failures: ``write_failure``)."""
    s, best = head.state, head.state.best
    final = {
        "run_id": head.folder.path.name, "name": head.name, "elapsed_s": round(head.elapsed(), 2),
        "resumed_from": s.resumed_from, "world_size": env.world, "strategy": head.cfg.train.strategy,
        "status": RunStatus.DONE, "reason": None,
        "dev_macro_f1": best["dev_macro_f1"], "best_step": best["step"], "best_epoch": best["epoch"],
        "steps": s.step, "epochs": s.epoch + (1 if s.batch_in_epoch else 0),
        "stopped_early": s.stopped_early, "labels": list(head.labels), "per_class_f1": best["per_class_f1"],
        "confusion_matrix": best["confusion_matrix"], "test_macro_f1": None,
    }
    if test is not None and env.is_main:
        RunFolder.write_probs(head.folder.test_probs, test.ids, test.labels, test.probs, head.labels)
    if test is not None and has_test_labels:
        scores = score(test.labels, test.probs.argmax(1), head.labels)
        final.update(test_macro_f1=scores["macro_f1"], test_per_class_f1=scores["per_class_f1"],
                     test_confusion_matrix=scores["confusion_matrix"])
    return final


def write_final(head: Head, record: dict, env: D.DistEnv) -> None:
    if env.is_main:
        head.folder.write_final(record)
        if record["status"] == RunStatus.DONE:
            log.info("run %s done: best dev macro-F1 %.4f at step %d%s -> %s", head.name, record["dev_macro_f1"],
                     record["best_step"], "" if record["test_macro_f1"] is None
                     else f", test macro-F1 {record['test_macro_f1']:.4f}", head.folder.path)
