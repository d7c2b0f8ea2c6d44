"""The demo corpus has the EmoSPeech release format and learnable labels; the tiny
backbones load like real checkpoints and respect padding masks."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below must work with no hub

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS
from ser_hpc.demo.backbones import build_demo_backbones
from ser_hpc.demo.corpus import DURATION_S, MANIFEST, class_counts, generate_corpus
from tests.conftest import TEST_CORPUS

ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}\.mp3$")
N_TRAIN, N_TEST = TEST_CORPUS  # big enough for a stable learnability check
SPANISH = "¿Qué pasó ayer? ¡Acertamos cuando estamos unidos, señoría... qué pingüino!"


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def corpus(demo_assets):
    """The session's demo corpus (conftest renders it once, with these sizes and the default
    seed); on a complete corpus generate_corpus only reads its manifest back."""
    return generate_corpus(demo_assets["corpus"], n_train=N_TRAIN, n_test=N_TEST, progress=False)


@pytest.fixture(scope="session")
def backbones(demo_assets, corpus):
    texts = [r["transcription"] for r in read_rows(corpus["train_path"])]
    return build_demo_backbones(demo_assets["root"] / "backbones", seed=1234, corpus_texts=texts)


# ---------------------------------------------------------------- corpus format

def test_csv_headers_and_quoting_round_trip(corpus):
    root = Path(corpus["root"])
    for name, header in [("train.csv", "id,label,transcription"), ("test.csv", "id,transcription"),
                         ("test_labels.csv", "id,label")]:
        text = (root / name).read_text(encoding="utf-8")
        assert text.splitlines()[0] == header
        # rewriting the parsed rows with the csv module gives the same bytes back
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(csv.reader(io.StringIO(text)))
        assert buf.getvalue() == text
    train_text = (root / "train.csv").read_text(encoding="utf-8")
    rows = read_rows(corpus["train_path"])
    texts = [r["transcription"] for r in rows]
    assert any("," in t for t in texts) and ',"' in train_text  # quoted fields with commas
    assert any('"' in t for t in texts) and '""' in train_text  # embedded quotes escaped
    assert any("¿" in t for t in texts) and any("¡" in t for t in texts)
    assert any("..." in t for t in texts) and any(c in "".join(texts) for c in "áéíóúñ")
    assert all(t.strip() and t[0].isupper() or t[0] in "¿¡" for t in texts)


def test_ids_and_files(corpus):
    train, test = read_rows(corpus["train_path"]), read_rows(corpus["test_path"])
    labels = read_rows(corpus["test_labels_path"])
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert [r["id"] for r in labels] == [r["id"] for r in test]
    ids = [r["id"] for r in train + test]
    assert all(ID_RE.match(i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    assert sorted(p.name for p in Path(corpus["audio_dir"]).iterdir()) == sorted(ids)


def test_class_imbalance_like_meacorpus(corpus):
    train = Counter(r["label"] for r in read_rows(corpus["train_path"]))
    test = Counter(r["label"] for r in read_rows(corpus["test_labels_path"]))
    assert set(train) == set(LABELS) and set(test) == set(LABELS)
    assert train.most_common(2)[0][0] == "neutral" and train.most_common(2)[1][0] == "disgust"
    assert train["fear"] < min(v for k, v in train.items() if k != "fear")
    assert 1 <= test["fear"] <= min(test.values())
    assert dict(train) == corpus["counts"]["train"] == class_counts(N_TRAIN)
    # default sizes: fear keeps enough clips to learn it and to score it (~6 %)
    assert class_counts(720)["fear"] == 43 and class_counts(180)["fear"] == 11
    assert sum(class_counts(720).values()) == 720 and class_counts(720)["neutral"] == 265


def test_audio_readable_at_44k_with_expected_durations(corpus):
    clips = corpus["clips"]
    stereo = [i for i, c in clips.items() if c["channels"] == 2]
    assert 0.03 < len(stereo) / len(clips) < 0.2
    sample = sorted(clips)[:20] + stereo[:5]
    for cid in sample:
        path = Path(corpus["audio_dir"]) / cid
        info = sf.info(path)
        assert info.samplerate == 44100 and info.format == "MP3"
        assert info.channels == clips[cid]["channels"]
        y, sr = sf.read(path, dtype="float32", always_2d=True)
        assert abs(len(y) / sr - clips[cid]["duration_s"]) < 0.05
        assert DURATION_S[0] <= len(y) / sr <= DURATION_S[1] + 0.05
        assert 1e-3 < np.sqrt(np.mean(y ** 2)) and np.abs(y).max() <= 1.0


def test_second_call_does_not_rewrite(corpus):
    root = Path(corpus["root"])
    before = mtimes(root)
    t0 = time.time()
    again = generate_corpus(root, n_train=N_TRAIN, n_test=N_TEST, progress=False)
    assert time.time() - t0 < 2.0
    assert mtimes(root) == before
    assert again["clips"] == corpus["clips"]


def test_partial_corpus_is_regenerated_and_formats(tmp_path):
    root = tmp_path / "c"
    generate_corpus(root, n_train=8, n_test=4, audio_format="wav", progress=False)
    complete = digests(root)
    # a run killed before its marker: marker gone, a clip missing, a CSV stale
    (root / MANIFEST).unlink()
    next((root / "audio").iterdir()).unlink()
    (root / "train.csv").write_text("id,label,transcription\n", encoding="utf-8")
    generate_corpus(root, n_train=8, n_test=4, audio_format="wav", progress=False)
    assert digests(root) == complete  # deterministic: the same bytes as the first time
    # other parameters replace the corpus, stale clips included
    m = generate_corpus(root, n_train=8, n_test=4, audio_format="flac", progress=False)
    names = [p.name for p in (root / "audio").iterdir()]
    assert len(names) == 12 and all(n.endswith(".flac") for n in names)
    assert sf.info(root / "audio" / names[0]).samplerate == 44100
    m = generate_corpus(tmp_path / "o", n_train=4, n_test=2, audio_format="ogg", progress=False)
    assert all(sf.info(Path(m["audio_dir"]) / i).format == "OGG" for i in m["clips"])


# ---------------------------------------------------------------- learnability

def prosodic_features(path) -> np.ndarray:
    """Crude, duration-normalised prosody: energy, brightness, pitch level/range, rate."""
    y, sr = sf.read(path, dtype="float32", always_2d=True)
    y = resample_poly(y.mean(1), 160, 441) if sr == 44100 else y.mean(1)
    frames = np.lib.stride_tricks.sliding_window_view(y, 400)[::160] * np.hanning(400)
    db = 20 * np.log10(np.sqrt((frames ** 2).mean(1)) + 1e-6)
    voiced = db > db.max() - 25
    zcr = (np.diff(np.sign(frames), axis=1) != 0).mean(1)
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames[voiced], 1024)) ** 2)[:, :400]
    lag = 40 + ac[:, 40:228].argmax(1)  # autocorrelation peak between 70 and 400 Hz
    st = 12 * np.log2(16000 / lag)
    onsets = np.sum(np.diff((np.convolve(voiced, np.ones(5) / 5, "same") > 0.5).astype(int)) == 1)
    p = np.percentile
    return np.array([db[voiced].mean(), db[voiced].std(), p(db, 95), zcr[voiced].mean(), np.median(st),
                     p(st, 90) - p(st, 10), np.abs(np.diff(st)).mean(), voiced.mean(), onsets * 16000 / len(y)])


@pytest.mark.slow
def test_both_modalities_learnable_neither_perfect(corpus):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = read_rows(corpus["train_path"]), read_rows(corpus["test_path"])
    gold = {r["id"]: r["label"] for r in read_rows(corpus["test_labels_path"])}
    y_tr, y_te = [r["label"] for r in train], [gold[r["id"]] for r in test]

    text = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                         LogisticRegression(C=10, max_iter=2000, class_weight="balanced"))
    text.fit([r["transcription"] for r in train], y_tr)
    pred = text.predict([r["transcription"] for r in test])
    text_f1, text_acc = f1_score(y_te, pred, average="macro"), accuracy_score(y_te, pred)

    audio_dir = Path(corpus["audio_dir"])
    x_tr = np.stack([prosodic_features(audio_dir / r["id"]) for r in train])
    x_te = np.stack([prosodic_features(audio_dir / r["id"]) for r in test])
    audio = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    audio.fit(x_tr, y_tr)
    audio_f1 = f1_score(y_te, audio.predict(x_te), average="macro")

    print(f"text-only macro-F1 {text_f1:.3f} (acc {text_acc:.3f}); prosody-only macro-F1 {audio_f1:.3f}")
    chance = 1 / len(LABELS)
    assert text_f1 > 2.4 * chance and audio_f1 > 2.4 * chance
    assert text_acc < 0.95  # neutral wording on emotional clips: text alone cannot be perfect


# ---------------------------------------------------------------- backbones

def test_backbones_load_from_path(backbones):
    from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer

    assert sorted(backbones) == ["bert-tiny", "roberta-tiny", "wav2vec2-small", "wav2vec2-tiny", "wavlm-tiny",
                                 "whisper-tiny"]
    widths = {"wav2vec2-tiny": 64, "wavlm-tiny": 96, "roberta-tiny": 64, "bert-tiny": 64, "wav2vec2-small": 128,
              "whisper-tiny": 64}
    for name, path in backbones.items():
        model = AutoModel.from_pretrained(path)
        assert model.config.hidden_size == widths[name]
        if name == "whisper-tiny":  # a whole checkpoint, as real ones: its decoder is there too
            fe = AutoFeatureExtractor.from_pretrained(path)
            assert fe.sampling_rate == 16000 and fe.feature_size == 80 and fe.n_samples == 30 * 16000
            assert model.config.encoder_layers == 4 and model.config.decoder_layers == 1
            continue
        if name in ("roberta-tiny", "bert-tiny"):
            tok = AutoTokenizer.from_pretrained(path)
            assert 100 < len(tok) == model.config.vocab_size
            assert model.config.max_position_embeddings >= 130
            ids = tok(SPANISH)["input_ids"]
            assert len(ids) > 10 and tok.unk_token_id not in ids
            assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            back = tok.decode(ids, skip_special_tokens=True)
            want = SPANISH.lower() if name == "bert-tiny" else SPANISH
            assert back.replace(" ", "") == want.replace(" ", "")
            batch = tok([SPANISH, "hola"], padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model(**batch).last_hidden_state
            assert out.shape == (2, len(ids), 64)
        else:
            fe = AutoFeatureExtractor.from_pretrained(path)
            assert fe.sampling_rate == 16000 and fe.return_attention_mask and fe.do_normalize
    tok = AutoTokenizer.from_pretrained(backbones["roberta-tiny"])
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, tok.mask_token] == \
           ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]
    tok = AutoTokenizer.from_pretrained(backbones["bert-tiny"])
    assert [tok.cls_token, tok.sep_token, tok.pad_token, tok.unk_token, tok.mask_token] == \
           ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]


@pytest.mark.parametrize("name", ["wav2vec2-tiny", "wavlm-tiny", "wav2vec2-small"])
def test_speech_padding_mask_keeps_valid_frames(backbones, name):
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(backbones[name])
    model = AutoModel.from_pretrained(backbones[name]).eval()
    rng = np.random.default_rng(0)
    short, long = rng.normal(size=16000 * 2).astype(np.float32), rng.normal(size=int(16000 * 3.3)).astype(np.float32)
    batch = fe([short, long], sampling_rate=16000, padding=True, return_tensors="pt")
    single = fe([short], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        padded = model(batch.input_values, attention_mask=batch.attention_mask, output_hidden_states=True)
        alone = model(single.input_values, attention_mask=single.attention_mask, output_hidden_states=True)
    n = alone.last_hidden_state.shape[1]
    assert n == 99  # 20 ms frames: (32000 - 400) // 320 + 1
    assert len(padded.hidden_states) == model.config.num_hidden_layers + 1
    for hp, ha in zip(padded.hidden_states, alone.hidden_states):
        torch.testing.assert_close(hp[0, :n], ha[0], atol=1e-5, rtol=0)


def test_backbones_idempotent_and_deterministic(backbones, corpus, tmp_path):
    root = next(iter(backbones.values())).parent
    before = mtimes(root)
    texts = [r["transcription"] for r in read_rows(corpus["train_path"])]
    assert build_demo_backbones(root, corpus_texts=texts) == backbones
    assert mtimes(root) == before
    other = build_demo_backbones(tmp_path / "b", corpus_texts=texts)
    for name in backbones:
        for f in ("model.safetensors", "config.json"):
            assert (other[name] / f).read_bytes() == (backbones[name] / f).read_bytes(), (name, f)


def test_cli_writes_both(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_data", Path(__file__).parents[1] / "jobs" / "make_demo_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(tmp_path), "--n-train", "8", "--n-test", "4", "--format", "wav"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "corpus" / MANIFEST).is_file() and (tmp_path / "backbones" / MANIFEST).is_file()
    assert str(tmp_path / "backbones" / "roberta-tiny") in printed
