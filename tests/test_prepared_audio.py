"""Prepared audio: decoded once into memory-mapped int16 shards, loaded with no decoding.

A small demo corpus (mp3, 44.1 kHz, some stereo) is generated once for the module;
tests that change files work on a copy.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import DataLoader

from ser_hpc.config import ConfigError, DataConfig
from ser_hpc.data import prepare, prepared_format
from ser_hpc.data.audio import AudioError, load_audio
from ser_hpc.data.augment import Augmenter, reverberate, synthetic_rir
from ser_hpc.data.corpus import CorpusError, read_corpus
from ser_hpc.data.dataset import TrainCrops, WholeClips, collate, decode_source
from ser_hpc.data.prepare import prepare_audio, prepare_corpus, prepare_for_data_config
from ser_hpc.data.prepared import PreparedAudio, audio_loader_for
from ser_hpc.data.prepared_format import PreparedAudioError, dequantise, quantise

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def _tolerance(reference: np.ndarray) -> float:
    """int16 quantisation with a per-clip peak scale: at most peak/65534 per sample, plus float32 rounding."""
    peak = float(np.max(np.abs(reference)))
    return peak / (2 * prepared_format.FULL_SCALE) + peak * 2.0 ** -22


def _snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(reference.astype(np.float64) ** 2)
                               / np.mean((reference.astype(np.float64) - other) ** 2)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from ser_hpc.demo.corpus import generate_corpus
    root = tmp_path_factory.mktemp("prepared_corpus")
    m = generate_corpus(root, n_train=12, n_test=4, seed=7, progress=False, workers=1)
    assert any(c["channels"] == 2 for c in m["clips"].values())  # downmixing is exercised
    return root


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    """The module corpus prepared once (train + test)."""
    out = tmp_path_factory.mktemp("prepared_store")
    summary = prepare_corpus([(corpus / "train.csv", corpus / "audio"), (corpus / "test.csv", corpus / "audio")],
                             out, SR, workers=1, progress=False)
    return out, summary


def _copy(corpus: Path, dest: Path) -> Path:
    shutil.copytree(corpus, dest)
    return dest


def _examples(corpus: Path):
    return read_corpus(corpus / "train.csv", corpus / "audio")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- accuracy

def test_round_trip_matches_load_audio_within_int16_tolerance(corpus, store):
    out, summary = store
    assert (summary.clips, summary.decoded, summary.reused) == (16, 16, 0)
    loader = PreparedAudio(out, SR)
    examples = _examples(corpus) + read_corpus(corpus / "test.csv", corpus / "audio", require_labels=False)
    total = 0
    for ex in examples:
        ref = load_audio(ex.audio_path, SR)
        got = loader(ex, SR)
        assert got.dtype == np.float32 and got.ndim == 1 and len(got) == len(ref)
        assert np.max(np.abs(got - ref)) <= _tolerance(ref), ex.id
        assert _snr_db(ref, got) > 80, ex.id
        assert loader.num_samples(ex) == len(ref)
        total += len(ref)
    assert summary.audio_seconds == pytest.approx(total / SR)
    # shards are plain .npy files: memory-mappable by anyone
    shard = next((out / "v1" / "sr16000").glob("*.npy"))
    assert np.load(shard, mmap_mode="r").dtype == np.int16


def test_quantisation_keeps_16_bits_relative_to_each_clips_peak():
    t = np.arange(SR) / SR
    for level in (1.3, 0.9, 1e-3):  # louder than full scale, normal, very quiet: no clipping, same precision
        wave = (level * np.sin(2 * np.pi * 441 * t)).astype(np.float32)
        codes, scale = quantise(wave)
        back = dequantise(codes, scale)
        assert codes.dtype == np.int16 and np.abs(codes).max() == prepared_format.FULL_SCALE
        assert np.max(np.abs(back - wave)) <= _tolerance(wave)
        assert _snr_db(wave, back) == pytest.approx(98, abs=2)  # 6.02 * 16 + 1.76 dB for a full-scale sine
    codes, scale = quantise(np.zeros(10, np.float32))  # silence: no division by zero
    assert not dequantise(codes, scale).any()


# ----------------------------------------------------------------- idempotence and keys

def test_second_run_decodes_nothing_and_rewrites_nothing(corpus, store, monkeypatch):
    out, _ = store
    before = _files(out)
    monkeypatch.setattr(prepare, "load_audio", lambda *a, **k: pytest.fail("decoded on an idempotent run"))
    summary = prepare_corpus([(corpus / "train.csv", corpus / "audio"), (corpus / "test.csv", corpus / "audio")],
                             out, SR, workers=1, progress=False)
    assert (summary.decoded, summary.reused, summary.shard) == (0, 16, None)
    assert _files(out) == before  # same files, same mtimes


def test_another_grid_on_a_copy_of_the_corpus_shares_the_store(corpus, store, tmp_path, monkeypatch):
    out, _ = store
    copy = _copy(corpus, tmp_path / "copy")  # same bytes at another path
    monkeypatch.setattr(prepare, "load_audio", lambda *a, **k: pytest.fail("a shared clip was decoded again"))
    summary = prepare_corpus([(copy / "train.csv", copy / "audio")], out, SR, workers=1, progress=False)
    assert (summary.decoded, summary.reused) == (0, 12)
    monkeypatch.undo()
    ex = _examples(copy)[0]
    assert np.array_equal(PreparedAudio(out, SR)(ex, SR), PreparedAudio(out, SR)(_examples(corpus)[0], SR))


def test_a_changed_source_file_is_prepared_again(corpus, tmp_path):
    copy = _copy(corpus, tmp_path / "corpus")
    out = tmp_path / "prepared"
    prepare_corpus([(copy / "train.csv", copy / "audio")], out, SR, workers=1, progress=False)
    early = PreparedAudio(out, SR)  # made before the change and the new preparation
    ex = _examples(copy)[3]
    old = PreparedAudio(out, SR)(ex, SR)

    new_audio = 0.3 * np.random.default_rng(0).standard_normal(2 * 44100).astype(np.float32)
    sf.write(ex.audio_path, new_audio, 44100, format="MP3")
    with pytest.raises(PreparedAudioError, match=ex.id + ".*(never prepared, or changed since)"):
        PreparedAudio(out, SR)(ex, SR)  # stale audio is never served

    summary = prepare_corpus([(copy / "train.csv", copy / "audio")], out, SR, workers=1, progress=False)
    assert (summary.decoded, summary.reused) == (1, 11) and summary.shard
    assert len(list((out / "v1" / "sr16000").glob("*.npy"))) == 2  # the new clip went to a new shard
    ref = load_audio(ex.audio_path, SR)
    fresh = PreparedAudio(out, SR)(ex, SR)
    assert len(fresh) == len(ref) != len(old)
    assert np.max(np.abs(fresh - ref)) <= _tolerance(ref)
    assert np.array_equal(early(ex, SR), fresh)  # an older loader finds the new shard on its own
    other = _examples(copy)[0]
    assert np.array_equal(early(other, SR), PreparedAudio(out, SR)(other, SR))


_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ser_hpc.data import prepare
    corpus, out, ready, go = (Path(a) for a in sys.argv[1:5])
    decode = prepare._decode
    def slow_decode(job):  # widen the race window: both jobs decode while the other does
        time.sleep(0.03)
        return decode(job)
    prepare._decode = slow_decode
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    s = prepare.prepare_corpus([(corpus / "train.csv", corpus / "audio"), (corpus / "test.csv", corpus / "audio")],
                                out, 16000, workers=1, progress=False)
    print(s.decoded, s.reused)
""")


def test_two_concurrent_preparations_of_the_same_corpus_agree(corpus, tmp_path):
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for i in range(2):
        args = [sys.executable, "-c", _RACER, str(corpus), str(out), str(tmp_path / f"ready{i}"), str(tmp_path / "go")]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
    decoded = [int(stdout.split()[0]) for stdout, _ in results]
    assert sum(decoded) >= 16, decoded  # every clip decoded at least once (here: by both, as a rule)

    folder = out / "v1" / "sr16000"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temp file left
    assert len(list(folder.glob("*.npy"))) == len(list(folder.glob("*.json"))) == 1  # same content, same name
    loader = PreparedAudio(out, SR)
    for ex in _examples(corpus):
        ref = load_audio(ex.audio_path, SR)
        assert np.max(np.abs(loader(ex, SR) - ref)) <= _tolerance(ref)


# ----------------------------------------------------------------- errors

def test_corrupt_audio_is_named_with_its_csv_row_and_the_rest_is_kept(corpus, tmp_path):
    copy = _copy(corpus, tmp_path / "corpus")
    bad = _examples(copy)[5]
    good_bytes = bad.audio_path.read_bytes()
    bad.audio_path.write_bytes(b"this is not an mp3")
    out = tmp_path / "prepared"
    with pytest.raises(AudioError, match=rf"1 audio file\(s\)(.|\n)*train.csv, row {bad.row}: .*{bad.id}"):
        prepare_corpus([(copy / "train.csv", copy / "audio")], out, SR, workers=1, progress=False)
    with pytest.raises(PreparedAudioError, match=bad.id):
        PreparedAudio(out, SR)(bad, SR)
    bad.audio_path.write_bytes(good_bytes)  # fixed: a rerun decodes only that file
    summary = prepare_corpus([(copy / "train.csv", copy / "audio")], out, SR, workers=1, progress=False)
    assert (summary.decoded, summary.reused) == (1, 11)


def test_missing_audio_is_named(corpus, tmp_path):
    copy = _copy(corpus, tmp_path / "corpus")
    gone = _examples(copy)[2]
    gone.audio_path.unlink()
    with pytest.raises(CorpusError, match=rf"row {gone.row}: audio file not found: .*{gone.id}"):
        prepare_corpus([(copy / "train.csv", copy / "audio")], tmp_path / "prepared", SR, progress=False)
    with pytest.raises(AudioError, match=rf"audio file not found: .*{gone.id}"):
        prepare_audio([gone.audio_path], tmp_path / "prepared", SR, progress=False)


def test_loader_errors_are_clear(corpus, store, tmp_path):
    out, _ = store
    with pytest.raises(PreparedAudioError, match="no audio prepared at 16000 Hz .*does not exist.*prepare_audio"):
        PreparedAudio(tmp_path / "nothing", SR)
    with pytest.raises(PreparedAudioError, match="no audio prepared at 8000 Hz .*holds audio at 16000 Hz"):
        PreparedAudio(out, 8000)
    loader = PreparedAudio(out, SR)
    ex = _examples(corpus)[0]
    with pytest.raises(PreparedAudioError, match="prepared at 16000 Hz, but 22050 Hz was asked for"):
        loader(ex, 22050)
    stranger = tmp_path / "stranger.wav"
    sf.write(stranger, np.zeros(800, np.float32), SR)
    with pytest.raises(PreparedAudioError, match="stranger.wav has no prepared copy at 16000 Hz"):
        loader(stranger, SR)
    with pytest.raises(PreparedAudioError, match="1 clip\\(s\\) are not prepared(.|\n)*stranger.wav"):
        loader.check([ex, stranger])
    loader.check(_examples(corpus))


# ----------------------------------------------------------------- datasets, workers, config

def test_loader_in_train_crops_and_whole_clips_gives_the_decoded_crops(corpus, store):
    out, _ = store
    loader = PreparedAudio(out, SR)
    examples = _examples(corpus)
    # p = 1: every crop is augmented, so speed, noise and reverberation are all compared
    aug = Augmenter(SR, 1.0, [0.9, 1.1], [15.0, 25.0])
    from_prepared = TrainCrops(examples, SR, 5.5, aug, seed=3, audio_loader=loader)
    from_source = TrainCrops(examples, SR, 5.5, aug, seed=3, audio_loader=decode_source)
    ops = set()
    for epoch in range(2):
        from_prepared.set_epoch(epoch)
        from_source.set_epoch(epoch)
        for i in range(len(examples)):
            ops.add(aug.choose(np.random.default_rng([3, epoch, i]))[0])
            a, b = from_prepared[i], from_source[i]
            assert a["id"] == b["id"] and len(a["wave"]) == len(b["wave"]) == int(5.5 * SR)
            assert _snr_db(b["wave"], a["wave"]) > 70, (epoch, i)
    assert ops == {"speed", "noise", "reverb"}
    for a, b in zip(WholeClips(examples, SR, audio_loader=loader), WholeClips(examples, SR)):
        assert len(a["wave"]) == len(b["wave"])
        assert np.max(np.abs(a["wave"] - b["wave"])) <= _tolerance(b["wave"])
    batch = collate([WholeClips(examples, SR, audio_loader=loader)[i] for i in range(3)])
    assert batch.waves.dtype == torch.float32


def test_loader_is_picklable_and_works_in_spawned_dataloader_workers(corpus, store):
    out, _ = store
    loader = PreparedAudio(out, SR)
    examples = _examples(corpus)
    first = loader(examples[0], SR)  # memory maps are open now; they must not be pickled
    clone = pickle.loads(pickle.dumps(loader))
    assert clone._maps == {} and np.array_equal(clone(examples[0], SR), first)
    ds = WholeClips(examples, SR, audio_loader=loader)
    dl = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate, multiprocessing_context="spawn")
    waves = [w[:n] for b in dl for w, n in zip(b.waves.numpy(), b.wave_lengths.tolist())]
    assert len(waves) == len(examples)
    assert all(np.array_equal(w, loader(ex, SR)) for w, ex in zip(waves, examples))


def test_prepare_for_data_config_and_audio_loader_for(corpus, tmp_path):
    cfg = DataConfig(train_csv=str(corpus / "train.csv"), audio_dir=str(corpus / "audio"),
                     test_csv=str(corpus / "test.csv"))
    assert audio_loader_for(cfg) is decode_source
    with pytest.raises(ConfigError, match="prepared_dir"):
        prepare_for_data_config(cfg)
    cfg.prepared_dir = str(tmp_path / "prepared")
    summary = prepare_for_data_config(cfg, workers=2, progress=False)  # 16 clips: a pool of 2 processes
    assert (summary.clips, summary.decoded, summary.sample_rate) == (16, 16, 16000)
    loader = audio_loader_for(cfg)
    assert isinstance(loader, PreparedAudio)
    loader.check(read_corpus(cfg.test_csv, cfg.audio_dir, require_labels=False))


@pytest.mark.slow
def test_cli_prepares_and_reports(corpus, tmp_path):
    out = tmp_path / "prepared"
    cmd = [sys.executable, str(REPO / "jobs" / "prepare_audio.py"), "--csv", str(corpus / "train.csv"),
           "--audio-dir", str(corpus / "audio"), "--out", str(out), "--workers", "1", "--no-progress", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["decoded"] == 12
    bad = subprocess.run(cmd[:4] + ["--audio-dir", str(tmp_path / "nope"), "--out", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "audio folder not found" in bad.stderr and "nope" in bad.stderr


def test_fast_reverberation_equals_the_torchaudio_reference():
    """The FFT-length speed-up in augment.reverberate does not change its output."""
    rng = np.random.default_rng(5)
    for n in (88000, 95299, 16001):
        wave = rng.standard_normal(n).astype(np.float32)
        rir = synthetic_rir(SR, rng)
        unit = rir / (np.sqrt(np.sum(rir ** 2)) + 1e-12)
        with torch.no_grad():
            ref = torchaudio.functional.fftconvolve(torch.from_numpy(wave), torch.from_numpy(unit)).numpy()[:n]
        ref = ref * np.sqrt((np.mean(wave ** 2) + 1e-12) / (np.mean(ref ** 2) + 1e-12))
        got = reverberate(wave, rir)
        assert got.dtype == np.float32 and len(got) == n
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
