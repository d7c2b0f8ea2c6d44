"""What to label: rows of an EmoSPeech-format CSV, or one clip, and their decoding.

Unlike the training reader (data.corpus.read_corpus), a missing or unreadable audio file
is not fatal here: one bad recording must not stop a batch of thousands from being
labelled, so audio problems become per-row errors and the rest is still labelled.
Structural problems (no id column, empty or duplicate ids, unknown labels) still fail
up front, naming the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ser_hpc.data.audio import AudioError, audio_info, fit_length, load_audio
from ser_hpc.data.corpus import CorpusError, _read_rows, unique_id_rows
from ser_hpc.data.dataset import WholeClips


@dataclass(frozen=True)
class InputRow:
    id: str
    audio_path: Path | None
    text: str | None      # None or blank: no transcription
    label: int | None     # gold label when the CSV has one
    row: int              # CSV line number (0 for a single clip)

    @property
    def has_text(self) -> bool:
        return bool(self.text and self.text.strip())

    def where(self) -> str:
        return f"row {self.row}, id {self.id}" if self.row else f"id {self.id}"


def _label_index(labels: tuple[str, ...]):
    exact = {name: i for i, name in enumerate(labels)}
    folded = {name.lower(): i for i, name in enumerate(labels)}
    return lambda raw: exact.get(raw, folded.get(raw.lower()))


def read_input_csv(csv_path: str | Path, audio_dir: str | Path, labels: tuple[str, ...]) -> list[InputRow]:
    """``id`` is required; ``transcription`` and ``label`` (a class of ``labels``) are optional columns."""
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    columns, records = _read_rows(csv_path, ("id",))
    index = _label_index(tuple(labels))
    rows = []
    for line, ident, rec in unique_id_rows(csv_path, records):
        raw_label = (rec.get("label") or "").strip() if "label" in columns else ""
        label = index(raw_label) if raw_label else None
        if raw_label and label is None:
            raise CorpusError(f"{csv_path}, row {line}: label {raw_label!r} is not one of the ensemble's classes "
                              f"{', '.join(labels)}")
        text = rec.get("transcription") if "transcription" in columns else None
        rows.append(InputRow(ident, audio_dir / ident, text, label, line))
    if not rows:
        raise CorpusError(f"{csv_path}: no rows")
    return rows


def probe_durations(rows: list[InputRow]) -> tuple[dict[int, float], dict[int, str]]:
    """Seconds per row from the file header (to batch by length), and per-row audio errors."""
    durations, errors = {}, {}
    for i, r in enumerate(rows):
        if r.audio_path is None or not r.audio_path.is_file():
            errors[i] = f"audio file not found: {r.audio_path}"
            continue
        try:
            info = audio_info(r.audio_path)
        except AudioError as exc:
            errors[i] = str(exc)
            continue
        if info.frames <= 0 or info.samplerate <= 0:
            errors[i] = f"audio file {r.audio_path} is empty (0 samples)"
            continue
        durations[i] = info.frames / info.samplerate
    return durations, errors


class DecodedRows(Dataset):
    """Row index -> {"index", "waves": {sample_rate: samples} or None, "error"}.

    Decoding happens in DataLoader workers; a decode failure is returned, not raised, so
    it is reported for that row alone. Clips shorter than the training job's minimum are
    repeat-padded exactly as evaluation did, so whole clips score as they did on dev.
    """

    def __init__(self, rows: list[InputRow], sample_rates: list[int]):
        self.rows, self.sample_rates = rows, sample_rates

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        path = self.rows[index].audio_path
        waves = {}
        try:
            for sr in self.sample_rates:
                wave = load_audio(path, sr)
                minimum = int(WholeClips.MIN_SECONDS * sr)
                waves[sr] = fit_length(wave, minimum) if len(wave) < minimum else wave
        except AudioError as exc:
            return {"index": index, "waves": None, "error": str(exc)}
        return {"index": index, "waves": waves, "error": None}


def as_list(items: list[dict]) -> list[dict]:
    """DataLoader collate: keep items as they are (batching happens per backbone group)."""
    return items


def silence(n: int = 1) -> np.ndarray:
    """Stand-in waveform for text-only groups, which never look at audio."""
    return np.zeros(n, np.float32)
