"""Training-time augmentation: with probability p, one of speed perturbation, additive
noise at a random SNR, or reverberation (as the paper).

Noise and room impulse responses come from folders on a cluster (MUSAN, RIRS_NOISES);
without them, coloured noise and a synthetic exponentially decaying impulse response are
generated so augmentation still works out of the box.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torchaudio
from scipy import fft as sp_fft

from .audio import fit_length, load_audio

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def _audio_files(folder: str | None) -> list[Path]:
    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"augmentation folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"augmentation folder {root} holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
    return files


def speed_perturb(wave: np.ndarray, speed: float) -> np.ndarray:
    """Play ``speed`` times faster (tempo and pitch), like sox ``speed``: resample by 1/speed."""
    ratio = Fraction(speed).limit_denominator(100)
    with torch.no_grad():
        out = torchaudio.functional.resample(torch.from_numpy(wave), ratio.numerator, ratio.denominator)
    return out.numpy()


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Mix ``noise`` (fitted to the clip's length) at the given signal-to-noise ratio."""
    noise = fit_length(noise, len(wave))
    p_signal = float(np.mean(wave ** 2)) + 1e-12
    p_noise = float(np.mean(noise ** 2)) + 1e-12
    scale = np.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10)))
    return (wave + scale * noise).astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with a room impulse response, keeping the clip's length and energy."""
    rir = rir / (np.sqrt(np.sum(rir ** 2)) + 1e-12)
    # The full linear convolution through an FFT of a fast length: zero-padding beyond
    # len(wave) + len(rir) - 1 does not change the result. torchaudio's fftconvolve uses
    # exactly that length, often a large-prime FFT size: about 12 ms per 5.5 s crop instead of 1.
    size = sp_fft.next_fast_len(len(wave) + len(rir) - 1, real=True)
    spectrum = sp_fft.rfft(wave, size) * sp_fft.rfft(rir.astype(np.float32), size)
    out = sp_fft.irfft(spectrum, size)[: len(wave)]
    gain = np.sqrt((np.mean(wave ** 2) + 1e-12) / (np.mean(out ** 2) + 1e-12))
    return (out * gain).astype(np.float32)


def coloured_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown noise: a spectral tilt of 0, -3 or -6 dB per octave."""
    exponent = rng.choice([0.0, 1.0, 2.0])
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return (noise / (np.std(noise) + 1e-12)).astype(np.float32)


def synthetic_rir(sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Exponentially decaying noise with RT60 in 0.2-0.8 s, a direct path first."""
    rt60 = rng.uniform(0.2, 0.8)
    n = int(rt60 * sample_rate)
    t = np.arange(n) / sample_rate
    rir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    rir[0] = 1.0
    return rir.astype(np.float32)


class Augmenter:
    """Picks and applies one augmentation per training crop."""

    OPS = ("speed", "noise", "reverb")

    def __init__(self, sample_rate: int, prob: float, speeds: list[float], snr_db: list[float],
                 noise_dir: str | None = None, rir_dir: str | None = None):
        self.sample_rate = sample_rate
        self.prob = prob
        self.speeds = list(speeds)
        self.snr_db = tuple(snr_db)
        self.noise_files = _audio_files(noise_dir)
        self.rir_files = _audio_files(rir_dir)

    def choose(self, rng: np.random.Generator, force: bool = False) -> tuple[str, float] | None:
        """None (no augmentation) with probability 1 - p, else an op and its parameter;
        ``force`` always picks an op (the augmented views of a feature store)."""
        if not force and (self.prob <= 0 or rng.random() >= self.prob):
            return None
        ops = [op for op in self.OPS if op != "speed" or self.speeds]
        op = ops[int(rng.integers(len(ops)))]
        if op == "speed":
            return op, float(self.speeds[int(rng.integers(len(self.speeds)))])
        if op == "noise":
            return op, float(rng.uniform(*self.snr_db))
        return op, 0.0

    @staticmethod
    def input_length(choice: tuple[str, float] | None, n: int) -> int:
        """Samples to crop so the augmented crop has ``n`` samples (speed changes length)."""
        if choice and choice[0] == "speed":
            return int(np.ceil(n * choice[1]))
        return n

    def apply(self, wave: np.ndarray, choice: tuple[str, float] | None, rng: np.random.Generator) -> np.ndarray:
        if choice is None:
            return wave
        op, param = choice
        if op == "speed":
            return speed_perturb(wave, param)
        if op == "noise":
            noise = self._pick(self.noise_files, rng, len(wave)) if self.noise_files else coloured_noise(len(wave), rng)
            return add_noise(wave, noise, param)
        rir = (self._pick(self.rir_files, rng, None) if self.rir_files
               else synthetic_rir(self.sample_rate, rng))
        return reverberate(wave, rir)

    def _pick(self, files: list[Path], rng: np.random.Generator, n: int | None) -> np.ndarray:
        wave = load_audio(files[int(rng.integers(len(files)))], self.sample_rate)
        if n is None or len(wave) <= n:
            return wave
        start = int(rng.integers(0, len(wave) - n + 1))
        return wave[start:start + n]
