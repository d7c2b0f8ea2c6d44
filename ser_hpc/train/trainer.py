"""Training: one pack of runs in one process, one backbone forward per batch for all heads.

A pack is K runs that differ only in head settings (``packing.py``); a lone run is a pack
of one, so there is a single loop. Each batch goes through the frozen backbones once,
then through every head still training; each head (``head_run.py``) has its own optimizer,
lr schedule, early stopping, best checkpoint, dropout RNG stream and run folder, so every
run of a pack ends exactly as it would trained alone. Dev backbone outputs are computed
once per task (``eval_cache.py``) and reused at every evaluation of every head; test
clips go through the backbones once, for all heads, at the end.

The loop runs as one process, as DDP ranks, or (packs of one) under DeepSpeed, and
resumes exactly from the last checkpoint: data order, optimizers, lr schedules, RNG
streams and best-so-far are all restored.
"""
from __future__ import annotations

import logging
import random
import time
import traceback

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..data.augment import Augmenter
from ..data.dataset import Batch, TrainCrops, WholeClips, collate, length_sorted_batches
from ..data.prepared import PreparedAudio, audio_loader_for
from ..data.sources import Splits, load_splits
from ..features.dataset import CachedClips, CachedCrops, FeatureBatch, FeatureCollate
from ..features.extract import extract as extract_features
from ..features.store import FeatureStore
from ..models.encoders import BackboneOutput, FrozenBackbones
from . import distributed as D
from .eval_cache import EvalFeatureCache
from .head_run import HeadRun, Predictions, TrainingDiverged
from .packing import check_pack, needs_own_forward
from .preemption import Preempted, PreemptionFlag
from ..locks import hold_run_folders
from .run_folder import RunFolder, close_tracking
from .sampler import GlobalBatchSampler

log = logging.getLogger("ser_hpc.train")


class FeatureShapes(torch.nn.Module):
    """Stands in for the backbones in cached mode: the shapes heads are built for, no weights."""

    def __init__(self, store: FeatureStore):
        super().__init__()
        from types import SimpleNamespace
        self.tuned = False
        self.speech = SimpleNamespace(**store.meta["speech"]) if store.meta.get("speech") else None
        self.text = SimpleNamespace(**store.meta["text"]) if store.meta.get("text") else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PackTrainer:
    def __init__(self, cfgs: list[Config], splits: Splits, folders: list[RunFolder], env: D.DistEnv):
        for c in cfgs:
            c.data.labels = list(splits.labels)  # the resolved classes travel in config.yaml
        cfg = cfgs[0]  # every setting but the head's is the same across the pack
        self.cfg, self.splits, self.env = cfg, splits, env
        self.device = D.device_for(env, cfg.train.device)
        seed_everything(cfg.train.seed)
        modalities = cfg.model.modalities.split("+")
        self.with_audio = "audio" in modalities
        # Cached mode: no backbone is loaded; heads read the feature store (``ser_hpc/features``).
        self.store = self._feature_store(cfgs) if cfg.train.features == "cached" else None
        if self.store is not None:
            self.backbones = FeatureShapes(self.store)
            seed_everything(cfg.train.seed)  # extraction must not shift the heads' initialisation
        else:
            self.backbones = FrozenBackbones(cfg.model.speech.name if self.with_audio else None,
                                             cfg.model.text.name if "text" in modalities else None,
                                             cfg.data.max_text_tokens, cfg.model.speech.finetune_top_layers,
                                             cfg.model.text.finetune_top_layers).to(self.device)
            speech = self.backbones.speech
            if speech is not None and speech.sample_rate != cfg.data.sample_rate:
                raise ConfigError(f"data.sample_rate is {cfg.data.sample_rate} but speech model "
                                  f"{cfg.model.speech.name!r} expects {speech.sample_rate} Hz")
        # Frozen backbones: one forward feeds every head, and eval outputs never change.
        self.shared_forward = needs_own_forward(cfg.to_dict()) is None
        train_labels = [e.label for e in splits.train]
        self.heads = [HeadRun(c, f, self.backbones, train_labels, env, self.device, splits.labels_configured)
                      for c, f in zip(cfgs, folders)]
        if self.store is not None:
            self.store.check([e.id for e in splits.train + splits.dev + splits.test])
            self.collate = FeatureCollate(self.store)
            self.train_set = CachedCrops(splits.train, self.store, cfg.data.crop_seconds, cfg.data.augment_prob,
                                         cfg.train.seed)
        else:
            # Prepared 16 kHz audio when data.prepared_dir is set (decoded once by the grid's first job).
            self.audio_loader = audio_loader_for(cfg.data)
            if isinstance(self.audio_loader, PreparedAudio) and self.with_audio:
                self.audio_loader.check(splits.train + splits.dev + splits.test)
            augmenter = Augmenter(cfg.data.sample_rate, cfg.data.augment_prob, cfg.data.speeds, cfg.data.snr_db,
                                  cfg.data.noise_dir, cfg.data.rir_dir)
            self.collate = collate
            self.train_set = TrainCrops(splits.train, cfg.data.sample_rate, cfg.data.crop_seconds, augmenter,
                                        cfg.train.seed, self.with_audio, self.audio_loader)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.batch_size, cfg.train.seed, env)
        # A private generator: creating a loader iterator must not consume the global RNG.
        self.train_loader = DataLoader(self.train_set, batch_size=self.sampler.per_rank, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=self.collate,
                                       generator=torch.Generator().manual_seed(cfg.train.seed))
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // cfg.train.grad_accum_steps)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        for h in self.heads:
            h.total_steps = self.total_steps  # the lr schedule is a function of the step
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
        self._dev_cache: EvalFeatureCache | None = None
        # Online training with data.features_dir: dev and test backbone outputs go to a float16
        # store of just those clips, memory-mapped, instead of host RAM (an XLS-R pair's dev
        # set is ~25 GB in float32); without it, the in-memory cache (train.eval_cache_dtype).
        self.eval_store = self.store
        if self.store is None and cfg.data.features_dir and cfg.train.eval_cache and self.shared_forward:
            ids = {e.id for e in splits.dev + splits.test}
            self.eval_store = self._feature_store(cfgs, only=ids)
            log.info("evaluation features: %d clips, %.1f MB on disk (memory-mapped) in %s", len(ids),
                     self.eval_store.nbytes / 1e6, self.eval_store.folder)

    def _feature_store(self, cfgs: list[Config], only: set[str] | None = None) -> FeatureStore:
        """The pack's feature store; the main rank extracts it when no features job did."""
        if self.env.is_main:
            store = extract_features(cfgs, self.device, only=only)
        D.barrier(self.env)
        return store if self.env.is_main else extract_features(cfgs, self.device, only=only)

    # ---- forward passes -----------------------------------------------------------------
    def features(self, batch: Batch | FeatureBatch) -> BackboneOutput | None:
        """The shared backbone forward (no graph: the backbones are frozen), or the batch's
        cached features; None when each head's model must run its own backbones
        (fine-tuning, DeepSpeed)."""
        if isinstance(batch, FeatureBatch):
            f = batch.feats
            dtype = torch.bfloat16 if self.cfg.train.bf16 else torch.float32
            return BackboneOutput(*(None if t is None else t.to(self.device, dtype if t.is_floating_point() else t.dtype)
                                    for t in (f.speech, f.speech_mask, f.text, f.text_mask)),
                                  speech_layers=f.speech_layers, text_layers=f.text_layers)
        if not self.shared_forward:
            return None
        with torch.no_grad(), torch.autocast(**self.autocast):
            return self.backbones(batch.waves, batch.wave_lengths, batch.texts, self.device)

    def logits(self, head: HeadRun, batch: Batch | None, feats: BackboneOutput | None) -> torch.Tensor:
        with torch.autocast(**self.autocast):
            if feats is not None:
                return head.engine.forward(None, None, None, feats=feats).float()
            return head.engine.forward(batch.waves, batch.wave_lengths, batch.texts).float()

    # ---- evaluation ---------------------------------------------------------------------
    def eval_loader(self, examples, cached: bool = False) -> DataLoader:
        durations = [self.splits.durations.get(e.id, 0.0) for e in examples]
        store = self.eval_store if self.store is None and cached else self.store
        dataset = (CachedClips(examples, store) if store is not None
                   else WholeClips(examples, self.cfg.data.sample_rate, self.with_audio, self.audio_loader))
        return DataLoader(dataset, collate_fn=FeatureCollate(store) if store is not None else collate,
                          batch_sampler=length_sorted_batches(durations, self.cfg.data.eval_batch_size),
                          num_workers=self.cfg.data.num_workers)

    def _shard(self, heads: list[HeadRun]) -> bool:
        return self.env.enabled and all(h.engine.can_shard_eval for h in heads)

    def _eval_batches(self, examples, heads: list[HeadRun], cache: bool):
        """(ids, labels, batch, feats) over this rank's share of ``examples``."""
        mine = examples[self.env.rank::self.env.world] if self._shard(heads) else examples
        if cache and self.eval_store is not None:
            for batch in self.eval_loader(mine, cached=True):
                yield batch.ids, batch.labels, None, self.features(batch)
            return
        if cache and self.shared_forward and self.cfg.train.eval_cache and self.store is None:
            if self._dev_cache is None:
                self._dev_cache = EvalFeatureCache(self.features, self.eval_loader(mine), self.device,
                                                   self.cfg.train.eval_cache_dtype)
            for c in self._dev_cache:
                yield c.ids, c.labels, None, c.feats
            return
        for batch in self.eval_loader(mine):
            yield batch.ids, batch.labels, batch, self.features(batch)

    @torch.no_grad()
    def predict(self, heads: list[HeadRun], examples, cache: bool = False) -> dict[int, Predictions]:
        """Every head's predictions for ``examples``; each batch goes through the backbones
        once (or comes from the cache). Ranks score shards; all ranks get every prediction."""
        for h in heads:
            h.model.eval()
        ids, labels, logits = [], [], [[] for _ in heads]
        for batch_ids, batch_labels, batch, feats in self._eval_batches(examples, heads, cache):
            for k, h in enumerate(heads):
                logits[k].append(self.logits(h, batch, feats).cpu())
            ids += batch_ids
            labels.append(batch_labels)
        for h in heads:
            h.model.train()
        empty = torch.zeros(0, len(self.splits.labels))
        mine = (ids, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                [torch.cat(l) if l else empty for l in logits])
        shards = D.all_gather(mine, self.env) if self._shard(heads) else [mine]
        all_ids = [i for s in shards for i in s[0]]
        all_labels = torch.cat([s[1] for s in shards])
        return {k: h.predictions(all_ids, all_labels, torch.cat([s[2][k] for s in shards]))
                for k, h in enumerate(heads)}

    # ---- resume -------------------------------------------------------------------------
    def resume(self) -> tuple[int, int, int]:
        """Bring every head to one common data position; returns (step, epoch, batch_in_epoch).

        Finished heads keep their last checkpoint. Heads still training resume at the
        newest step for which all of them hold a checkpoint (a kill between two heads'
        checkpoints leaves them one evaluation apart); heads ahead of it replay the same
        batches and end exactly where they were.
        """
        if self.env.is_main:
            for h in self.heads:
                h.checkpoints.cleanup_partial()
        D.barrier(self.env)
        training = []
        for h in self.heads:
            saved = h.saved_state()
            if saved is not None and (saved.stopped_early or saved.step >= self.total_steps):
                h.resume(saved.step)
                h.status = "finished"
            else:
                training.append(h)
        common = set.intersection(*(set(h.checkpoints.steps()) for h in training)) if training else set()
        step = max(common, default=0)
        for h in training:
            if step:
                h.resume(step)
            else:
                h.start_fresh()
        D.barrier(self.env)
        if not training or not step:
            return 0, 0, 0
        s = training[0].state
        return s.step, s.epoch, s.batch_in_epoch

    # ---- training -----------------------------------------------------------------------
    def _batches(self, epoch: int, batch_in_epoch: int):
        """Endless (epoch, batch_in_epoch after it, micro-batch) from a data position on."""
        while True:
            self.sampler.set_epoch(epoch, batch_in_epoch)
            self.train_set.set_epoch(epoch)
            for batch in self.train_loader:
                batch_in_epoch += 1
                yield epoch, batch_in_epoch, batch
            epoch, batch_in_epoch = epoch + 1, 0

    def _log_start(self, step: int) -> None:
        if not self.env.is_main:
            return
        t = self.cfg.train
        heads = ", ".join(f"{h.name} ({h.trainable_parameters()} params)" for h in self.heads)
        log.info("pack of %d run(s): %d train / %d dev / %d test clips, %d steps (%d per epoch), %s on %s x%d, "
                 "%s backbone forward%s; %s", len(self.heads), len(self.splits.train), len(self.splits.dev),
                 len(self.splits.test), self.total_steps, self.steps_per_epoch, t.strategy, self.device,
                 self.env.world, "one shared" if self.shared_forward else "own",
                 f", resuming at step {step}" if step else "", heads)

    def fit(self, flag: PreemptionFlag) -> list[dict]:
        t = self.cfg.train
        step, epoch, batch_in_epoch = self.resume()
        self._log_start(step)
        ckpt_every = t.checkpoint_every or t.eval_every
        batches = self._batches(epoch, batch_in_epoch)
        window_t, window_clips = time.monotonic(), 0
        for h in self.heads:
            h.model.train()
        training = [h for h in self.heads if h.training]
        while training and step < self.total_steps:
            micro = []
            for _ in range(t.grad_accum_steps):
                epoch, batch_in_epoch, batch = next(batches)
                micro.append(batch)
            for h in training:
                h.begin_step([b.labels for b in micro])
            for batch in micro:
                feats = self.features(batch)
                for h in [h for h in training if h.training]:
                    try:
                        with h.rng:  # this head's dropout masks, whatever the others drew
                            logits = self.logits(h, batch, feats)
                        h.accumulate(logits, batch.labels)
                    except TrainingDiverged as exc:
                        h.fail(f"training diverged: {exc}")
                window_clips += len(batch.ids) * self.env.world
            step += 1
            stepped = [h for h in training if h.training]
            for h in stepped:
                h.finish_step()
                h.state.step, h.state.epoch, h.state.batch_in_epoch = step, epoch, batch_in_epoch
            if step % t.log_every == 0 and self.env.is_main:
                rate = window_clips / max(time.monotonic() - window_t, 1e-9)
                for h in stepped:
                    h.log_progress(self.total_steps, rate)
                window_t, window_clips = time.monotonic(), 0
            if step % t.eval_every == 0 or step == self.total_steps:
                dev = self.predict(stepped, self.splits.dev, cache=True)
                for k, h in enumerate(stepped):
                    h.record_evaluation(dev[k])
            preempted = D.any_true(flag.raised, self.env)
            for h in stepped:
                if step % ckpt_every == 0 or preempted or not h.training or step == self.total_steps:
                    h.save_checkpoint()
                if h.training and step == self.total_steps:
                    h.status = "finished"
            for h in training:
                if h.status == "failed":
                    h.write_final(h.final_record(None, False))  # a diverged head stops alone
            training = [h for h in training if h.training]
            if preempted and training:
                unfinished = [h.folder.path.name for h in self.heads if h.status != "failed"]
                raise Preempted(step, flag.signum or 0, unfinished)
        return self.finish()

    def finish(self) -> list[dict]:
        """Test predictions of every finished head in one pass; final records of all."""
        done = [h for h in self.heads if h.status == "finished"]
        tests: dict[int, Predictions] = {}
        if done and self.splits.test:
            for h in done:
                h.engine.load_best(h.folder)
            tests = self.predict(done, self.splits.test, cache=self.eval_store is not None)
        finals = []
        for h in self.heads:
            k = done.index(h) if h in done else None
            record = h.final_record(tests.get(k) if k is not None else None, self.splits.test_has_labels)
            if h.status != "failed":  # a diverged head wrote its record when it stopped
                h.write_final(record)
            finals.append(record)
        return finals


def train_pack(cfgs: list[Config], flag: PreemptionFlag | None = None) -> list[dict]:
    """Train a pack of runs (runs differing only in head settings) in this process, each
    into its own ``run.dir``; returns their final records (also written as final.json).

    Finished runs are skipped. Bad input raises before training starts, after recording
    the reason in every unfinished run's final.json so a grid's aggregation can report it.
    A diverged run ends as failed alone. On a preemption signal every run checkpoints and
    ``Preempted`` is raised; calling again resumes.

    Every run folder is locked first (``ser_hpc.locks``; the main rank holds the locks):
    while another live process trains one of them, ``LockHeld`` is raised before anything
    is written. A folder is claimed (config.yaml) only once the data and backbones checked out.
    """
    from pathlib import Path
    for cfg in cfgs:
        if not cfg.run.dir:
            raise ConfigError(f"config key 'run.dir' (the run folder) is not set for run {cfg.run.name!r}")
    check_pack(cfgs)  # a pack that cannot be is refused before any folder (or lock) is made
    env = D.detect()
    for c in cfgs:
        if c.run.dir and ".." in Path(c.run.dir).parts:
            log.warning("run.dir %s is the folder %s", c.run.dir, Path(c.run.dir).resolve())
    with hold_run_folders([c.run.dir for c in cfgs if c.run.dir], enabled=env.is_main):
        try:
            return _train_pack(cfgs, flag)
        finally:
            close_tracking([c.run.dir for c in cfgs if c.run.dir])


def _train_pack(cfgs: list[Config], flag: PreemptionFlag | None = None) -> list[dict]:
    env = D.detect()
    if env.enabled and cfgs[0].train.strategy == "single":
        raise ConfigError(f"{env.world} ranks were started but train.strategy is 'single'; use ddp or deepspeed")
    folders = [RunFolder(c.run.dir) for c in cfgs]
    if env.is_main:
        for cfg, folder in zip(cfgs, folders):
            folder.check_claim(cfg)  # another config's results are refused; nothing is written yet
    D.init(env, D.device_for(env, cfgs[0].train.device))
    D.barrier(env)
    finals: list[dict | None] = [f.read_final() if f.is_done() else None for f in folders]
    for cfg, final in zip(cfgs, finals):
        if final is not None:
            log.info("run %s already done in %s: skipping", cfg.run.name, cfg.run.dir)
    todo = [i for i, final in enumerate(finals) if final is None]
    if not todo:
        return finals
    start = time.monotonic()
    own_flag = flag is None
    flag = flag or PreemptionFlag().__enter__()
    trainer = None
    try:
        splits = load_splits(cfgs[0].data, needs_text=any("text" in c.model.modalities for c in cfgs))
        trainer = PackTrainer([cfgs[i] for i in todo], splits, [folders[i] for i in todo], env)
        if env.is_main:  # claimed only now that the data and backbones checked out
            for i in todo:
                folders[i].claim(cfgs[i])
        for i, record in zip(todo, trainer.fit(flag)):
            finals[i] = record
    except Preempted:
        raise
    except Exception as exc:
        # A head that diverged already recorded why; every other unfinished run gets this reason.
        diverged = {h.folder.path for h in trainer.heads if h.status == "failed"} if trainer else set()
        if env.is_main:
            for i in todo:
                if folders[i].path not in diverged:
                    folders[i].write_final({"run_id": folders[i].path.name, "name": cfgs[i].run.name,
                                            "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                                            "dev_macro_f1": None, "elapsed_s": round(time.monotonic() - start, 2),
                                            "traceback": traceback.format_exc(limit=8)})
        raise
    finally:
        if own_flag:
            flag.__exit__(None, None, None)
    D.barrier(env)
    return finals


def train_run(cfg: Config, flag: PreemptionFlag | None = None) -> dict:
    """Train one run into ``cfg.run.dir`` (a pack of one); returns its final record."""
    return train_pack([cfg], flag)[0]
