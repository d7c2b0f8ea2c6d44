"""Reading a generic corpus manifest: CSV, TSV or JSON Lines, one clip per row.

The user names the columns (``data.columns``); every problem is reported with the file and
the row (CSV/TSV: the line, header = line 1; JSON Lines: the physical line), and the
config key to change where one applies. Audio is only checked to exist: the caller reads
the headers.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from .clips import RawClip
from .corpus import CorpusError, _not_utf8

LOGICAL = ("audio", "label", "text", "speaker", "split", "id")
SUFFIXES = (".csv", ".tsv", ".jsonl")
SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev", "val": "dev", "test": "test"}

Rows = list[tuple[int, dict[str, str]]]


def read_manifest(path: str | Path, audio_dir: str | Path | None, columns: Mapping[str, str | None] | None = None,
                  *, require_labels: bool = True) -> list[RawClip]:
    """Every row of the manifest as a ``RawClip`` (labels raw, audio paths absolute).

    ``columns`` maps logical names (audio, label, text, speaker, split, id) to the file's
    column names; unnamed ones default to themselves. A column mapped to None or "" is
    ignored (its field is None for every row).
    """
    path = Path(path).expanduser()
    names, explicit = _column_names(columns)
    if path.suffix.lower() not in SUFFIXES:
        raise CorpusError(f"{path}: unknown manifest format {path.suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(SUFFIXES)} (comma-separated, tab-separated, JSON Lines)")
    if not path.is_file():
        raise CorpusError(f"manifest not found: {path} (data.manifest; looked for {path.absolute()})")
    try:
        found, rows = _read_rows(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not rows:
        raise CorpusError(f"{path}: the manifest has no rows")
    cols = _resolve_columns(path, names, explicit, found, require_labels)
    base = _audio_base(path, audio_dir)
    clips = [_clip(path, line, rec, cols, base, require_labels) for line, rec in rows]
    _check_ids(path, clips)
    _check_audio(path, clips)
    return clips


def _column_names(columns: Mapping[str, str | None] | None) -> tuple[dict[str, str | None], set[str]]:
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(LOGICAL))
    if unknown:
        raise CorpusError(f"data.columns: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(LOGICAL)}")
    for key, value in columns.items():
        if value is not None and not isinstance(value, str):
            raise CorpusError(f"data.columns.{key} must be a column name (a string), got {value!r}")
    names = {key: columns.get(key, key) for key in LOGICAL}
    return names, set(columns)


def _read_rows(path: Path) -> tuple[list[str], Rows]:
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    return _read_delimited(path, "\t" if path.suffix.lower() == ".tsv" else ",")


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], Rows]:
    # TSV transcripts often hold bare quotes (Common Voice does): no quoting for TSV.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
        header = [(c or "").strip() for c in reader.fieldnames or []]
        if not any(header):
            raise CorpusError(f"{path}: the file is empty (no header row)")
        reader.fieldnames = header
        rows: Rows = []
        for rec in reader:
            if None in rec:  # more fields than the header names
                sep = "tab" if delimiter == "\t" else "comma"
                n_fields = len(header) + len(rec[None])
                raise CorpusError(f"{path}, row {reader.line_num}: {n_fields} fields but the header "
                                  f"has {len(header)}; a value holds a {sep}: quote it"
                                  + (" (TSV values are not quoted: remove the tab)" if delimiter == "\t" else ""))
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in rec.items()}))
    return header, rows


def _read_jsonl(path: Path) -> tuple[list[str], Rows]:
    keys: dict[str, None] = {}
    rows: Rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}, row {line}: not valid JSON ({exc.msg} at column {exc.colno}): "
                                  f"{_short(text)}") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}, row {line}: expected a JSON object ({{...}}), got {type(rec).__name__}")
            keys.update(dict.fromkeys(rec))
            rows.append((line, {k: _text(v) for k, v in rec.items()}))
    return list(keys), rows


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _short(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _resolve_columns(path: Path, names: dict[str, str | None], explicit: set[str], found: list[str],
                     require_labels: bool) -> dict[str, str | None]:
    """The file column for each logical name, or None where the file has none."""
    cols: dict[str, str | None] = {}
    listing = ", ".join(found) or "none"
    for key, name in names.items():
        required = key == "audio" or (key == "label" and require_labels)
        if not name:
            if required:
                raise CorpusError(f"data.columns.{key} is empty but {path} needs a {key} column")
            cols[key] = None
        elif name in found:
            cols[key] = name
        elif required or key in explicit:
            hint = "" if key in explicit else f" (set data.columns.{key} to the column that holds it)"
            raise CorpusError(f"{path}: no column {name!r} for data.columns.{key}{hint}; columns found: {listing}")
        else:
            cols[key] = None
    return cols


def _audio_base(path: Path, audio_dir: str | Path | None) -> Path:
    if audio_dir is None or str(audio_dir) == "":
        return path.parent.absolute()
    base = Path(audio_dir).expanduser().absolute()
    if not base.is_dir():
        raise CorpusError(f"audio folder not found: {base} (data.audio_dir, for {path})")
    return base


def _clip(path: Path, line: int, rec: dict[str, str], cols: dict[str, str | None], base: Path,
          require_labels: bool) -> RawClip:
    def get(key: str) -> str | None:
        col = cols[key]
        return None if col is None else rec.get(col, "")

    where = f"{path}, row {line}"
    audio = get("audio")
    if not audio:
        raise CorpusError(f"{where}: empty audio value (column {cols['audio']!r})")
    ident = get("id") if cols["id"] is not None else audio
    if not ident:
        raise CorpusError(f"{where}: empty id (column {cols['id']!r})")
    label = get("label") or None
    if label is None and require_labels:
        raise CorpusError(f"{where}: empty label (column {cols['label']!r})")
    audio_path = Path(audio).expanduser()
    return RawClip(id=ident, audio_path=audio_path if audio_path.is_absolute() else base / audio_path,
                   label=label, text=get("text"), speaker=get("speaker") or None,
                   split=_split(where, get("split")), source=str(path), row=line)


def _split(where: str, value: str | None) -> str | None:
    if not value:
        return None
    split = SPLITS.get(value.lower())
    if split is None:
        raise CorpusError(f"{where}: split {value!r} is not one of train, dev (or valid/validation/val), test")
    return split


def _check_ids(path: Path, clips: list[RawClip]) -> None:
    first: dict[str, int] = {}
    for clip in clips:
        if clip.id in first:
            raise CorpusError(f"{path}, row {clip.row}: duplicate id {clip.id!r} (first on row {first[clip.id]})")
        first[clip.id] = clip.row


def _check_audio(path: Path, clips: list[RawClip]) -> None:
    missing = [c for c in clips if not c.audio_path.is_file()]
    if missing:
        c = missing[0]
        more = (f" ({len(missing)} of {len(clips)} audio files are missing; check data.audio_dir)"
                if len(missing) > 1 else "")
        raise CorpusError(f"{c.where}: audio file not found: {c.audio_path}{more}")
