"""Reading EmoBox's published metadata (github.com/emo-box/EmoBox, ``data/<corpus>/``).

The folder holds ``<corpus>.jsonl`` (every clip: key, dataset, wav, type, sample_rate,
num_frame, task, length, emo, channel), ``label_map.json`` (raw ``emo`` value -> display
name, in class order) and ``fold_K/<corpus>_{train,test}_fold_K.jsonl``; a few corpora (MELD,
M3ED, MSP-Podcast) add ``<corpus>_valid_fold_K.jsonl``, the official dev set. ``wav`` paths
are relative to the folder holding EmoBox's ``downloads/``. The repository also has stray
copies (``*_fold1.jsonl``, ``*.json``): the ``_fold_K.jsonl`` name wins.
A clip's label is its label_map.json key (``emo`` itself, or the one key equal to it ignoring
case: EmoBox's emodb writes "neutral" against a "Neutral" key).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .clips import RawClip
from .corpus import CorpusError, _not_utf8
from .folds import check_leakage

log = logging.getLogger("ser_hpc.data.emobox")

REQUIRED = ("key", "wav", "emo")
_FOLD_DIR = re.compile(r"fold_(\d+)$")
_LAYOUT = "data.root must be EmoBox's data/<corpus>/ folder (holding <corpus>.jsonl, label_map.json and fold_K/)"


@dataclass
class EmoBoxCorpus:
    name: str                                           # the corpus folder name, e.g. "emodb"
    clips: list[RawClip]                                # from <name>.jsonl, in file order
    label_order: list[str]                              # label_map.json's keys (raw emo values), in file order
    folds: dict[int, tuple[list[str], list[str]]]       # fold -> (train ids, test ids)
    label_map: dict[str, str] = field(default_factory=dict)   # raw emo -> display name (IEMOCAP: hap, exc -> Happy)
    valid: dict[int, list[str]] = field(default_factory=dict)  # fold -> official dev ids, where EmoBox has them

    @property
    def display_order(self) -> list[str]:
        """The distinct display names in label_map order: EmoBox's own class list."""
        return list(dict.fromkeys(self.label_map.values()))


def read_emobox(root: str | Path, audio_dir: str | Path | None, *, check_audio: bool = True) -> EmoBoxCorpus:
    """The clips, class order and folds of one EmoBox corpus folder; refuses leaking folds."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise CorpusError(f"data.root {root} is not a folder; {_LAYOUT}")
    # The corpus is named by the folder as given (a symlink's own name), else by its target's.
    names = list(dict.fromkeys([Path(os.path.normpath(root)).name, root.resolve().name]))
    name = next((n for n in names if (root / f"{n}.jsonl").is_file()), names[0])
    meta = root / f"{name}.jsonl"
    if not meta.is_file():
        others = sorted(p.name for p in root.glob("*.jsonl"))
        raise CorpusError(f"{meta} not found; {_LAYOUT}"
                          + (f"; .jsonl files found there: {', '.join(others)}" if others else ""))
    label_map = _read_label_map(root / "label_map.json")
    base = Path(audio_dir).expanduser().absolute() if audio_dir not in (None, "") else root
    clips = _read_clips(meta, label_map, base, name)
    known = {c.id for c in clips}
    folds, valid = _read_folds(root, name, known)
    if check_audio:
        _check_audio(meta, clips, base)
    return EmoBoxCorpus(name=name, clips=clips, label_order=list(label_map), folds=folds,
                        label_map=label_map, valid=valid)


def _read_json_lines(path: Path) -> list[tuple[int, dict]]:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            lines = list(enumerate(fh, start=1))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    records = []
    for line, text in lines:
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}, row {line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise CorpusError(f"{path}, row {line}: expected a JSON object ({{...}}), got {type(rec).__name__}")
        records.append((line, rec))
    return records


def _read_label_map(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CorpusError(f"{path} not found; {_LAYOUT}. If your copy has none (EmoBox's emovo folder lacks it), "
                          'write one mapping each raw emo value to a display name, e.g. {"ang": "Angry", ...}')
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict) or not data:
        raise CorpusError(f"{path}: expected a non-empty JSON object mapping raw emo values to display names")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise CorpusError(f"{path}: the display name of {bad[0]!r} is {data[bad[0]]!r}, not a string")
    return data


def _fields(path: Path, line: int, rec: dict) -> tuple[str, str, str]:
    missing = [k for k in REQUIRED if k not in rec or rec[k] in (None, "")]
    if missing:
        raise CorpusError(f"{path}, row {line}: record has no {', '.join(repr(k) for k in missing)} "
                          f"(keys: {', '.join(rec) or 'none'})")
    return str(rec["key"]), str(rec["wav"]), str(rec["emo"])


def _read_clips(meta: Path, label_map: dict[str, str], base: Path, name: str) -> list[RawClip]:
    clips: list[RawClip] = []
    first: dict[str, int] = {}
    respelled: dict[str, str] = {}
    for line, rec in _read_json_lines(meta):
        key, wav, emo = _fields(meta, line, rec)
        if key in first:
            raise CorpusError(f"{meta}, row {line}: duplicate key {key!r} (first on row {first[key]})")
        first[key] = line
        emo = _label_key(meta, line, key, emo, label_map, respelled)
        speaker = rec.get("speaker")
        wav_path = Path(wav)
        clips.append(RawClip(id=key, audio_path=wav_path if wav_path.is_absolute() else base / wav_path,
                             label=emo, text=None, speaker=None if speaker in (None, "") else str(speaker),
                             split=None, source=str(meta), row=line))
    if not clips:
        raise CorpusError(f"{meta}: no records")
    for emo, key in respelled.items():
        log.warning("%s: emo %r is spelled %r in label_map.json; read as %r", meta, emo, key, key)
    return clips


def _label_key(meta: Path, line: int, key: str, emo: str, label_map: dict[str, str],
               respelled: dict[str, str]) -> str:
    """The label_map key for a record's emo: exact, else the one key equal ignoring case.

    EmoBox's own emodb writes "neutral" in the records and "Neutral" in label_map.json.
    """
    if emo in label_map:
        return emo
    same = [k for k in label_map if k.casefold() == emo.casefold()]
    if len(same) == 1:
        respelled[emo] = same[0]
        return same[0]
    raise CorpusError(f"{meta}, row {line}: emo {emo!r} (key {key!r}) is not in "
                      f"{meta.parent / 'label_map.json'}, whose labels are {', '.join(label_map)}")


def _fold_file(folder: Path, name: str, part: str, k: int, required: bool) -> Path | None:
    # EmoBox's loader reads <name>_<part>_fold_K.jsonl; older copies only have ..._foldK.jsonl.
    tried = [folder / f"{name}_{part}_fold_{k}.jsonl", folder / f"{name}_{part}_fold{k}.jsonl"]
    for path in tried:
        if path.is_file():
            return path
    if required:
        found = sorted(p.name for p in folder.glob("*.jsonl"))
        raise CorpusError(f"{folder}: no {part} list for fold {k} (looked for {tried[0].name} and {tried[1].name}); "
                          f".jsonl files there: {', '.join(found) or 'none'}")
    return None


def _fold_keys(path: Path, known: set[str]) -> list[str]:
    keys: list[str] = []
    first: dict[str, int] = {}
    for line, rec in _read_json_lines(path):
        if rec.get("key") in (None, ""):
            raise CorpusError(f"{path}, row {line}: record has no 'key' (keys: {', '.join(rec) or 'none'})")
        key = str(rec["key"])
        if key not in known:
            raise CorpusError(f"{path}, row {line}: key {key!r} is not in the corpus metadata "
                              f"({path.parent.parent.name}.jsonl)")
        if key in first:
            raise CorpusError(f"{path}, row {line}: duplicate key {key!r} (first on row {first[key]})")
        first[key] = line
        keys.append(key)
    if not keys:
        raise CorpusError(f"{path}: no records")
    return keys


def _read_folds(root: Path, name: str, known: set[str]) -> tuple[dict[int, tuple[list[str], list[str]]],
                                                                   dict[int, list[str]]]:
    numbers = sorted(int(m.group(1)) for p in root.iterdir()
                     if p.is_dir() and (m := _FOLD_DIR.fullmatch(p.name)))
    if not numbers:
        raise CorpusError(f"{root}: no fold_K/ folders; {_LAYOUT}")
    folds: dict[int, tuple[list[str], list[str]]] = {}
    valid: dict[int, list[str]] = {}
    for k in numbers:
        folder = root / f"fold_{k}"
        train = _fold_keys(_fold_file(folder, name, "train", k, True), known)
        test = _fold_keys(_fold_file(folder, name, "test", k, True), known)
        where = f"fold {k} of {root}"
        check_leakage(train, test, where)
        folds[k] = (train, test)
        dev_file = _fold_file(folder, name, "valid", k, False)
        if dev_file is not None:
            dev = _fold_keys(dev_file, known)
            check_leakage(train, dev, where, names=("train", "valid"))
            check_leakage(dev, test, where, names=("valid", "test"))
            valid[k] = dev
    return folds, valid


def _check_audio(meta: Path, clips: list[RawClip], base: Path) -> None:
    missing = [c for c in clips if not c.audio_path.is_file()]
    if missing:
        shown = "; ".join(f"{c.audio_path} (row {c.row})" for c in missing[:5])
        raise CorpusError(f"{len(missing)} of {len(clips)} audio files listed in {meta} are missing, e.g. {shown}. "
                          f"data.audio_dir should be the folder that holds EmoBox's downloads/ (now {base}); "
                          f"the wav paths are relative to it")
