import numpy as np
import pytest
import soundfile as sf

from ser_hpc.data.audio import AudioError, fit_length, load_audio, random_crop
from ser_hpc.data.augment import (Augmenter, add_noise, coloured_noise, reverberate, speed_perturb,
                                  synthetic_rir)
from ser_hpc.data.dataset import TrainCrops, WholeClips, collate
from ser_hpc.data.corpus import Example

SR = 16000


def _tone(freq, seconds, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_freq(wave, sr=SR):
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.fft.rfftfreq(len(wave), 1 / sr)[spec.argmax()]


@pytest.mark.parametrize("fmt,ext", [("MP3", "mp3"), ("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_load_downmixes_and_resamples_44k_to_16k(tmp_path, fmt, ext):
    t = np.arange(44100) / 44100
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, left], axis=1).astype(np.float32)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, stereo, 44100, format=fmt)
    wave = load_audio(path, SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR) < SR * 0.06  # mp3 adds encoder padding
    assert _dominant_freq(wave) == pytest.approx(440, abs=3)  # pitch preserved: really resampled


def test_unreadable_audio_is_named(tmp_path):
    path = tmp_path / "bad.wav"
    path.write_bytes(b"garbage")
    with pytest.raises(AudioError, match="bad.wav"):
        load_audio(path, SR)


def test_crop_and_repeat_pad():
    rng = np.random.default_rng(0)
    wave = np.arange(10, dtype=np.float32)
    assert fit_length(wave, 25).tolist() == (list(range(10)) * 3)[:25]  # repeat, not silence
    long = np.arange(100, dtype=np.float32)
    crops = {tuple(random_crop(long, 30, rng)[:1]) for _ in range(20)}
    assert len(crops) > 1  # random start
    crop = random_crop(long, 30, rng)
    assert len(crop) == 30 and np.all(np.diff(crop) == 1)  # a contiguous window
    assert random_crop(wave, 25, rng).tolist() == fit_length(wave, 25).tolist()


def test_speed_perturbation_changes_tempo_and_pitch():
    wave = _tone(400, 1.0)
    fast = speed_perturb(wave, 1.1)
    slow = speed_perturb(wave, 0.9)
    assert len(fast) == pytest.approx(SR / 1.1, abs=2) and len(slow) == pytest.approx(SR / 0.9, abs=2)
    assert _dominant_freq(fast) == pytest.approx(440, abs=4)
    assert _dominant_freq(slow) == pytest.approx(360, abs=4)


@pytest.mark.parametrize("snr", [15.0, 20.0, 25.0])
def test_noise_at_requested_snr(snr):
    rng = np.random.default_rng(1)
    wave = _tone(300, 1.0)
    noise = coloured_noise(len(wave) // 3, rng)  # shorter noise is repeat-fitted
    noisy = add_noise(wave, noise, snr)
    measured = 10 * np.log10(np.mean(wave ** 2) / np.mean((noisy - wave) ** 2))
    assert measured == pytest.approx(snr, abs=0.05)


def test_reverberation_keeps_length_and_energy_and_smears():
    rng = np.random.default_rng(2)
    rir = synthetic_rir(SR, rng)
    assert 0.2 * SR <= len(rir) <= 0.8 * SR and abs(rir[-1]) < 0.01  # decays
    click = np.zeros(SR, np.float32)
    click[100] = 1.0
    wet = reverberate(click, rir)
    assert len(wet) == SR
    assert np.mean(wet ** 2) == pytest.approx(np.mean(click ** 2), rel=1e-3)
    assert np.count_nonzero(np.abs(wet) > 1e-4) > 1000  # one click became a tail


def test_augmenter_probability_and_folders(tmp_path):
    aug = Augmenter(SR, 0.3, [0.9, 1.1], [15, 25])
    rng = np.random.default_rng(3)
    choices = [aug.choose(rng) for _ in range(4000)]
    rate = sum(c is not None for c in choices) / len(choices)
    assert rate == pytest.approx(0.3, abs=0.03)
    assert {c[0] for c in choices if c} == {"speed", "noise", "reverb"}
    assert all(15 <= c[1] <= 25 for c in choices if c and c[0] == "noise")
    # Folders of real noise / RIR files are used when given.
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise" / "n.wav", np.random.default_rng(4).standard_normal(8000).astype("float32"), 8000)
    with_files = Augmenter(SR, 1.0, [], [20, 20], noise_dir=str(tmp_path / "noise"))
    assert len(with_files.noise_files) == 1
    out = with_files.apply(_tone(200, 0.5), ("noise", 20.0), rng)
    assert len(out) == SR // 2
    with pytest.raises(FileNotFoundError, match="not found"):
        Augmenter(SR, 0.3, [1.0], [15, 25], rir_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        Augmenter(SR, 0.3, [1.0], [15, 25], rir_dir=str(tmp_path / "empty"))


def test_train_crops_are_fixed_length_and_reproducible(tmp_path):
    paths = []
    for i, seconds in enumerate([2.0, 8.0]):
        p = tmp_path / f"{i}.wav"
        noise = np.random.default_rng(i).standard_normal(int(seconds * 44100)).astype(np.float32) * 0.1
        sf.write(p, noise, 44100)  # aperiodic, so different crops really differ
        paths.append(p)
    examples = [Example(p.name, p, "hola", 0, i + 2) for i, p in enumerate(paths)]
    ds = TrainCrops(examples, SR, 5.5, Augmenter(SR, 0.3, [0.9, 1.1], [15, 25]), seed=7)
    items = [ds[i] for i in range(2)]
    assert all(len(it["wave"]) == int(5.5 * SR) for it in items)
    assert np.array_equal(ds[1]["wave"], items[1]["wave"])  # same (seed, epoch, index) -> same crop
    ds.set_epoch(1)
    assert not np.array_equal(ds[1]["wave"], items[1]["wave"])
    batch = collate([WholeClips(examples, SR)[i] for i in range(2)])
    assert batch.waves.shape == (2, 8 * SR) and batch.wave_lengths.tolist() == [2 * SR, 8 * SR]
    assert float(batch.waves[0, 2 * SR:].abs().sum()) == 0.0
