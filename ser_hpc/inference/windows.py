"""Long clips are scored over overlapping windows whose probabilities are averaged.

The heads were trained on crops of training clips and evaluated on whole clips of at most
15 s (the longest EmoSPeech training clip), so that is the longest input they are known to
handle: a clip longer than the window is cut into windows of exactly ``window`` samples,
``hop`` apart (default 50 % of the window), with the last window aligned to the clip's end
so every sample is covered and every window is full length. A clip no longer than the
window is scored whole, exactly as the training job scored its dev clips. Members that
read text get the row's whole transcription with every window (there is no alignment to
cut it by), so for them the windows differ only in their audio.
"""
from __future__ import annotations

DEFAULT_WINDOW_S = 15.0      # longest training clip in EmoSPeech 2024
DEFAULT_HOP_FRACTION = 0.5   # 50 % overlap between consecutive windows


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Start samples of the windows covering ``n`` samples: [0] when the clip fits."""
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be positive, got {window} and {hop}")
    if n <= window:
        return [0]
    starts = list(range(0, n - window, hop))
    starts.append(n - window)  # the last window ends at the clip's end
    return starts
