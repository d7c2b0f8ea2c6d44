"""Run each frozen backbone once over a corpus and write its hidden states to the store.

The grid's features job calls ``extract_for_pack`` once per distinct (backbones, data)
setting before the training array; a run in cached mode finds the store by the same key
(and extracts it itself when run alone with ``jobs/train.py``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
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
    """Hidden states the encoder returns; a missing checkpoint or an unsupported family is a
    BackboneError naming it."""
    from ..models.encoders import backbone_config
    from ..models.speech_families import speech_spec
    if kind == "speech":
        return speech_spec(name).num_states
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
        held = sorted({i for c in users for i in layers_used(getattr(c.model, kind).layers, n, f"model.{kind}.layers")})
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


def shard_plan(corpus: Corpus, shard_hours: float) -> list[list[int]]:
    """The corpus's clips (indices, in corpus order) in consecutive shards of at most
    ``shard_hours`` of audio each (0: one shard); each is one features array task."""
    if not shard_hours:
        return [list(range(len(corpus.examples)))]
    shards, current, seconds = [], [], 0.0
    for i, ex in enumerate(corpus.examples):
        d = corpus.durations.get(ex.id, 0.0)
        if current and seconds + d > shard_hours * 3600:
            shards.append(current)
            current, seconds = [], 0.0
        current.append(i)
        seconds += d
    return shards + [current] if current else shards


@dataclass
class Projection:
    """What a store will take on disk, from the encoders' configs and the clips' durations."""
    folder: Path
    clips: int
    hours: float
    views: int
    shards: int
    speech_bytes: int
    text_bytes: int
    layers: dict            # kind -> hidden states held
    free_bytes: int         # on the file system it goes to
    limit_gb: float         # data.features_max_gb (0: none)

    @property
    def bytes(self) -> int:
        return self.speech_bytes + self.text_bytes

    def describe(self) -> str:
        held = ", ".join(f"{k} {len(v)} layer(s)" for k, v in self.layers.items())
        return (f"{self.folder.name}: {self.clips} clips, {self.hours:.1f} h of audio, {held}, {self.views} view(s) "
                f"-> {self.bytes / 1e9:.2f} GB ({self.speech_bytes / 1e9:.2f} speech + {self.text_bytes / 1e9:.2f} "
                f"text), {self.shards} shard(s); {self.free_bytes / 1e9:.1f} GB free in {self.folder.parent}")


def project(cfgs: list[Config], corpus: Corpus | None = None) -> Projection:
    """The projected size of the store ``cfgs`` read: frames x hidden states held x width x 2 B
    per view (speech), tokens x states x width x 2 B (text). Reads configs and tokenizers, no weights."""
    import shutil
    from ..models.encoders import backbone_config
    from ..models.speech_families import frames_for, speech_spec
    cfg = _primary(cfgs)
    corpus = corpus or read_all_clips(cfg)
    spec = store_spec(cfgs, corpus)
    views = 1 + (spec["augment"]["copies"] if spec["augment"] else 0)
    speech = text = 0
    if spec["speech"]:
        enc = speech_spec(_encoder_name(cfgs, "speech"))
        frames = [max(1, int(frames_for(enc.frame_rule, int(corpus.durations[e.id] * enc.sample_rate))))
                  for e in corpus.examples]
        train = sum(f for e, f in zip(corpus.examples, frames) if e.id in corpus.train_ids)
        speech = shard_bytes(sum(frames) + (views - 1) * train, len(spec["speech"]["layers"]), enc.width)
    if spec["text"]:
        from transformers import AutoTokenizer
        name = _encoder_name(cfgs, "text")
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        tokens = sum(len(ids) for ids in tok([e.text for e in corpus.examples], truncation=True,
                                             max_length=cfg.data.max_text_tokens)["input_ids"])
        text = shard_bytes(tokens, len(spec["text"]["layers"]), int(backbone_config("text", name).hidden_size))
    folder = store_folder(cfg, spec)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return Projection(folder, len(corpus.examples), sum(corpus.durations.values()) / 3600, views,
                      len(shard_plan(corpus, cfg.data.features_shard_hours)), speech, text,
                      {k: spec[k]["layers"] for k in ("speech", "text") if spec[k]}, shutil.disk_usage(probe).free,
                      cfg.data.features_max_gb)


def _names(n_shards: int, k: int) -> tuple[str, str]:
    """(speech shard name for view ``{view}``, text shard name) of shard ``k``; a one-shard store
    keeps the plain names."""
    suffix = f"_s{k}" if n_shards > 1 else ""
    return f"speech_v{{view}}{suffix}.npy", f"text{suffix}.npy"


def _shard_done(folder: Path, n_shards: int, k: int, views: int, speech: bool, text: bool) -> bool:
    """Are shard ``k``'s files complete (every index written after its shard, sizes agree)?"""
    from .store import FeatureStoreError, Shard
    speech_name, text_name = _names(n_shards, k)
    files = ([speech_name.format(view=v) for v in range(views)] if speech else []) + ([text_name] if text else [])
    try:
        for name in files:
            Shard.open(folder / name)
    except FeatureStoreError:
        return False
    return True


def extract(cfgs: list[Config], device: torch.device | None = None, progress_every: float = 30.0,
            only: set[str] | None = None, shard: int | None = None) -> FeatureStore | None:
    """The store for this pack's heads: reused when complete, else extracted now.

    A corpus longer than ``data.features_shard_hours`` is written in shards: ``shard`` = one of
    them (a features array task), None = all in turn. A finished shard is never redone, so
    a killed extraction resumes at its first unfinished shard. Returns the store once every
    shard is there (the task that completes it writes meta.json), else None.

    ``only``: a store of just these clips, without augmented views (online training's
    evaluation cache: dev and test clips, memory-mapped instead of held in RAM)."""
    from ..models.backbones import FrozenBackbones
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
    plan = shard_plan(corpus, 0 if only is not None else cfg.data.features_shard_hours)
    views = 1 + (spec["augment"]["copies"] if spec["augment"] else 0)
    todo = [k for k in (range(len(plan)) if shard is None else [shard])
            if not _shard_done(folder, len(plan), k, views, bool(spec["speech"]), bool(spec["text"]))]
    if todo:
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbones = FrozenBackbones(spec["speech"] and _encoder_name(cfgs, "speech"),
                                    spec["text"] and _encoder_name(cfgs, "text"), cfg.data.max_text_tokens).to(device)
        projection = project(cfgs, corpus)
        log.info("feature store %s: %d clips (%d train with %d augmented view(s)) in %d shard(s), about %.1f MB on "
                 "disk; writing shard(s) %s", folder, len(corpus.examples), len(corpus.train_ids), views - 1,
                 len(plan), projection.bytes / 1e6, ", ".join(map(str, todo)))
        if backbones.speech is not None and getattr(backbones.speech, "frame_rule", {}).get("samples_per_frame"):
            log.info("%s", window_cost(corpus, backbones.speech.name))
        folder.mkdir(parents=True, exist_ok=True)
        check_free_space(folder, projection.bytes * sum(len(plan[k]) for k in todo) // max(1, len(corpus.examples)))
        for k in todo:
            _extract_shard(cfg, spec, corpus, [corpus.examples[i] for i in plan[k]], backbones, device, folder,
                           _names(len(plan), k), views, progress_every, f"shard {k + 1}/{len(plan)}")
    if not all(_shard_done(folder, len(plan), k, views, bool(spec["speech"]), bool(spec["text"]))
               for k in range(len(plan))):
        return None  # other shards are another task's; the last task to finish completes the store
    from ..models.speech_families import speech_spec
    from ..models.encoders import backbone_config
    speech = spec["speech"] and speech_spec(_encoder_name(cfgs, "speech"))
    meta = {"version": 1, "spec": spec, "views": views, "clips": len(corpus.examples), "shards": len(plan),
            "speech": speech and {"layers": spec["speech"]["layers"], "width": speech.width,
                                  "num_states": speech.num_states, "sample_rate": speech.sample_rate,
                                  "frame_rule": speech.frame_rule, "family": speech.family},
            "text": spec["text"] and {"layers": spec["text"]["layers"],
                                      "width": int(backbone_config("text", _encoder_name(cfgs, "text")).hidden_size),
                                      "num_states": _num_states("text", _encoder_name(cfgs, "text"))},
            "extract_seconds": round(time.monotonic() - start, 2)}
    write_json(folder / META, meta)  # last: the store is complete
    store = FeatureStore(folder, tuple(k for k in ("speech", "text") if spec[k]))
    log.info("feature store %s complete: %d clips x %d view(s) in %d shard(s), %.1f MB", folder,
             len(corpus.examples), views, len(plan), store.nbytes / 1e6)
    return store


def window_cost(corpus: Corpus, name: str) -> str:
    """What Whisper's 30 s window costs on this corpus: every window is a full forward."""
    seconds = [corpus.durations.get(e.id, 0.0) for e in corpus.examples]
    padded = sum(math.ceil(max(d, 1e-9) / 30) * 30 for d in seconds)
    return (f"speech model {name} (Whisper) pads every clip to 30 s windows: {len(seconds)} clips of mean "
            f"{sum(seconds) / max(1, len(seconds)):.1f} s cost {padded / max(sum(seconds), 1e-9):.1f}x the encoder "
            f"compute of their audio (a 3 s clip costs a 30 s forward)")


def _extract_shard(cfg: Config, spec: dict, corpus: Corpus, examples: list[Example], backbones, device, folder: Path,
                   names: tuple[str, str], views: int, progress_every: float, what: str) -> None:
    """Write one shard's files: every view of its speech (augmented views of its train clips),
    its text; each shard file is renamed into place, then its index."""
    start, last_log = time.monotonic(), time.monotonic()
    loader = audio_loader_for(cfg.data)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
    passes = [(0, WholeClips(examples, cfg.data.sample_rate, bool(spec["speech"]), loader), examples)]
    if views > 1:
        d = cfg.data
        augmenter = Augmenter(d.sample_rate, 1.0, d.speeds, d.snr_db, d.noise_dir, d.rir_dir)
        train = [e for e in examples if e.id in corpus.train_ids]
        passes += [(k, AugmentedClips(train, d.sample_rate, loader, augmenter, k), train) for k in range(1, views)]
    done, total_clips = 0, sum(len(ex) for _, _, ex in passes)
    text_writer = None
    for view, dataset, clips in passes:
        speech_writer = (ShardWriter(folder / names[0].format(view=view), len(spec["speech"]["layers"]),
                                     backbones.speech.width) if spec["speech"] else None)
        if view == 0 and spec["text"]:
            text_writer = ShardWriter(folder / names[1], len(spec["text"]["layers"]), backbones.text.width)
        batches = length_sorted_batches([corpus.durations[e.id] for e in clips], cfg.data.eval_batch_size)
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
                    log.info("features (%s): %d/%d clips (view %d), %.1f clips/s, ~%.0f s left", what, done,
                             total_clips, view, rate, (total_clips - done) / max(rate, 1e-9))
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
    log.info("features (%s): %d clips in %.1f s", what, total_clips, time.monotonic() - start)


def _write(writer: ShardWriter, ids: list[str], states: torch.Tensor, mask: torch.Tensor) -> None:
    """states [L, B, T, D] -> each clip's [frames, L, D] at its true length (no padding stored)."""
    states = states.float().permute(1, 2, 0, 3).cpu().numpy()
    lengths = mask.sum(1).tolist()
    for i, clip_id in enumerate(ids):
        writer.add(clip_id, states[i, : int(lengths[i])])
