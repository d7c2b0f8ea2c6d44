"""A synthetic stand-in for the EmoSPeech 2024 corpus, in its exact release format.

No dataset host is reachable, so tests and the demo grid train on clips synthesised here.
Both modalities carry the label, neither perfectly: sentences come from emotion templates
but ~30 % of emotional clips use neutral wording (text alone must miss them; ``sentences.py``),
and the audio is a speech-like harmonic signal whose prosody (pitch, range, jitter, rate,
level, brightness) depends on the emotion, blurred by per-speaker and per-clip variation
(``voice.py``). This module draws the clips and writes the corpus.

Layout (as released): train.csv (id,label,transcription), test.csv (id,transcription),
test_labels.csv (id,label), audio/<id>; manifest.json is written last and marks a
completed corpus, so a rerun with the same parameters is a no-op.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ser_hpc.atomic_io import atomic_open, write_bytes, write_json
from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from ser_hpc.demo.sentences import make_sentence
from ser_hpc.demo.voice import make_speakers, synthesize

GENERATOR_VERSION = 2
MANIFEST = "manifest.json"
ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}\.[a-z0-9]+$")

# MEACorpus train counts (of 3000). Fear (0.8 % there) is lifted to 6 % (floor 2): with
# 1.7 % a 180-clip test set held 3 fear clips, so one clip moved test macro-F1 by ~5 points
# and 12 training clips could not teach the class; 6 % gives ~43 train / ~11 test.
MEA_COUNTS = {"neutral": 1166, "disgust": 705, "anger": 399, "joy": 362, "sadness": 345, "fear": 23}
FEAR_SHARE, FEAR_MIN = 0.06, 2
DURATION_S = (2.0, 5.0)  # clip length range: enough syllables for rate and pitch cues, short to encode
SF_FORMATS = {"mp3": ("MP3", None), "wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}


def class_counts(n: int) -> dict[str, int]:
    """MEACorpus proportions scaled to ``n`` (largest remainder), fear lifted as above."""
    fear = max(FEAR_MIN, round(FEAR_SHARE * n))
    rest = {k: v for k, v in MEA_COUNTS.items() if k != "fear"}
    total = sum(rest.values())
    raw = {k: (n - fear) * v / total for k, v in rest.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - fear - sum(counts.values())]:
        counts[k] += 1
    counts["fear"] = fear
    return {k: counts[k] for k in LABELS}


def _encode(audio: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    fmt, subtype = SF_FORMATS[audio_format]
    buf = io.BytesIO()
    # MP3 at libsndfile's compression level 0.9 (VBR, ~40 kbit/s, like web-sourced clips):
    # encoding is most of the corpus build time, and the default level takes ~1.7x longer.
    extra = {"compression_level": 0.9} if fmt == "MP3" else {}
    sf.write(buf, audio, sample_rate, format=fmt, subtype=subtype, **extra)
    return buf.getvalue()


def _render_clip(job: tuple) -> None:
    """Synthesise and write one clip (a top-level function so worker processes can run it)."""
    clip, speaker, seed, sample_rate, audio_format, audio_dir = job
    crng = np.random.default_rng([seed, clip["seed"]])
    y = synthesize(crng, clip["label"], speaker, clip["duration_s"], sample_rate)
    if clip["channels"] == 2:  # a slightly different second channel, to exercise downmixing
        y = np.stack([y, 0.9 * y + crng.normal(0, 1e-3, len(y))], 1)
    write_bytes(Path(audio_dir) / clip["id"], _encode(y.astype(np.float32), sample_rate, audio_format))


def _default_workers() -> int:
    # the CPUs this process may use (a Slurm allocation, not the whole node)
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with atomic_open(path, "w") as fh:
        w = csv.writer(fh, lineterminator="\n")  # QUOTE_MINIMAL, like the release files
        w.writerow(header)
        w.writerows(rows)


def _load_complete(out_dir: Path, params: dict) -> dict | None:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    if not all((out_dir / f).is_file() for f in manifest["files"].values()):
        return None
    if not all((out_dir / "audio" / cid).is_file() for cid in manifest["clips"]):
        return None  # a clip deleted by hand: regenerate rather than fail later in training
    return manifest


def _with_paths(out_dir: Path, manifest: dict) -> dict:
    out = dict(manifest)
    out["root"] = str(out_dir)
    out.update({f"{k}_path": str(out_dir / v) for k, v in manifest["files"].items()})
    out["audio_dir"] = str(out_dir / "audio")
    return out


def generate_corpus(out_dir, n_train: int = 720, n_test: int = 180, seed: int = 1234,
                    audio_format: str = "mp3", sample_rate: int = 44100, progress: bool = True,
                    workers: int | None = None) -> dict:
    """Write (or reuse) a demo corpus in ``out_dir``; returns its manifest plus absolute paths.

    Keys: params, counts, files, clips (id -> split/label/duration_s/channels/speaker/
    ambiguous_text), root, audio_dir, train_path, test_path, test_labels_path.
    Clips are rendered by ``workers`` processes (default: the usable CPUs, at most 8); the
    output does not depend on it.
    """
    out_dir = Path(out_dir)
    audio_format = audio_format.lower().lstrip(".")
    if audio_format not in SF_FORMATS:
        raise ValueError(f"audio_format must be one of {sorted(SF_FORMATS)}, got {audio_format!r}")
    params = {"n_train": n_train, "n_test": n_test, "seed": seed, "audio_format": audio_format,
              "sample_rate": sample_rate, "generator_version": GENERATOR_VERSION}
    done = _load_complete(out_dir, params)
    if done is not None:
        return _with_paths(out_dir, done)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # whatever follows is partial until the end
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)

    # the whole plan comes from one generator; each clip's audio from its own seed, so a
    # clip does not depend on how many came before it
    rng = np.random.default_rng(seed)
    speakers = make_speakers(rng, 24)
    plan, ids = [], set()
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [lab for lab, c in class_counts(n).items() for _ in range(c)]
        rng.shuffle(labels)
        for lab in labels:
            while (cid := f"{rng.integers(16**8):08x}-{rng.integers(16**8):08x}.{audio_format}") in ids:
                pass
            ids.add(cid)
            text, ambiguous = make_sentence(rng, lab)
            plan.append({"id": cid, "split": split, "label": lab, "transcription": text,
                         "ambiguous_text": ambiguous, "speaker": int(rng.integers(len(speakers))),
                         "duration_s": round(float(rng.uniform(*DURATION_S)), 3),
                         "channels": 2 if rng.random() < 0.10 else 1,
                         "seed": int(rng.integers(2**31))})

    jobs = [(c, speakers[c["speaker"]], seed, sample_rate, audio_format, str(audio_dir)) for c in plan]
    workers = workers or _default_workers()
    bar = tqdm(total=len(jobs), desc=f"demo corpus -> {out_dir}", unit="clip", disable=not progress)
    if workers == 1 or len(jobs) < 40:
        for job in jobs:
            _render_clip(job)
            bar.update()
    else:  # spawn, not fork: the caller may hold torch/OpenMP threads that fork would break
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_render_clip, jobs, chunksize=4):
                bar.update()
    bar.close()

    train = [c for c in plan if c["split"] == "train"]
    test = [c for c in plan if c["split"] == "test"]
    _write_csv(out_dir / "train.csv", ["id", "label", "transcription"],
               [[c["id"], c["label"], c["transcription"]] for c in train])
    _write_csv(out_dir / "test.csv", ["id", "transcription"], [[c["id"], c["transcription"]] for c in test])
    _write_csv(out_dir / "test_labels.csv", ["id", "label"], [[c["id"], c["label"]] for c in test])
    for f in audio_dir.iterdir():  # leftovers of an earlier corpus with other parameters
        if ID_RE.match(f.name) and f.name not in ids:
            f.unlink()

    manifest = {
        "params": params,
        "files": {"train": "train.csv", "test": "test.csv", "test_labels": "test_labels.csv"},
        "counts": {"train": class_counts(n_train), "test": class_counts(n_test)},
        "clips": {c["id"]: {k: c[k] for k in ("split", "label", "duration_s", "channels", "speaker",
                                              "ambiguous_text")} for c in plan},
    }
    write_json(out_dir / MANIFEST, manifest)  # last: marks the corpus complete
    return _with_paths(out_dir, manifest)


# A second corpus for benchmark grids: another class set (4 of the 6, under raw codes that a
# label map names), other speakers, balanced classes, a manifest with a speaker column (so
# folds can be generated speaker-independently), FLAC at 22.05 kHz.
VARIANTS = {"acted": {"codes": {"A": "anger", "H": "joy", "N": "neutral", "S": "sadness"}, "speakers": 8,
                      "seed_offset": 7919, "format": "flac", "sample_rate": 22050}}


def generate_variant_corpus(out_dir, variant: str = "acted", n_per_class: int = 60, seed: int = 1234,
                            progress: bool = True, workers: int | None = None) -> dict:
    """Write (or reuse) a variant corpus in ``out_dir``: manifest.csv (path,emotion,text,speaker)
    and audio/. Returns its manifest plus absolute paths (``manifest_path``, ``audio_dir``) and
    the label map from its raw codes to class names."""
    spec = VARIANTS[variant]
    out_dir = Path(out_dir)
    params = {"variant": variant, "n_per_class": n_per_class, "seed": seed, "generator_version": GENERATOR_VERSION}
    done = _load_complete(out_dir, params)
    if done is not None:
        return {**_with_paths(out_dir, done), "manifest_path": str(out_dir / "manifest.csv"),
                "label_map": spec["codes"]}
    (out_dir / MANIFEST).unlink(missing_ok=True)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + spec["seed_offset"])
    speakers = make_speakers(rng, spec["speakers"])
    plan = []
    for code, label in spec["codes"].items():
        for k in range(n_per_class):
            text, ambiguous = make_sentence(rng, label)
            plan.append({"id": f"{variant}-{code}-{k:03d}.{spec['format']}", "label": label, "code": code,
                         "transcription": text, "ambiguous_text": ambiguous, "split": "all",
                         "speaker": k % spec["speakers"], "duration_s": round(float(rng.uniform(*DURATION_S)), 3),
                         "channels": 1, "seed": int(rng.integers(2**31))})
    jobs = [(c, speakers[c["speaker"]], seed, spec["sample_rate"], spec["format"], str(audio_dir)) for c in plan]
    bar = tqdm(total=len(jobs), desc=f"{variant} corpus -> {out_dir}", unit="clip", disable=not progress)
    workers = workers or _default_workers()
    if workers == 1 or len(jobs) < 40:
        for job in jobs:
            _render_clip(job)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_render_clip, jobs, chunksize=4):
                bar.update()
    bar.close()
    _write_csv(out_dir / "manifest.csv", ["path", "emotion", "text", "speaker"],
               [[c["id"], c["code"], c["transcription"], f"spk{c['speaker']}"] for c in plan])
    manifest = {"params": params, "files": {"manifest": "manifest.csv"},
                "counts": {"all": {label: n_per_class for label in spec["codes"].values()}},
                "clips": {c["id"]: {k: c[k] for k in ("split", "label", "duration_s", "channels", "speaker",
                                                      "ambiguous_text")} for c in plan}}
    write_json(out_dir / MANIFEST, manifest)  # last: marks the corpus complete
    return {**_with_paths(out_dir, manifest), "manifest_path": str(out_dir / "manifest.csv"),
            "label_map": spec["codes"]}
