"""Run each frozen backbone once over a corpus and write its hidden states to the store.

The grid's features job calls ``extract_for_pack`` once per distinct (backbones, data)
setting before the training array; a run in cached mode finds the store by the same key
(and extracts it itself when run alone with ``jobs/train.py``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.augment import Augmenter
from ..data.corpus import Example, check_audio
from ..data.sources import all_clips
from ..data.dataset import WholeClips, collate, length_sorted_batches
from ..data.prepared import audio_loader_for
from ..content_hash import file_hashes
from ..models.head import layers_used
from .store import META, FeatureStore, ShardWriter, check_free_space, content_key, \
    model_fingerprint, shard_bytes
from ..atomic_io import write_json

log = logging.getLogger("ser_hpc.features")
AUGMENT_SEED = 20240924  # the views are a property of the store, not of a run's seed


@dataclass
class Corpus:
    examples: list[Example]   # every clip of train, dev and test CSVs, each id once
    train_ids: set[str]       # clips of the train CSV(s): they get augmented views
    durations: dict[str, float]


def read_all_clips(cfg: Config) -> Corpus:
    """Every clip of the configured corpus once (any data.format), with its duration."""
    clips, train_ids = all_clips(cfg.data)  # CorpusError names a clip id used for two files
    examples = [Example(c.id, c.audio_path, c.text or "", None, c.row, source=c.source, speaker=c.speaker)
                for c in clips]
    durations = dict(zip((e.id for e in examples), check_audio(examples)))
    return Corpus(examples, train_ids, durations)


def _num_states(kind: str, name: str) -> int:
    from ..models.encoders import backbone_config  # a missing checkpoint: a BackboneError naming it
    return int(backbone_config(kind, name).num_hidden_layers) + 1


def _primary(cfgs: list[Config]) -> Config:
    """The config whose encoders and data settings a store follows: a fused run's if any."""
    return next((c for c in cfgs if "+" in c.model.modalities), cfgs[0])


def _encoder_name(cfgs: list[Config], kind: str) -> str:
    """The ``kind`` ("speech" / "text") encoder of the first config that reads it."""
    modality = "audio" if kind == "speech" else "text"
    return next(getattr(c.model, kind).name for c in cfgs if modality in c.model.modalities.split("+"))


def store_spec(cfgs: list[Config], corpus: Corpus) -> dict:
    """Everything that changes what the store holds; its hash is the store's folder name.

    The store holds every modality any of ``cfgs`` uses (a grid's features job may serve
    fused, text-only and audio-only heads from one store); the corpus is fingerprinted per
    modality (ids, audio, texts), so a run of one modality can read a store that holds both."""
    cfg = _primary(cfgs)
    modalities = {m for c in cfgs for m in c.model.modalities.split("+")}
    spec: dict = {"sample_rate": cfg.data.sample_rate, "speech": None, "text": None}
    for kind, modality in (("speech", "audio"), ("text", "text")):
        if modality not in modalities:
            continue
        users = [c for c in cfgs if modality in c.model.modalities.split("+")]
        name = _encoder_name(cfgs, kind)
        n = _num_states(kind, name)
        held = sorted({i for c in users for i in layers_used(getattr(c.model, kind).layers, n)})
        spec[kind] = {"model": model_fingerprint(name), "layers": held}
    d = cfg.data
    spec["augment"] = ({"copies": d.cached_augment_copies, "speeds": d.speeds, "snr_db": d.snr_db,
                        "noise_dir": d.noise_dir, "rir_dir": d.rir_dir, "seed": AUGMENT_SEED}
                       if d.cached_augment_copies and spec["speech"] else None)
    ids, audio, texts = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    sources = file_hashes([ex.audio_path for ex in corpus.examples]) if spec["speech"] else []
    for k, ex in enumerate(corpus.examples):
        ids.update(f"{ex.id}\t{ex.id in corpus.train_ids}\n".encode())
        if spec["speech"]:
            audio.update(f"{ex.id}\t{sources[k]}\n".encode())
        if spec["text"]:
            texts.update(f"{ex.id}\t{ex.text}\n".encode())
    spec["corpus"] = ids.hexdigest()
    if spec["speech"]:
        spec["speech"]["audio"] = audio.hexdigest()
    if spec["text"]:
        spec["text"]["max_tokens"] = cfg.data.max_text_tokens
        spec["text"]["texts"] = texts.hexdigest()
    return spec


def _without_views(cfg: Config) -> Config:
    import copy
    cfg = copy.deepcopy(cfg)
    cfg.data.cached_augment_copies = 0
    return cfg


def _without_layers(spec: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "layers"} if k in ("speech", "text") and v else v)
            for k, v in spec.items()}


def store_folder(cfg: Config, spec: dict) -> Path:
    """``<base>-<layers>``: the base key names the corpus/backbones/augmentation, the suffix the layers held."""
    layers = {k: spec[k]["layers"] for k in ("speech", "text") if spec[k]}
    return Path(cfg.data.features_dir) / f"{content_key(_without_layers(spec))}-{content_key(layers)[:8]}"


def holds(held: dict, spec: dict) -> bool:
    """Does a store extracted for ``held`` serve ``spec``: the same corpus and, for each
    modality ``spec`` reads, the same encoder and text/audio fingerprint with at least its layers?
    (A store may hold more layers, or a modality ``spec`` does not read.)"""
    if held.get("sample_rate") != spec["sample_rate"] or held.get("corpus") != spec["corpus"]:
        return False
    if spec["speech"] and held.get("augment") != spec["augment"]:  # the views are speech views
        return False
    for kind in ("speech", "text"):
        want, have = spec[kind], held.get(kind)
        if want is None:
            continue
        if not have or {**have, "layers": None} != {**want, "layers": None} \
                or not set(want["layers"]) <= set(have["layers"]):
            return False
    return True


def find_store(cfg: Config, spec: dict) -> FeatureStore | None:
    """A complete store serving ``spec`` (``holds``), opened as holding only the modalities
    ``spec`` reads: the exact one, or one with more layers (a grid's features job extracts
    the union of the layers all its heads read) or more modalities (the fused runs' store
    serves the text-only and audio-only runs of the same encoders)."""
    exact = store_folder(cfg, spec)
    others = sorted(p for p in exact.parent.glob("*") if p != exact) if exact.parent.is_dir() else []
    modalities = tuple(k for k in ("speech", "text") if spec[k])
    for folder in [exact] + others:
        if not (folder / META).is_file():
            continue
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # another store's unreadable meta is not this run's problem
        if holds(meta.get("spec") or {}, spec):
            return FeatureStore(folder, modalities)
    return None


def _clip_rng(view: int, clip_id: str) -> np.random.Generator:
    return np.random.default_rng([AUGMENT_SEED, view, int(hashlib.sha256(clip_id.encode()).hexdigest()[:12], 16)])


class AugmentedClips(WholeClips):
    """View K of the train clips: each whole clip under one augmentation drawn for (K, clip)."""

    def __init__(self, examples, sample_rate, audio_loader, augmenter: Augmenter, view: int):
        super().__init__(examples, sample_rate, True, audio_loader)
        self.augmenter, self.view = augmenter, view

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        rng = _clip_rng(self.view, item["id"])
        item["wave"] = self.augmenter.apply(item["wave"], self.augmenter.choose(rng, force=True), rng)
        return item


def _estimate_bytes(spec: dict, corpus: Corpus, backbones, views: int) -> int:
    total = 0
    if spec["speech"]:
        enc = backbones.speech
        samples = torch.tensor([int(corpus.durations[e.id] * enc.sample_rate) for e in corpus.examples])
        frames = enc.frame_lengths(samples).clamp_min(1)
        n_train = sum(int(f) for e, f in zip(corpus.examples, frames) if e.id in corpus.train_ids)
        rows = int(frames.sum()) + (views - 1) * n_train
        total += shard_bytes(rows, len(spec["speech"]["layers"]), enc.width)
    if spec["text"]:
        enc = backbones.text
        tokens = sum(len(ids) for ids in enc.tokenizer([e.text for e in corpus.examples], truncation=True,
                                                       max_length=enc.max_tokens)["input_ids"])
        total += shard_bytes(tokens, len(spec["text"]["layers"]), enc.width)
    return total


def extract(cfgs: list[Config], device: torch.device | None = None, progress_every: float = 30.0,
            only: set[str] | None = None) -> FeatureStore:
    """The store for this pack's heads: reused when complete, else extracted now.

    ``only``: a store of just these clips, without augmented views (online training's
    evaluation cache: dev and test clips, memory-mapped instead of held in RAM)."""
    from ..models.encoders import FrozenBackbones
    cfg = _primary(cfgs)
    if not cfg.data.features_dir:
        from ..config import ConfigError
        raise ConfigError("data.features_dir is not set: nowhere to store the features")
    corpus = read_all_clips(cfg)
    if only is not None:
        corpus = Corpus([e for e in corpus.examples if e.id in only], set(), corpus.durations)
        cfgs = [_without_views(c) for c in cfgs]
    spec = store_spec(cfgs, corpus)
    folder = store_folder(cfg, spec)
    store = find_store(cfg, spec)
    if store is not None:
        log.info("feature store %s reused: %d clips, %.1f MB", store.folder, store.meta["clips"], store.nbytes / 1e6)
        return store
    start = time.monotonic()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbones = FrozenBackbones(spec["speech"] and _encoder_name(cfgs, "speech"), spec["text"] and _encoder_name(cfgs, "text"),
                                cfg.data.max_text_tokens).to(device)
    views = 1 + (spec["augment"]["copies"] if spec["augment"] else 0)
    need = _estimate_bytes(spec, corpus, backbones, views)
    log.info("feature store %s: %d clips (%d train with %d augmented view(s)), about %.1f MB on disk",
             folder, len(corpus.examples), len(corpus.train_ids), views - 1, need / 1e6)
    folder.mkdir(parents=True, exist_ok=True)
    check_free_space(folder, need)
    loader = audio_loader_for(cfg.data)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
    plan = [(0, WholeClips(corpus.examples, cfg.data.sample_rate, bool(spec["speech"]), loader), corpus.examples)]
    if views > 1:
        d = cfg.data
        augmenter = Augmenter(d.sample_rate, 1.0, d.speeds, d.snr_db, d.noise_dir, d.rir_dir)
        train = [e for e in corpus.examples if e.id in corpus.train_ids]
        plan += [(k, AugmentedClips(train, d.sample_rate, loader, augmenter, k), train) for k in range(1, views)]
    done, total_clips, last_log = 0, sum(len(ex) for _, _, ex in plan), time.monotonic()
    text_writer = None
    for view, dataset, examples in plan:
        speech_writer = (ShardWriter(folder / f"speech_v{view}.npy", len(spec["speech"]["layers"]),
                                     backbones.speech.width) if spec["speech"] else None)
        if view == 0 and spec["text"]:
            text_writer = ShardWriter(folder / "text.npy", len(spec["text"]["layers"]), backbones.text.width)
        batches = length_sorted_batches([corpus.durations[e.id] for e in examples], cfg.data.eval_batch_size)
        try:
            for idx in batches:
                batch = collate([dataset[i] for i in idx])
                with torch.no_grad(), torch.autocast(**autocast):
                    if speech_writer:
                        states, mask = backbones.speech(batch.waves.to(device), batch.wave_lengths.to(device))
                        _write(speech_writer, batch.ids, states[spec["speech"]["layers"]], mask)
                    if view == 0 and text_writer:
                        states, mask = backbones.text(batch.texts, device)
                        _write(text_writer, batch.ids, states[spec["text"]["layers"]], mask)
                done += len(idx)
                if time.monotonic() - last_log > progress_every:
                    rate = done / (time.monotonic() - start)
                    log.info("features: %d/%d clips (view %d), %.1f clips/s, ~%.0f s left", done, total_clips,
                             view, rate, (total_clips - done) / max(rate, 1e-9))
                    last_log = time.monotonic()
        except BaseException:
            for w in (speech_writer, text_writer):
                if w is not None:
                    w.abort()
            raise
        if speech_writer:
            speech_writer.close()
        if view == 0 and text_writer:
            text_writer.close()
    meta = {"version": 1, "spec": spec, "views": views, "clips": len(corpus.examples),
            "speech": spec["speech"] and {"layers": spec["speech"]["layers"], "width": backbones.speech.width,
                                          "num_states": backbones.speech.num_states,
                                          "sample_rate": backbones.speech.sample_rate,
                                          "conv_kernel": list(backbones.speech.backbone.config.conv_kernel),
                                          "conv_stride": list(backbones.speech.backbone.config.conv_stride)},
            "text": spec["text"] and {"layers": spec["text"]["layers"], "width": backbones.text.width,
                                      "num_states": backbones.text.num_states},
            "extract_seconds": round(time.monotonic() - start, 2)}
    write_json(folder / META, meta)  # last: the store is complete
    store = FeatureStore(folder, tuple(k for k in ("speech", "text") if spec[k]))
    log.info("feature store %s written: %d clips x %d view(s), %.1f MB in %.1f s", folder, len(corpus.examples),
             views, store.nbytes / 1e6, meta["extract_seconds"])
    return store


def _write(writer: ShardWriter, ids: list[str], states: torch.Tensor, mask: torch.Tensor) -> None:
    """states [L, B, T, D] -> each clip's [frames, L, D] at its true length (no padding stored)."""
    states = states.float().permute(1, 2, 0, 3).cpu().numpy()
    lengths = mask.sum(1).tolist()
    for i, clip_id in enumerate(ids):
        writer.add(clip_id, states[i, : int(lengths[i])])
