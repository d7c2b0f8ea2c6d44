"""One run inside a pack: its head, optimizer, lr schedule, early stopping, best weights,
checkpoints and run folder.

The pack trainer (``trainer.py``) owns what runs share (backbones, batches, the data
position); everything a run decides for itself lives here, so a head that stops early or
diverges stops alone and the others go on.
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
from ..models.encoders import FrozenBackbones
from ..models.head import build_head
from . import distributed as D
from .checkpoint import CheckpointStore
from .engine import Engine, SERModel, make_engine
from .run_folder import RunFolder
from .schedule import lr_factor

log = logging.getLogger("ser_hpc.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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
    probs: np.ndarray   # [N, 6]
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


class HeadRun:
    """One run of a pack. ``status``: training, finished (early stop or last step) or failed."""

    def __init__(self, cfg: Config, folder: RunFolder, backbones: FrozenBackbones, train_labels: list[int],
                 env: D.DistEnv, device: torch.device, labels_configured: bool = True):
        self.cfg, self.folder, self.env, self.device = cfg, folder, env, device
        self.labels = tuple(cfg.data.labels)  # the run's classes, resolved from config or corpus
        self.name = cfg.run.name
        torch.manual_seed(cfg.train.seed)  # the head's init must not depend on what loading consumed
        self.model = SERModel(backbones, build_head(cfg.model, backbones, len(cfg.data.labels)).to(device), device)
        self.rng = RngStream()
        self.engine: Engine = make_engine(cfg, self.model, env, device)
        weights = class_weights(train_labels, self.labels, cfg.train.class_weights, configured=labels_configured)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.checkpoints = CheckpointStore(folder.path)
        self.state = LoopState()
        self.status = "training"
        self.total_steps = 0  # set by the pack trainer
        self.failure: str | None = None
        self._clock = time.monotonic()
        self._step_weight = 1.0
        self._step_loss = 0.0

    @property
    def training(self) -> bool:
        return self.status == "training"

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self._clock

    # ---- one optimizer step -------------------------------------------------------------
    def weighted_ce_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")

    def begin_step(self, labels: list[torch.Tensor]) -> None:
        """Normalise by the weight of the whole global step (all micro-batches, all ranks),
        so N ranks x b clips give the same gradient as one process with N*b clips."""
        local = float(sum(self.class_weights[l.to(self.device)].sum() for l in labels))
        self._step_weight = D.all_sum(local, self.env)
        self._step_loss = 0.0

    def accumulate(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Loss and backward of one micro-batch (its forward ran inside ``self.rng``)."""
        loss_sum = self.weighted_ce_sum(logits, labels.to(self.device))
        # Every rank decides together, so no rank waits in a backward the others skipped.
        if D.any_true(not bool(torch.isfinite(loss_sum)), self.env):
            raise TrainingDiverged(f"loss is {loss_sum.item()} at step {self.state.step + 1} (epoch {self.state.epoch})")
        self.engine.backward(loss_sum * (self.env.world / self._step_weight))
        self._step_loss += loss_sum.item()

    def finish_step(self) -> None:
        t, s = self.cfg.train, self.state
        self.engine.set_lr_factor(lr_factor(t.lr_schedule, s.step, self.total_steps, t.warmup_steps, s.plateau_scale))
        self.engine.step(t.max_grad_norm)
        self.state.window_loss += D.all_sum(self._step_loss, self.env) / self._step_weight
        self.state.window_n += 1

    def log_progress(self, total_steps: int, clips_per_s: float) -> None:
        s = self.state
        log.info("run %s step %d/%d epoch %d loss %.4f lr %.2e %.1f clips/s", self.name, s.step, total_steps,
                 s.epoch, s.window_loss / max(s.window_n, 1), self.engine.lrs()[0], clips_per_s)

    # ---- evaluation ---------------------------------------------------------------------
    def predictions(self, ids: list[str], labels: torch.Tensor, logits: torch.Tensor) -> Predictions:
        loss = None
        if len(labels) and (labels >= 0).all():
            lab = labels.to(self.device)
            loss = float(self.weighted_ce_sum(logits.to(self.device), lab) / self.class_weights[lab].sum())
        order = sorted(range(len(ids)), key=lambda i: ids[i])  # stable row order for ensembling
        return Predictions([ids[i] for i in order], labels.numpy()[order],
                           torch.softmax(logits, dim=1).numpy()[order], loss)

    def record_evaluation(self, preds: Predictions) -> None:
        """Log a dev evaluation; keep the best weights; decay the lr; stop early when due."""
        s, t = self.state, self.cfg.train
        scores = score(preds.labels, preds.probs.argmax(1), self.labels)
        record = {"step": s.step, "epoch": s.epoch, "train_loss": s.window_loss / max(s.window_n, 1),
                  "dev_loss": preds.loss, "dev_macro_f1": scores["macro_f1"], "dev_ua": scores["ua"],
                  "dev_wa": scores["wa"], "lr": self.engine.lrs()[0],
                  "elapsed_s": round(self.elapsed(), 2)}
        s.window_loss, s.window_n = 0.0, 0
        improved = scores["macro_f1"] > s.best["dev_macro_f1"]
        if self.env.is_main:
            self.folder.log_metrics(record)
            log.info("run %s eval step %d: dev macro-F1 %.4f (best %.4f)%s", self.name, s.step, scores["macro_f1"],
                     max(s.best["dev_macro_f1"], scores["macro_f1"]), " *" if improved else "")
        if improved:
            s.best = {"dev_macro_f1": scores["macro_f1"], "step": s.step, "epoch": s.epoch, **scores}
            s.bad_evals = s.since_decay = 0
            weights = self.engine.trainable_state()  # collective under ZeRO-3
            if self.env.is_main:
                self.folder.save_best(weights)
                RunFolder.write_probs(self.folder.dev_probs, preds.ids, preds.labels, preds.probs, self.labels)
            return
        s.bad_evals += 1
        s.since_decay += 1
        if t.lr_schedule == "plateau" and s.since_decay >= t.lr_patience:
            s.plateau_scale *= t.lr_decay  # applied from the next optimizer step on
            s.since_decay = 0
        if t.early_stop_patience and s.bad_evals >= t.early_stop_patience:
            log.info("run %s: early stop at step %d, no improvement in %d evaluations", self.name, s.step, s.bad_evals)
            s.stopped_early = True
            self.status = "finished"

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        s = self.state
        s.elapsed_s = self.elapsed()
        self._clock = time.monotonic()
        s.lrs = self.engine.lrs()
        tmp = self.checkpoints.tmp_dir(s.step)
        if self.env.is_main:
            self.checkpoints.begin(s.step)
        D.barrier(self.env)
        trainer_state = self.engine.save(tmp)  # DeepSpeed writes its shards on every rank
        if self.env.is_main:
            weights = self.engine.trainable_state()
            self.checkpoints.write_files(tmp, s.step, weights, {**trainer_state, **self.rng.state()}, asdict(s),
                                         [self.folder.best_head, self.folder.best_backbone, self.folder.dev_probs])
        D.barrier(self.env)
        if self.env.is_main:
            self.checkpoints.commit(tmp, s.step)
            log.info("run %s: checkpoint at step %d", self.name, s.step)
        D.barrier(self.env)

    def saved_state(self) -> LoopState | None:
        """The loop state of the newest checkpoint, if any."""
        folder = self.checkpoints.latest()
        return None if folder is None else LoopState(**CheckpointStore.read_state(folder))

    def resume(self, step: int) -> None:
        """Load the checkpoint of ``step`` (the newest, or an older one the pack rolls back to)."""
        folder = self.checkpoints.at(step)
        saved, weights, trainer_state = CheckpointStore.read(folder)
        self.state = LoopState(**saved)
        self.engine.load(folder, weights, trainer_state)
        self.rng.load(trainer_state)
        if self.env.is_main:
            self.checkpoints.drop_after(step)
            for name in ("best_head.safetensors", "best_backbone.safetensors", "dev_probs.csv"):
                if (folder / name).exists():
                    self.folder.restore(folder / name)
            self.folder.truncate_metrics(step)
        self.state.resumed_from.append(step)
        if self.state.stopped_early:
            self.status = "finished"
        log.info("run %s: resumed from checkpoint at step %d (epoch %d)", self.name, step, self.state.epoch)

    def start_fresh(self) -> None:
        """No usable checkpoint: an earlier attempt's files no longer apply."""
        if self.env.is_main:
            self.checkpoints.remove_all()
            self.folder.start_attempt()

    def fail(self, reason: str) -> None:
        self.status, self.failure = "failed", reason
        log.error("run %s failed: %s", self.name, reason)

    # ---- the end ------------------------------------------------------------------------
    def final_record(self, test: Predictions | None, has_test_labels: bool) -> dict:
        s = self.state
        base = {"run_id": self.folder.path.name, "name": self.name, "elapsed_s": round(self.elapsed(), 2),
                "resumed_from": s.resumed_from, "world_size": self.env.world, "strategy": self.cfg.train.strategy}
        if self.status == "failed":
            return {**base, "status": "failed", "reason": self.failure, "dev_macro_f1": None}
        best = s.best
        final = {
            **base, "status": "done", "reason": None,
            "dev_macro_f1": best["dev_macro_f1"], "best_step": best["step"], "best_epoch": best["epoch"],
            "steps": s.step, "epochs": s.epoch + (1 if s.batch_in_epoch else 0),
            "stopped_early": s.stopped_early, "labels": list(self.labels), "per_class_f1": best["per_class_f1"],
            "confusion_matrix": best["confusion_matrix"], "test_macro_f1": None,
        }
        if test is not None and self.env.is_main:
            RunFolder.write_probs(self.folder.test_probs, test.ids, test.labels, test.probs, self.labels)
        if test is not None and has_test_labels:
            scores = score(test.labels, test.probs.argmax(1), self.labels)
            final.update(test_macro_f1=scores["macro_f1"], test_per_class_f1=scores["per_class_f1"],
                         test_confusion_matrix=scores["confusion_matrix"])
        return final

    def write_final(self, record: dict) -> None:
        if self.env.is_main:
            self.folder.write_final(record)
            if record["status"] == "done":
                log.info("run %s done: best dev macro-F1 %.4f at step %d%s -> %s", self.name, record["dev_macro_f1"],
                         record["best_step"], "" if record["test_macro_f1"] is None
                         else f", test macro-F1 {record['test_macro_f1']:.4f}", self.folder.path)

