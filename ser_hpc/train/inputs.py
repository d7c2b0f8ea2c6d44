"""What the heads of a pack share: the backbones (or the feature store that replaces them),
the training batches, and one pass of clips through the backbones for every head.

Dev backbone outputs are computed once per task and reused at every evaluation of every
head (``eval_cache.py``, or a memory-mapped store with ``data.features_dir``); cached
training (``train.features=cached``) loads no backbone at all and reads the store.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..data.augment import Augmenter
from ..data.dataset import Batch, TrainCrops, WholeClips, collate, length_sorted_batches
from ..data.prepared import PreparedAudio, audio_loader_for
from ..data.sources import Splits
from ..features.dataset import CachedClips, CachedCrops, FeatureBatch, FeatureCollate
from ..features.extract import extract as extract_features
from ..features.store import FeatureStore
from ..models.backbones import FrozenBackbones
from ..models.encoders import BackboneOutput
from . import distributed as D
from .eval_cache import EvalFeatureCache
from .packing import needs_own_forward
from .sampler import GlobalBatchSampler

log = logging.getLogger("ser_hpc.train")


class FeatureShapes(torch.nn.Module):
    """Stands in for the backbones in cached mode: the shapes heads are built for, no weights."""

    def __init__(self, store: FeatureStore):
        super().__init__()
        self.tuned = False
        self.speech = SimpleNamespace(**store.meta["speech"]) if store.meta.get("speech") else None
        self.text = SimpleNamespace(**store.meta["text"]) if store.meta.get("text") else None


class PackInputs:
    def __init__(self, cfgs: list[Config], splits: Splits, env: D.DistEnv, device: torch.device):
        cfg = cfgs[0]  # every setting but the head's is the same across the pack
        self.cfg, self.splits, self.env, self.device = cfg, splits, env, device
        modalities = cfg.model.modalities.split("+")
        self.with_audio = "audio" in modalities
        self.store = self._feature_store(cfgs) if cfg.train.features == "cached" else None
        if self.store is not None:
            self.backbones = FeatureShapes(self.store)
            self.store.check([e.id for e in splits.train + splits.dev + splits.test])
            self.collate = FeatureCollate(self.store)
            self.train_set = CachedCrops(splits.train, self.store, cfg.data.crop_seconds, cfg.data.augment_prob,
                                         cfg.train.seed)
        else:
            self.backbones = FrozenBackbones(cfg.model.speech.name if self.with_audio else None,
                                             cfg.model.text.name if "text" in modalities else None,
                                             cfg.data.max_text_tokens, cfg.model.speech.finetune_top_layers,
                                             cfg.model.text.finetune_top_layers).to(device)
            speech = self.backbones.speech
            if speech is not None and speech.sample_rate != cfg.data.sample_rate:
                raise ConfigError(f"data.sample_rate is {cfg.data.sample_rate} but speech model "
                                  f"{cfg.model.speech.name!r} expects {speech.sample_rate} Hz")
            # Prepared 16 kHz audio when data.prepared_dir is set (decoded once by the grid's first job).
            self.audio_loader = audio_loader_for(cfg.data)
            if isinstance(self.audio_loader, PreparedAudio) and self.with_audio:
                self.audio_loader.check(splits.train + splits.dev + splits.test)
            augmenter = Augmenter(cfg.data.sample_rate, cfg.data.augment_prob, cfg.data.speeds, cfg.data.snr_db,
                                  cfg.data.noise_dir, cfg.data.rir_dir)
            self.collate = collate
            self.train_set = TrainCrops(splits.train, cfg.data.sample_rate, cfg.data.crop_seconds, augmenter,
                                        cfg.train.seed, self.with_audio, self.audio_loader)
        # Frozen backbones: one forward feeds every head, and eval outputs never change.
        self.shared_forward = needs_own_forward(cfg.to_dict()) is None
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.batch_size, cfg.train.seed, env)
        # A private generator: creating a loader iterator must not consume the global RNG.
        self.train_loader = DataLoader(self.train_set, batch_size=self.sampler.per_rank, sampler=self.sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=self.collate,
                                       generator=torch.Generator().manual_seed(cfg.train.seed))
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // cfg.train.grad_accum_steps)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
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

    def batches(self, epoch: int, batch_in_epoch: int):
        """Endless (epoch, batch_in_epoch after it, micro-batch) from a data position on."""
        while True:
            self.sampler.set_epoch(epoch, batch_in_epoch)
            self.train_set.set_epoch(epoch)
            for batch in self.train_loader:
                batch_in_epoch += 1
                yield epoch, batch_in_epoch, batch
            epoch, batch_in_epoch = epoch + 1, 0

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

    def logits(self, engine, batch: Batch | None, feats: BackboneOutput | None) -> torch.Tensor:
        """One head's logits (``engine`` wraps its model): on the shared output, or its own forward."""
        with torch.autocast(**self.autocast):
            if feats is not None:
                return engine.forward(None, None, None, feats=feats).float()
            return engine.forward(batch.waves, batch.wave_lengths, batch.texts).float()

    # ---- evaluation ---------------------------------------------------------------------
    def _eval_loader(self, examples, cached: bool = False) -> DataLoader:
        durations = [self.splits.durations.get(e.id, 0.0) for e in examples]
        store = self.eval_store if self.store is None and cached else self.store
        dataset = (CachedClips(examples, store) if store is not None
                   else WholeClips(examples, self.cfg.data.sample_rate, self.with_audio, self.audio_loader))
        return DataLoader(dataset, collate_fn=FeatureCollate(store) if store is not None else collate,
                          batch_sampler=length_sorted_batches(durations, self.cfg.data.eval_batch_size),
                          num_workers=self.cfg.data.num_workers)

    def _sharded(self, engines) -> bool:
        return self.env.enabled and all(e.can_shard_eval for e in engines)

    def _eval_batches(self, examples, engines, cache: bool):
        """(ids, labels, batch, feats) over this rank's share of ``examples``."""
        mine = examples[self.env.rank::self.env.world] if self._sharded(engines) else examples
        if cache and self.eval_store is not None:
            for batch in self._eval_loader(mine, cached=True):
                yield batch.ids, batch.labels, None, self.features(batch)
            return
        if cache and self.shared_forward and self.cfg.train.eval_cache and self.store is None:
            if self._dev_cache is None:
                self._dev_cache = EvalFeatureCache(self.features, self._eval_loader(mine), self.device,
                                                   self.cfg.train.eval_cache_dtype)
            for c in self._dev_cache:
                yield c.ids, c.labels, None, c.feats
            return
        for batch in self._eval_loader(mine):
            yield batch.ids, batch.labels, batch, self.features(batch)

    @torch.no_grad()
    def logits_of(self, engines, examples, cache: bool = False) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
        """(ids, labels, logits of each engine's model) for ``examples``; each batch goes through
        the backbones once (or comes from the cache). Ranks score shards; all ranks get all."""
        for e in engines:
            e.model.eval()
        ids, labels, logits = [], [], [[] for _ in engines]
        for batch_ids, batch_labels, batch, feats in self._eval_batches(examples, engines, cache):
            for k, e in enumerate(engines):
                logits[k].append(self.logits(e, batch, feats).cpu())
            ids += batch_ids
            labels.append(batch_labels)
        for e in engines:
            e.model.train()
        empty = torch.zeros(0, len(self.splits.labels))
        mine = (ids, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                [torch.cat(l) if l else empty for l in logits])
        shards = D.all_gather(mine, self.env) if self._sharded(engines) else [mine]
        return ([i for s in shards for i in s[0]], torch.cat([s[1] for s in shards]),
                [torch.cat([s[2][k] for s in shards]) for k in range(len(engines))])
