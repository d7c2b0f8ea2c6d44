"""The demo corpus's voices: a speech-like harmonic signal whose prosody (pitch, range,
jitter, rate, level, brightness) depends on the emotion, blurred by per-speaker and
per-clip variation.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

SYNTH_SR = 16000  # voiced part synthesised at 16 kHz (harmonics up to 7 kHz), then resampled
CTRL_SR = 500     # control rate for contours, 2 ms
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                   [570, 840, 2410], [300, 870, 2240]], dtype=np.float64)
# f0 factor, f0 range (st), jitter (st), tremolo (st), syllables/s, level (dB), spectral
# tilt, breathiness, pause factor.  Anger loud+fast+high+bright, sadness slow+low+quiet+
# dark, fear high+tremolo+breathy, joy high+wide range, disgust low+slowish, neutral flat.
EMOTION_PROSODY = {
    "neutral": (1.00, 1.8, 0.10, 0.00, 4.2, 0.0, 1.25, 0.05, 1.0),
    "disgust": (0.90, 3.0, 0.30, 0.00, 3.4, -1.0, 1.40, 0.10, 1.4),
    "anger":   (1.25, 4.0, 0.30, 0.00, 5.4, 7.0, 0.80, 0.04, 0.7),
    "sadness": (0.86, 1.2, 0.15, 0.00, 2.9, -7.0, 1.65, 0.12, 1.8),
    "joy":     (1.22, 6.0, 0.15, 0.00, 4.9, 3.0, 1.00, 0.05, 0.9),
    "fear":    (1.35, 3.0, 0.45, 0.70, 5.0, -3.0, 1.30, 0.25, 1.1),
}


def make_speakers(rng: np.random.Generator, n: int) -> list[dict]:
    """Speaker traits that blur the emotion cues (a man's anger is lower than a woman's calm)."""
    out = []
    for i in range(n):
        female = bool(i % 2)
        out.append({
            "f0": float(rng.uniform(175, 235) if female else rng.uniform(95, 135)),
            "formant": float((1.15 if female else 1.0) * rng.uniform(0.95, 1.05)),
            "rate": float(rng.uniform(0.85, 1.15)),
            "level": float(rng.uniform(-3, 3)),
            "tilt": float(rng.uniform(-0.1, 0.1)),
        })
    return out


def _syllables(rng, dur, rate, pause):
    """(start, length) of each syllable: phrases of 3-8 syllables separated by pauses."""
    t, end, out = rng.uniform(0.1, 0.4), dur - rng.uniform(0.1, 0.4), []
    while t < end - 0.1:
        for _ in range(int(rng.integers(3, 9))):
            d = rng.gamma(8.0, 1.0 / (8.0 * rate))
            if t + d > end:
                break
            out.append((t, d))
            t += d
        t += rng.uniform(0.12, 0.4) * pause
    return out or [(0.1, min(0.3, dur - 0.2))]


def _control_to_samples(nc: int, n: int):
    """Linear interpolation from the control grid to SYNTH_SR samples, as np.interp would
    give (clamped at the end), block by block: np.interp searched the positions again for
    each of the ~70 harmonics, a third of the corpus build time."""
    per = SYNTH_SR // CTRL_SR
    w = np.arange(per) / per

    def up(x: np.ndarray) -> np.ndarray:
        x = np.append(x, [x[-1]] * (1 + max(0, -(-n // per) - nc)))
        return (x[:-1, None] + (x[1:] - x[:-1])[:, None] * w).ravel()[:n]
    return up


def synthesize(rng: np.random.Generator, label: str, speaker: dict, duration: float,
               sample_rate: int = 44100) -> np.ndarray:
    """A mono float64 speech-like clip of ``duration`` seconds whose prosody encodes ``label``."""
    f0m, rng_st, jit, trem, rate, level, tilt, breath, pause = EMOTION_PROSODY[label]
    # per-clip variation so classes overlap
    f0 = speaker["f0"] * f0m * np.exp(rng.normal(0, 0.06))
    rng_st *= np.exp(rng.normal(0, 0.25))
    rate *= speaker["rate"] * np.exp(rng.normal(0, 0.12))
    level += speaker["level"] + rng.normal(0, 2.5)
    tilt += speaker["tilt"] + rng.normal(0, 0.12)

    nc = int(duration * CTRL_SR)
    tc = np.arange(nc) / CTRL_SR
    env = np.zeros(nc)
    formants = np.repeat(VOWELS[[0]], nc, axis=0) * speaker["formant"]
    accents_t, accents_v = [0.0], [0.0]
    for s, d in _syllables(rng, duration, rate, pause):
        a, b = int(s * CTRL_SR), min(nc, int((s + d) * CTRL_SR))
        x = np.linspace(0, 1, b - a)
        env[a:b] = rng.uniform(0.6, 1.0) * np.sin(np.pi * x) ** 0.7
        formants[a:b] = VOWELS[rng.integers(5)] * speaker["formant"]
        accents_t.append(s + d / 2)
        accents_v.append(rng.uniform(-1, 1) * rng_st)
    accents_t.append(duration)
    accents_v.append(-rng_st)
    k = np.ones(15) / 15  # ~30 ms smoothing of formant jumps
    formants = np.stack([np.convolve(formants[:, j], k, mode="same") for j in range(3)], 1)
    st = np.interp(tc, accents_t, accents_v) - 2.0 * tc / duration  # accents + declination
    st += np.convolve(rng.normal(0, jit, nc), np.ones(3) / 3, mode="same")
    st += trem * np.sin(2 * np.pi * rng.uniform(5.5, 8.0) * tc + rng.uniform(0, 6.3))
    f0c = f0 * 2.0 ** (st / 12.0)

    # additive harmonic source shaped by three formant resonances and a spectral tilt
    n = int(duration * SYNTH_SR)
    up_ctrl = _control_to_samples(nc, n)
    f0s = up_ctrl(f0c)
    phase = 2 * np.pi * np.cumsum(f0s) / SYNTH_SR
    n_harm = int(7000 / f0c.min())
    voiced = np.zeros(n)
    s_prev, s_cur, two_cos = np.zeros(n), np.sin(phase), 2 * np.cos(phase)
    bw = np.array([80.0, 120.0, 180.0])
    amp = np.array([1.0, 0.6, 0.3])
    for h in range(1, n_harm + 1):
        fh = h * f0c[:, None]
        gain = (amp / np.sqrt(1 + ((fh - formants) / bw) ** 2)).sum(1) * h ** -tilt
        gain[fh[:, 0] > 7000] = 0.0
        voiced += up_ctrl(gain) * s_cur
        s_prev, s_cur = s_cur, two_cos * s_cur - s_prev  # sin((h+1)φ) by recurrence
    voiced *= up_ctrl(env)

    up = Fraction(sample_rate, SYNTH_SR)
    y = resample_poly(voiced, up.numerator, up.denominator)[: int(duration * sample_rate)]
    m = len(y)
    env_o = np.interp(np.arange(m) / sample_rate, tc, env)
    # breath noise follows voicing; short high-band bursts mark consonant onsets
    hiss = np.diff(rng.normal(0, 1, m + 1))
    y /= np.sqrt(np.mean(y ** 2)) + 1e-9
    y += breath * 2.0 * hiss * env_o
    onsets = np.flatnonzero(np.diff((env_o > 0.05).astype(np.int8)) == 1)
    for o in onsets:
        if rng.random() < 0.6:
            L = int(rng.uniform(0.03, 0.08) * sample_rate)
            seg = slice(max(0, o - L), o)
            y[seg] += rng.uniform(0.3, 0.8) * hiss[seg] * np.hanning(seg.stop - seg.start)
    y *= 10 ** ((-24.0 + level) / 20) / (np.sqrt(np.mean(y ** 2)) + 1e-9)
    y += rng.normal(0, 1, m) * 10 ** ((-24.0 - rng.uniform(20, 35)) / 20)  # room noise
    y *= 10 ** (rng.uniform(-3, 3) / 20)  # channel gain
    return np.tanh(y * 1.2) / 1.2 if np.abs(y).max() > 0.8 else y  # soft limiter, no clipping
