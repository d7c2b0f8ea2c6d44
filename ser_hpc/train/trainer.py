"""One training run: frozen (or top-layer fine-tuned) backbones, one trainable head,
weighted cross-entropy.

AdamW, dev evaluation every ``eval_every`` optimizer steps, the best checkpoint by dev
macro-F1, lr x ``lr_decay`` after ``lr_patience`` evaluations without improvement, optional
early stopping, bf16 autocast, gradient accumulation. The same loop runs as one process,
as DDP ranks or under DeepSpeed (``train.strategy``), and resumes exactly from its last
checkpoint: data order, optimizer, lr schedule, RNG and best-so-far are all restored.
"""
from __future__ import annotations

import logging
import random
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..config import Config, ConfigError
from ..data.augment import Augmenter
from ..data.dataset import Batch, TrainCrops, WholeClips, collate, length_sorted_batches
from ..data.labels import LABELS
from ..data.prepared import PreparedAudio, audio_loader_for
from ..data.sources import Splits, load_splits
from ..data.split import class_weights
from ..metrics import score
from ..models.encoders import FrozenBackbones
from ..models.head import build_head
from . import distributed as D
from .checkpoint import CheckpointStore
from .engine import SERModel, make_engine
from .preemption import Preempted, PreemptionFlag
from .run_folder import RunFolder

log = logging.getLogger("ser_hpc.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    lrs: list = field(default_factory=list)
    window_loss: float = 0.0
    window_n: int = 0
    resumed_from: list = field(default_factory=list)
    elapsed_s: float = 0.0


class Trainer:
    def __init__(self, cfg: Config, splits: Splits, folder: RunFolder, env: D.DistEnv):
        self.cfg, self.splits, self.folder, self.env = cfg, splits, folder, env
        self.device = D.device_for(env, cfg.train.device)
        seed_everything(cfg.train.seed)
        modalities = cfg.model.modalities.split("+")
        self.with_audio = "audio" in modalities
        self.backbones = FrozenBackbones(cfg.model.speech.name if self.with_audio else None,
                                         cfg.model.text.name if "text" in modalities else None,
                                         cfg.data.max_text_tokens, cfg.model.speech.finetune_top_layers,
                                         cfg.model.text.finetune_top_layers).to(self.device)
        speech = self.backbones.speech
        if speech is not None and speech.sample_rate != cfg.data.sample_rate:
            raise ConfigError(f"data.sample_rate is {cfg.data.sample_rate} but speech model "
                              f"{cfg.model.speech.name!r} expects {speech.sample_rate} Hz")
        torch.manual_seed(cfg.train.seed)  # the head's init must not depend on what loading consumed
        self.model = SERModel(self.backbones, build_head(cfg.model, self.backbones), self.device).to(self.device)
        self.engine = make_engine(cfg, self.model, env, self.device)
        weights = class_weights([e.label for e in splits.train], cfg.train.class_weights)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)
        # Prepared 16 kHz audio when data.prepared_dir is set (decoded once by the grid's first job).
        self.audio_loader = audio_loader_for(cfg.data)
        if isinstance(self.audio_loader, PreparedAudio) and self.with_audio:
            self.audio_loader.check(splits.train + splits.dev + splits.test)
        augmenter = Augmenter(cfg.data.sample_rate, cfg.data.augment_prob, cfg.data.speeds, cfg.data.snr_db,
                              cfg.data.noise_dir, cfg.data.rir_dir)
        self.train_set = TrainCrops(splits.train, cfg.data.sample_rate, cfg.data.crop_seconds, augmenter,
                                    cfg.train.seed, self.with_audio, self.audio_loader)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.batch_size, cfg.train.seed, env)
        # A private generator: creating a loader iterator must not consume the global RNG
        # (dropout draws from it), or a resumed run would diverge from an uninterrupted one.
        self.train_loader = DataLoader(self.train_set, batch_size=self.sampler.per_rank, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(cfg.train.seed))
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // cfg.train.grad_accum_steps)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
        self.checkpoints = CheckpointStore(folder.path)

    # ---- evaluation -------------------------------------------------------------------
    def eval_loader(self, examples) -> DataLoader:
        durations = [self.splits.durations.get(e.id, 0.0) for e in examples]
        return DataLoader(WholeClips(examples, self.cfg.data.sample_rate, self.with_audio, self.audio_loader),
                          collate_fn=collate,
                          batch_sampler=length_sorted_batches(durations, self.cfg.data.eval_batch_size),
                          num_workers=self.cfg.data.num_workers)

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(**self.autocast):
            return self.engine.forward(batch.waves, batch.wave_lengths, batch.texts).float()

    def weighted_ce_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")

    @torch.no_grad()
    def predict(self, examples) -> Predictions:
        """Every rank scores its shard; all ranks receive the gathered predictions."""
        self.model.eval()
        ids, labels, logits = [], [], []
        shard = self.env.enabled and self.engine.can_shard_eval
        for batch in self.eval_loader(examples[self.env.rank::self.env.world] if shard else examples):
            logits.append(self.forward(batch).cpu())
            ids += batch.ids
            labels.append(batch.labels)
        self.model.train()
        mine = (ids, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                torch.cat(logits) if logits else torch.zeros(0, len(LABELS)))
        shards = D.all_gather(mine, self.env) if shard else [mine]
        ids = [i for s in shards for i in s[0]]
        label = torch.cat([s[1] for s in shards])
        logit = torch.cat([s[2] for s in shards])
        loss = None
        if len(label) and (label >= 0).all():
            loss = float(self.weighted_ce_sum(logit.to(self.device), label.to(self.device))
                         / self.class_weights[label.to(self.device)].sum())
        order = sorted(range(len(ids)), key=lambda i: ids[i])  # stable row order for ensembling
        return Predictions([ids[i] for i in order], label.numpy()[order],
                           torch.softmax(logit, dim=1).numpy()[order], loss)

    # ---- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, state: LoopState) -> None:
        tmp = self.checkpoints.tmp_dir(state.step)
        if self.env.is_main:
            self.checkpoints.begin(state.step)
        D.barrier(self.env)
        trainer_state = self.engine.save(tmp)  # DeepSpeed writes its shards on every rank
        if self.env.is_main:
            payload = {**trainer_state, "torch_rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                payload["cuda_rng"] = torch.cuda.get_rng_state_all()
            weights = self.engine.trainable_state()
            self.checkpoints.write_files(tmp, state.step, weights, payload, asdict(state),
                                         [self.folder.best_head, self.folder.best_backbone, self.folder.dev_probs])
        D.barrier(self.env)
        if self.env.is_main:
            self.checkpoints.commit(tmp, state.step)
            log.info("run %s: checkpoint at step %d", self.cfg.run.name, state.step)
        D.barrier(self.env)

    def try_resume(self) -> LoopState:
        if self.env.is_main:
            self.checkpoints.cleanup_partial()
        D.barrier(self.env)
        folder = self.checkpoints.latest()
        if folder is None:
            return LoopState()
        saved, weights, trainer_state = CheckpointStore.read(folder)
        state = LoopState(**saved)
        self.engine.load(folder, weights, trainer_state)
        torch.set_rng_state(trainer_state["torch_rng"])
        if "cuda_rng" in trainer_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
        if self.env.is_main:
            for name in ("best_head.safetensors", "best_backbone.safetensors", "dev_probs.csv"):
                if (folder / name).exists():
                    self.folder.restore(folder / name)
            self.folder.truncate_metrics(state.step)
        state.resumed_from.append(state.step)
        log.info("run %s: resumed from checkpoint at step %d (epoch %d)", self.cfg.run.name, state.step, state.epoch)
        return state

    # ---- training ---------------------------------------------------------------------
    def _batches(self, state: LoopState):
        """Endless micro-batches from the saved data position on; keeps ``state`` in step."""
        while True:
            self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
            self.train_set.set_epoch(state.epoch)
            for batch in self.train_loader:
                state.batch_in_epoch += 1
                yield batch
            state.epoch += 1
            state.batch_in_epoch = 0

    def _evaluate(self, state: LoopState, start: float) -> bool:
        """Dev evaluation, best checkpoint, lr decay; returns True to stop early."""
        t, cfg = self.cfg.train, self.cfg
        preds = self.predict(self.splits.dev)
        scores = score(preds.labels, preds.probs.argmax(1))
        record = {"step": state.step, "epoch": state.epoch, "train_loss": state.window_loss / max(state.window_n, 1),
                  "dev_loss": preds.loss, "dev_macro_f1": scores["macro_f1"], "lr": self.engine.lrs()[0],
                  "elapsed_s": round(time.monotonic() - start + state.elapsed_s, 2)}
        state.window_loss, state.window_n = 0.0, 0
        improved = scores["macro_f1"] > state.best["dev_macro_f1"]
        if self.env.is_main:
            self.folder.log_metrics(record)
            log.info("run %s eval step %d: dev macro-F1 %.4f (best %.4f)%s", cfg.run.name, state.step,
                     scores["macro_f1"], max(state.best["dev_macro_f1"], scores["macro_f1"]), " *" if improved else "")
        if improved:
            state.best = {"dev_macro_f1": scores["macro_f1"], "step": state.step, "epoch": state.epoch, **scores}
            state.bad_evals = state.since_decay = 0
            weights = self.engine.trainable_state()  # collective under ZeRO-3
            if self.env.is_main:
                self.folder.save_best(weights)
                RunFolder.write_probs(self.folder.dev_probs, preds.ids, preds.labels, preds.probs)
            return False
        state.bad_evals += 1
        state.since_decay += 1
        if state.since_decay >= t.lr_patience:
            self.engine.scale_lr(t.lr_decay)
            state.since_decay = 0
        if t.early_stop_patience and state.bad_evals >= t.early_stop_patience:
            log.info("run %s: early stop at step %d, no improvement in %d evaluations",
                     cfg.run.name, state.step, state.bad_evals)
            return True
        return False

    def fit(self, flag: PreemptionFlag) -> dict:
        cfg, t = self.cfg, self.cfg.train
        state = self.try_resume()
        if self.env.is_main:
            log.info("run %s: %d train / %d dev / %d test clips, %d steps (%d per epoch), %s on %s x%d, "
                     "%d trainable parameters%s", cfg.run.name, len(self.splits.train), len(self.splits.dev),
                     len(self.splits.test), self.total_steps, self.steps_per_epoch, t.strategy, self.device,
                     self.env.world, sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                     f", resuming at step {state.step}" if state.step else "")
        start = time.monotonic()
        window_t, window_clips = time.monotonic(), 0
        ckpt_every = t.checkpoint_every or t.eval_every
        batches = self._batches(state)
        self.model.train()
        stopped_early = False
        while state.step < self.total_steps:
            micro = [next(batches) for _ in range(t.grad_accum_steps)]
            # Normalise by the weight of the whole global step (all micro-batches, all ranks),
            # so N ranks x b clips give the same gradient as one process with N*b clips.
            local_w = float(sum(self.class_weights[m.labels.to(self.device)].sum() for m in micro))
            total_w = D.all_sum(local_w, self.env)
            step_loss = 0.0
            for batch in micro:
                logits = self.forward(batch)
                loss_sum = self.weighted_ce_sum(logits, batch.labels.to(self.device))
                if not torch.isfinite(loss_sum):
                    raise TrainingDiverged(f"loss is {loss_sum.item()} at step {state.step + 1} (epoch {state.epoch})")
                self.engine.backward(loss_sum * (self.env.world / total_w))
                step_loss += loss_sum.item()
                window_clips += len(batch.ids) * self.env.world
            self.engine.step(t.max_grad_norm)
            state.step += 1
            state.window_loss += D.all_sum(step_loss, self.env) / total_w
            state.window_n += 1
            if state.step % t.log_every == 0 and self.env.is_main:
                rate = window_clips / max(time.monotonic() - window_t, 1e-9)
                log.info("run %s step %d/%d epoch %d loss %.4f lr %.2e %.1f clips/s", cfg.run.name, state.step,
                         self.total_steps, state.epoch, state.window_loss / state.window_n, self.engine.lrs()[0], rate)
                window_t, window_clips = time.monotonic(), 0
            if state.step % t.eval_every == 0 or state.step == self.total_steps:
                stopped_early = self._evaluate(state, start)
            preempted = D.any_true(flag.raised, self.env)
            if state.step % ckpt_every == 0 or preempted or stopped_early or state.step == self.total_steps:
                state.elapsed_s += time.monotonic() - start
                start = time.monotonic()
                state.lrs = self.engine.lrs()
                self.save_checkpoint(state)
            if preempted and not stopped_early and state.step < self.total_steps:
                raise Preempted(state.step, flag.signum or 0)
            if stopped_early:
                break
        return self.finish(state, stopped_early)

    def finish(self, state: LoopState, stopped_early: bool) -> dict:
        best = state.best
        final = {
            "status": "done", "reason": None,
            "dev_macro_f1": best["dev_macro_f1"], "best_step": best["step"], "best_epoch": best["epoch"],
            "steps": state.step, "epochs": state.epoch + (1 if state.batch_in_epoch else 0),
            "stopped_early": stopped_early, "labels": list(LABELS), "per_class_f1": best["per_class_f1"],
            "confusion_matrix": best["confusion_matrix"], "test_macro_f1": None,
            "resumed_from": state.resumed_from, "world_size": self.env.world, "strategy": self.cfg.train.strategy,
        }
        if self.splits.test:
            self.engine.load_best(self.folder)
            test = self.predict(self.splits.test)
            if self.env.is_main:
                RunFolder.write_probs(self.folder.test_probs, test.ids, test.labels, test.probs)
            if self.splits.test_has_labels:
                scores = score(test.labels, test.probs.argmax(1))
                final.update(test_macro_f1=scores["macro_f1"], test_per_class_f1=scores["per_class_f1"],
                             test_confusion_matrix=scores["confusion_matrix"])
        return final


def train_run(cfg: Config, flag: PreemptionFlag | None = None) -> dict:
    """Train one run into ``cfg.run.dir``; returns its final record (also written as final.json).

    Bad input raises before training starts, after recording the reason in final.json so
    a grid's aggregation can report it. A diverged run ends with status failed. On a
    preemption signal it checkpoints and raises ``Preempted``; calling it again resumes.
    """
    if not cfg.run.dir:
        raise ConfigError("config key 'run.dir' (the run folder) is not set")
    env = D.detect()
    if env.enabled and cfg.train.strategy == "single":
        raise ConfigError(f"{env.world} ranks were started but train.strategy is 'single'; use ddp or deepspeed")
    folder = RunFolder(cfg.run.dir)
    if env.is_main:
        folder.claim(cfg)
    D.init(env, D.device_for(env, cfg.train.device))
    D.barrier(env)
    if folder.is_done():
        log.info("run %s already done in %s: skipping", cfg.run.name, folder.path)
        return folder.read_final()
    start = time.monotonic()
    base = {"run_id": folder.path.name, "name": cfg.run.name}
    own_flag = flag is None
    flag = flag or PreemptionFlag().__enter__()
    try:
        trainer = Trainer(cfg, load_splits(cfg.data), folder, env)
        if env.is_main and trainer.checkpoints.latest() is None:
            folder.start_attempt()
        final = trainer.fit(flag)
    except TrainingDiverged as exc:
        final = {"status": "failed", "reason": f"training diverged: {exc}", "dev_macro_f1": None}
        log.error("run %s failed: %s", cfg.run.name, final["reason"])
    except Preempted:
        raise
    except Exception as exc:
        if env.is_main:
            folder.write_final({**base, "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                                "dev_macro_f1": None, "elapsed_s": round(time.monotonic() - start, 2),
                                "traceback": traceback.format_exc(limit=8)})
        raise
    finally:
        if own_flag:
            flag.__exit__(None, None, None)
    final = {**base, **final, "elapsed_s": round(time.monotonic() - start, 2)}
    if env.is_main:
        folder.write_final(final)
        if final["status"] == "done":
            log.info("run %s done: best dev macro-F1 %.4f at step %d%s -> %s", cfg.run.name, final["dev_macro_f1"],
                     final["best_step"], "" if final["test_macro_f1"] is None
                     else f", test macro-F1 {final['test_macro_f1']:.4f}", folder.path)
    D.barrier(env)
    return final
