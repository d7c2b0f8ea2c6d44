"""One clip as a corpus file lists it, before its label is mapped to a class id.

Every corpus format (``corpus.py`` EmoSPeech CSVs, ``manifest.py``, ``emobox.py``) reads into
``RawClip``; ``labels.py`` then maps raw labels onto the run's ordered class list, giving an
``Example`` per clip.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and row."""


@dataclass(frozen=True)
class Example:
    """A clip ready to train on: its label is an index into the run's class list."""
    id: str
    audio_path: Path
    text: str
    label: int | None  # None for an unlabelled test row
    row: int           # line in its file, for error messages
    source: str = ""   # that file
    speaker: str | None = None


@dataclass(frozen=True)
class RawClip:
    id: str                 # unique within the corpus; names the clip in every output
    audio_path: Path
    label: str | None       # the raw label as the corpus writes it; None when unlabelled
    text: str | None        # transcription; None when the corpus has none
    speaker: str | None     # None when unknown
    split: str | None       # "train" / "dev" / "test" when the corpus says so
    source: str             # the file this row came from
    row: int                # its line there (CSV/TSV: header = line 1; JSON Lines: line number)

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"
