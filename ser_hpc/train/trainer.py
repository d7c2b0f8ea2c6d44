"""One training run: frozen backbones, one trainable head, weighted cross-entropy.

AdamW on the head, dev evaluation every ``eval_every`` optimizer steps, the best checkpoint
by dev macro-F1, lr x ``lr_decay`` after ``lr_patience`` evaluations without improvement,
optional early stopping, bf16 autocast and gradient accumulation.
"""
from __future__ import annotations

import logging
import random
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..config import Config, ConfigError
from ..data.augment import Augmenter
from ..data.dataset import Batch, TrainCrops, WholeClips, collate, length_sorted_batches
from ..data.labels import LABELS
from ..data.sources import Splits, load_splits
from ..data.split import class_weights
from ..models.encoders import FrozenBackbones
from ..models.head import EmotionHead, build_head
from ..metrics import score
from .run_folder import RunFolder

log = logging.getLogger("ser_hpc.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochPermutation(Sampler):
    """A fresh shuffle each epoch, derived from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class Predictions:
    ids: list[str]
    labels: np.ndarray  # -1 where unknown
    probs: np.ndarray   # [N, 6]
    loss: float | None  # weighted CE when every label is known


class Trainer:
    def __init__(self, cfg: Config, splits: Splits, folder: RunFolder):
        self.cfg, self.splits, self.folder = cfg, splits, folder
        self.device = pick_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        modalities = cfg.model.modalities.split("+")
        self.backbones = FrozenBackbones(cfg.model.speech.name if "audio" in modalities else None,
                                         cfg.model.text.name if "text" in modalities else None,
                                         cfg.data.max_text_tokens).to(self.device)
        speech = self.backbones.speech
        if speech is not None and speech.sample_rate != cfg.data.sample_rate:
            raise ConfigError(f"data.sample_rate is {cfg.data.sample_rate} but speech model "
                              f"{cfg.model.speech.name!r} expects {speech.sample_rate} Hz")
        torch.manual_seed(cfg.train.seed)  # the head's init must not depend on what loading consumed
        self.head: EmotionHead = build_head(cfg.model, self.backbones).to(self.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        weights = class_weights([e.label for e in splits.train], cfg.train.class_weights)
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=self.device))
        augmenter = Augmenter(cfg.data.sample_rate, cfg.data.augment_prob, cfg.data.speeds, cfg.data.snr_db,
                              cfg.data.noise_dir, cfg.data.rir_dir)
        self.with_audio = "audio" in modalities
        self.train_set = TrainCrops(splits.train, cfg.data.sample_rate, cfg.data.crop_seconds, augmenter,
                                    cfg.train.seed, self.with_audio)
        self.sampler = EpochPermutation(len(self.train_set), cfg.train.seed)
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=collate,
                                       persistent_workers=False)
        micro_per_epoch = len(self.train_loader)
        self.steps_per_epoch = max(1, micro_per_epoch // cfg.train.grad_accum_steps)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)

    # ---- evaluation -------------------------------------------------------------------
    def eval_loader(self, examples) -> DataLoader:
        durations = [self.splits.durations.get(e.id, 0.0) for e in examples]
        return DataLoader(WholeClips(examples, self.cfg.data.sample_rate, self.with_audio), collate_fn=collate,
                          batch_sampler=length_sorted_batches(durations, self.cfg.data.eval_batch_size),
                          num_workers=self.cfg.data.num_workers)

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(**self.autocast):
            feats = self.backbones(batch.waves, batch.wave_lengths, batch.texts, self.device)
            return self.head(feats).float()

    @torch.no_grad()
    def predict(self, loader: DataLoader) -> Predictions:
        self.head.eval()
        ids, labels, logits = [], [], []
        for batch in loader:
            logits.append(self.forward(batch).cpu())
            ids += batch.ids
            labels.append(batch.labels)
        self.head.train()
        logit = torch.cat(logits)
        label = torch.cat(labels)
        loss = float(self.loss_fn(logit.to(self.device), label.to(self.device))) if (label >= 0).all() else None
        order = sorted(range(len(ids)), key=lambda i: ids[i])  # stable row order for ensembling
        return Predictions([ids[i] for i in order], label.numpy()[order],
                           torch.softmax(logit, dim=1).numpy()[order], loss)

    # ---- training ---------------------------------------------------------------------
    def _batches(self):
        """Endless micro-batches, epoch after epoch; yields (epoch, batch)."""
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            for batch in self.train_loader:
                yield epoch, batch
            epoch += 1

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        dev_loader = self.eval_loader(self.splits.dev)
        log.info("run %s: %d train / %d dev / %d test clips, %d steps (%d per epoch), device %s, "
                 "%d trainable parameters", cfg.run.name, len(self.splits.train), len(self.splits.dev),
                 len(self.splits.test), self.total_steps, self.steps_per_epoch, self.device,
                 sum(p.numel() for p in self.head.parameters()))
        best = {"dev_macro_f1": -1.0, "step": 0, "epoch": 0}
        best_preds: Predictions | None = None
        bad_evals = since_decay = 0
        step, epoch, start = 0, 0, time.monotonic()
        window_loss, window_n, window_t, window_clips = 0.0, 0, time.monotonic(), 0
        batches = self._batches()
        self.head.train()
        stopped_early = False
        while step < self.total_steps:
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(t.grad_accum_steps):
                epoch, batch = next(batches)
                logits = self.forward(batch)
                loss = self.loss_fn(logits, batch.labels.to(self.device))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss is {loss.item()} at step {step + 1} (epoch {epoch})")
                (loss / t.grad_accum_steps).backward()
                window_loss += loss.item()
                window_n += 1
                window_clips += len(batch.ids)
            if t.max_grad_norm:
                nn.utils.clip_grad_norm_(self.head.parameters(), t.max_grad_norm)
            self.optimizer.step()
            step += 1
            if step % t.log_every == 0:
                rate = window_clips / max(time.monotonic() - window_t, 1e-9)
                log.info("run %s step %d/%d epoch %d loss %.4f lr %.2e %.1f clips/s", cfg.run.name, step,
                         self.total_steps, epoch, window_loss / window_n, self.optimizer.param_groups[0]["lr"], rate)
            if step % t.eval_every == 0 or step == self.total_steps:
                preds = self.predict(dev_loader)
                scores = score(preds.labels, preds.probs.argmax(1))
                record = {"step": step, "epoch": epoch, "train_loss": window_loss / max(window_n, 1),
                          "dev_loss": preds.loss, "dev_macro_f1": scores["macro_f1"],
                          "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": round(time.monotonic() - start, 2)}
                window_loss, window_n, window_t, window_clips = 0.0, 0, time.monotonic(), 0
                self.folder.log_metrics(record)
                improved = scores["macro_f1"] > best["dev_macro_f1"]
                log.info("run %s eval step %d: dev macro-F1 %.4f (best %.4f)%s", cfg.run.name, step,
                         scores["macro_f1"], max(best["dev_macro_f1"], scores["macro_f1"]), " *" if improved else "")
                if improved:
                    best = {"dev_macro_f1": scores["macro_f1"], "step": step, "epoch": epoch, **scores}
                    best_preds = preds
                    bad_evals = since_decay = 0
                    self.folder.save_head(self.head.state_dict())
                    RunFolder.write_probs(self.folder.dev_probs, preds.ids, preds.labels, preds.probs)
                else:
                    bad_evals += 1
                    since_decay += 1
                    if since_decay >= t.lr_patience:
                        for group in self.optimizer.param_groups:
                            group["lr"] *= t.lr_decay
                        since_decay = 0
                    if t.early_stop_patience and bad_evals >= t.early_stop_patience:
                        log.info("run %s: early stop at step %d, no improvement in %d evaluations",
                                 cfg.run.name, step, bad_evals)
                        stopped_early = True
                        break
        assert best_preds is not None
        final = {
            "status": "done", "reason": None,
            "dev_macro_f1": best["dev_macro_f1"], "best_step": best["step"], "best_epoch": best["epoch"],
            "steps": step, "epochs": epoch + 1, "stopped_early": stopped_early,
            "labels": list(LABELS), "per_class_f1": best["per_class_f1"],
            "confusion_matrix": best["confusion_matrix"], "test_macro_f1": None,
        }
        if self.splits.test:
            self.head.load_state_dict(self.folder.load_head())
            test = self.predict(self.eval_loader(self.splits.test))
            RunFolder.write_probs(self.folder.test_probs, test.ids, test.labels, test.probs)
            if self.splits.test_has_labels:
                scores = score(test.labels, test.probs.argmax(1))
                final.update(test_macro_f1=scores["macro_f1"], test_per_class_f1=scores["per_class_f1"],
                             test_confusion_matrix=scores["confusion_matrix"])
        return final


def train_run(cfg: Config) -> dict:
    """Train one run into ``cfg.run.dir``; returns its final record (also written as final.json).

    Bad input raises before training starts, after recording the reason in final.json so
    a grid's aggregation can report it. A diverged run ends with status failed.
    """
    if not cfg.run.dir:
        raise ConfigError("config key 'run.dir' (the run folder) is not set")
    folder = RunFolder(cfg.run.dir)
    folder.claim(cfg)
    if folder.is_done():
        log.info("run %s already done in %s: skipping", cfg.run.name, folder.path)
        return folder.read_final()
    folder.start_attempt()
    start = time.monotonic()
    base = {"run_id": folder.path.name, "name": cfg.run.name}
    try:
        trainer = Trainer(cfg, load_splits(cfg.data), folder)
        final = trainer.fit()
    except TrainingDiverged as exc:
        final = {"status": "failed", "reason": f"training diverged: {exc}", "dev_macro_f1": None}
        log.error("run %s failed: %s", cfg.run.name, final["reason"])
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        folder.write_final({**base, "status": "failed", "reason": reason, "dev_macro_f1": None,
                            "elapsed_s": round(time.monotonic() - start, 2),
                            "traceback": traceback.format_exc(limit=8)})
        raise
    final = {**base, **final, "elapsed_s": round(time.monotonic() - start, 2)}
    folder.write_final(final)
    if final["status"] == "done":
        log.info("run %s done: best dev macro-F1 %.4f at step %d%s -> %s", cfg.run.name, final["dev_macro_f1"],
                 final["best_step"], "" if final["test_macro_f1"] is None else f", test macro-F1 {final['test_macro_f1']:.4f}",
                 folder.path)
    return final

