"""Audio decoding, resampling and cropping.

soundfile decodes (torchaudio 2.9 has no I/O of its own without FFmpeg); torchaudio
resamples. The public code fed 44.1 kHz audio to 16 kHz models: every clip here is
resampled to the backbone's rate.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio


class AudioError(ValueError):
    """An audio file cannot be used; the message names it."""


@functools.lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    # The transform precomputes its filter kernel; building it per clip costs more than resampling.
    return torchaudio.transforms.Resample(orig_sr, target_sr)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return wave
    with torch.no_grad():
        out = _resampler(orig_sr, target_sr)(torch.from_numpy(np.ascontiguousarray(wave)))
    return out.numpy()


# libsndfile's answer for an mp3 it cannot parse, whatever the reason: it misleads.
_MISLEADING = "File does not exist or is not a regular file (possibly a pipe?)"


def why_unreadable(path: str | Path, exc: Exception) -> str:
    """Why libsndfile could not open ``path``, in words that name the real problem.

    For an .mp3 that is empty or not audio at all, libsndfile says the file "does not
    exist or is not a regular file (possibly a pipe?)"; look at the file instead.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"audio file not found: {path}"
    except OSError as err:
        return f"audio file {path} cannot be read: {err}"
    if not path.is_file():
        return f"audio file {path} is not a regular file"
    if size == 0:
        return f"audio file {path} is empty (0 bytes)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as err:
        return f"audio file {path} cannot be read: {err}"
    said = str(exc).replace(f"Error opening {str(path)!r}: ", "").strip()
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        what = f"it starts with text ({head.decode('ascii')[:24]!r}...), e.g. an error page saved under an audio name"
    else:
        what = f"it starts with bytes {head[:8].hex(' ')}"
    detail = "" if _MISLEADING in said else f"; libsndfile: {said}"
    return (f"unreadable audio file {path} ({size} bytes): not audio that can be decoded (wav, flac, ogg, mp3); "
            f"{what}{detail}")


def audio_info(path: str | Path):
    """soundfile's header info; ``AudioError`` saying what is wrong when it cannot be read."""
    try:
        return sf.info(str(path))
    except Exception as exc:  # libsndfile raises RuntimeError/LibsndfileError variants
        raise AudioError(why_unreadable(path, exc)) from None


def why_undecodable(path: str | Path, exc: Exception) -> str:
    """Why decoding ``path`` failed: a header that reads but a stream that does not (an mp3
    corrupt in the middle), or whatever ``why_unreadable`` finds."""
    try:
        info = sf.info(str(path))
    except Exception:
        return why_unreadable(path, exc)
    return (f"audio file {path} is corrupt: its header reads ({info.format}, {info.frames} frames at "
            f"{info.samplerate} Hz) but its stream does not decode (libsndfile: {str(exc).strip() or type(exc).__name__})")


def load_audio(path: str | Path, target_sr: int) -> np.ndarray:
    """Decode, downmix to mono and resample: float32 samples at ``target_sr``."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(why_undecodable(path, exc)) from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} is empty (0 samples)")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(np.ascontiguousarray(mono, dtype=np.float32), sr, target_sr)


def fit_length(wave: np.ndarray, n: int) -> np.ndarray:
    """Repeat-pad (the authors' choice, no silence) or trim to exactly ``n`` samples."""
    if len(wave) >= n:
        return wave[:n]
    reps = -(-n // len(wave))
    return np.tile(wave, reps)[:n]


def random_crop(wave: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``n`` samples; shorter clips are repeat-padded."""
    if len(wave) <= n:
        return fit_length(wave, n)
    start = int(rng.integers(0, len(wave) - n + 1))
    return wave[start:start + n]
