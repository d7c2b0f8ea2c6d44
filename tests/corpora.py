"""Small real corpora on disk for tests: a generic manifest corpus and an EmoBox-layout one.

Audio is synthesised (fast numpy): a harmonic voice whose pitch, pitch movement, tremolo and
breathiness depend on the class, shifted per speaker, plus noise, so a model can learn a
little. Each corpus has one stereo 48 kHz wav and one flac (22.05 kHz mono) among 16 kHz
mono wavs, to exercise decoding, downmixing and resampling.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

CLASSES = ("anger", "contempt", "fear", "joy", "sadness")
EMOBOX_CODES = {"ang": "Angry", "con": "Contempt", "fea": "Fear", "joy": "Happy", "sad": "Sad"}
_CODE_OF = dict(zip(CLASSES, EMOBOX_CODES))

# class -> (pitch Hz, pitch slope per second, tremolo Hz, breath noise level)
_VOICE = {"anger": (210.0, 40.0, 7.0, 0.05), "contempt": (140.0, -20.0, 2.0, 0.10),
          "fear": (290.0, 10.0, 11.0, 0.20), "joy": (250.0, 80.0, 4.0, 0.05),
          "sadness": (115.0, -40.0, 1.5, 0.15)}
_WORDS = {"anger": "furious outrageous", "contempt": "pathetic ridiculous", "fear": "scared danger",
          "joy": "wonderful delighted", "sadness": "lonely miserable"}
_NEUTRAL_WORDS = ("the meeting is at noon", "I walked to the station", "there are two chairs")


@dataclass(frozen=True)
class _Clip:
    label: str
    speaker: int
    index: int
    rel: Path       # path relative to the audio folder
    sr: int
    channels: int
    seconds: float


def _synth(rng: np.random.Generator, label: str, speaker: int, seconds: float, sr: int) -> np.ndarray:
    pitch, slope, tremolo, breath = _VOICE[label]
    pitch *= 0.85 + 0.07 * (speaker % 6) + rng.uniform(-0.05, 0.05)  # speaker offset
    t = np.arange(int(seconds * sr)) / sr
    f0 = pitch + slope * t + 3.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(h * phase) / h for h in range(1, 5))
    fade = np.minimum(1.0, 20 * t) * np.minimum(1.0, 20 * (t[-1] - t))
    envelope = (1 - 0.25 * (1 + np.sin(2 * np.pi * tremolo * t))) * fade
    wave = voice * envelope + rng.normal(0, breath + 0.02, t.size)
    return (0.3 * wave / np.max(np.abs(wave))).astype(np.float32)


def _plan(n_per_class: int, speakers: int, seed: int, folder: str = "") -> list[_Clip]:
    """Every clip: class c's j-th clip goes to speaker j % speakers, so each speaker has every class."""
    rng = np.random.default_rng(seed)
    plan = []
    for c, label in enumerate(CLASSES):
        for j in range(n_per_class):
            spk = j % speakers
            plan.append(_Clip(label, spk, j, Path(folder or f"spk{spk}") / f"spk{spk}_{label}_{j:02d}.wav",
                              16000, 1, round(float(rng.uniform(0.5, 1.5)), 3)))
    # One stereo 48 kHz wav and one 22.05 kHz flac among the 16 kHz mono wavs.
    a, b = plan[1], plan[len(plan) // 2]
    plan[1] = _Clip(a.label, a.speaker, a.index, a.rel, 48000, 2, a.seconds)
    plan[len(plan) // 2] = _Clip(b.label, b.speaker, b.index, b.rel.with_suffix(".flac"), 22050, 1, b.seconds)
    return plan


def _write_audio(audio_dir: Path, plan: list[_Clip], seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    for clip in plan:
        wave = _synth(rng, clip.label, clip.speaker, clip.seconds, clip.sr)
        if clip.channels == 2:
            wave = np.stack([wave, 0.5 * wave], axis=1)
        path = audio_dir / clip.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wave, clip.sr, subtype="PCM_16")


def _text(clip: _Clip) -> str:
    # The words carry the class for two clips in three; the rest are neutral wording.
    if clip.index % 3 == 2:
        return _NEUTRAL_WORDS[clip.index % len(_NEUTRAL_WORDS)]
    return f"this is {_WORDS[clip.label]}"


def _split(clip: _Clip, speakers: int) -> str:
    # Speaker-independent: the last speaker is test, the one before dev (spelled "valid").
    if clip.speaker == speakers - 1:
        return "test"
    return "valid" if clip.speaker == speakers - 2 else "train"


def make_manifest_corpus(root: Path, fmt: str = "csv", n_per_class: int = 12, speakers: int = 6,
                         with_text: bool = False, with_split: bool = False, seed: int = 0) -> Path:
    """Write ``root/manifest.<fmt>`` and audio under ``root/audio/spk<N>/``; return the manifest.

    Columns: audio (relative to ``root/audio``: pass that as audio_dir), label, speaker, and
    text / split when asked (split needs >= 3 speakers; dev rows say "valid").
    """
    if fmt not in ("csv", "tsv", "jsonl"):
        raise ValueError(f"fmt must be csv, tsv or jsonl, got {fmt!r}")
    if with_split and speakers < 3:
        raise ValueError("with_split needs at least 3 speakers")
    root = Path(root)
    plan = _plan(n_per_class, speakers, seed)
    _write_audio(root / "audio", plan, seed)
    rows = []
    for clip in plan:
        row = {"audio": clip.rel.as_posix(), "label": clip.label, "speaker": f"spk{clip.speaker}"}
        if with_text:
            row["text"] = _text(clip)
        if with_split:
            row["split"] = _split(clip, speakers)
        rows.append(row)
    path = root / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return path


def _emobox_record(name: str, clip: _Clip) -> dict:
    frames = int(clip.seconds * clip.sr)
    return {"key": f"{name}-{clip.rel.stem}", "dataset": name, "wav": f"downloads/{name}/wav/{clip.rel.name}",
            "type": "raw", "sample_rate": clip.sr, "num_frame": float(frames), "task": "category",
            "length": frames / clip.sr, "emo": _CODE_OF[clip.label], "channel": clip.channels}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_emobox_corpus(root: Path, name: str = "minicorp", n_per_class: int = 12, speakers: int = 6,
                       folds: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """An EmoBox-layout corpus; returns (data_root = root/data/<name>, audio_dir = root).

    Raw emo values are codes (ang, con, fea, joy, sad); label_map.json maps them to display
    names. Fold k tests on the speakers s with s % folds == k - 1 and trains on the rest.
    """
    if not 1 <= folds <= speakers:
        raise ValueError(f"folds must be between 1 and speakers ({speakers}), got {folds}")
    root = Path(root)
    plan = _plan(n_per_class, speakers, seed, folder=".")
    _write_audio(root / "downloads" / name / "wav", plan, seed)
    data_root = root / "data" / name
    records = [_emobox_record(name, clip) for clip in plan]
    _write_jsonl(data_root / f"{name}.jsonl", records)
    (data_root / "label_map.json").write_text(json.dumps(EMOBOX_CODES, indent=4), encoding="utf-8")
    for k in range(1, folds + 1):
        # With a single fold, test on speaker 0 only.
        test_speakers = {s for s in range(speakers) if s % folds == k - 1} if folds > 1 else {0}
        train = [r for r, c in zip(records, plan) if c.speaker not in test_speakers]
        test = [r for r, c in zip(records, plan) if c.speaker in test_speakers]
        _write_jsonl(data_root / f"fold_{k}" / f"{name}_train_fold_{k}.jsonl", train)
        _write_jsonl(data_root / f"fold_{k}" / f"{name}_test_fold_{k}.jsonl", test)
    return data_root, root
