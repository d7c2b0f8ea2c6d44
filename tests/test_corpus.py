import csv

import numpy as np
import pytest
import soundfile as sf

from ser_hpc.data.corpus import CorpusError, check_audio, read_corpus, read_labels_csv
from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS

LABEL_TO_ID = {name: i for i, name in enumerate(LABELS)}
from ser_hpc.data.split import class_weights, stratified_split

ROWS = [
    ("9591e23d-70123687.mp3", "anger", "Pedimos que se tiren de las orejas a quien las ha paralizado. ..."),
    ("51057a09-6011210b.mp3", "joy", "Acertamos cuando estamos unidos. Unidos las instituciones, ..."),
    ("0a1b2c3d-4e5f6a7b.wav", "fear", "¿Y si no vuelve? ¡Qué miedo, Dios mío!"),
    ("1a1b2c3d-4e5f6a7b.flac", "neutral", 'Dijo "mañana", sin más.'),
]


def _corpus(tmp_path, rows=ROWS, header=("id", "label", "transcription")):
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    for ident, *_ in rows:
        fmt = {"mp3": "MP3", "wav": "WAV", "flac": "FLAC", "ogg": "OGG"}[ident.rsplit(".", 1)[1]]
        sf.write(audio / ident, np.random.default_rng(0).standard_normal((4410, 2)).astype("float32") * 0.1,
                 44100, format=fmt)
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row[: len(header)])
    return path, audio


def test_reads_quoted_spanish_rows_exactly(tmp_path):
    path, audio = _corpus(tmp_path)
    raw = path.read_text(encoding="utf-8")
    assert '"Acertamos cuando estamos unidos. Unidos las instituciones, ..."' in raw  # really quoted
    examples = read_corpus(path, audio)
    assert [(e.id, LABELS[e.label], e.text) for e in examples] == ROWS
    assert examples[0].row == 2 and examples[0].audio_path == audio / ROWS[0][0]
    durations = check_audio(examples)
    assert durations == pytest.approx([0.1] * 4, abs=0.06)  # mp3 frames are padded by the encoder


def test_test_csv_without_labels_and_gold_labels(tmp_path):
    path, audio = _corpus(tmp_path, header=("id", "transcription"), rows=[(r[0], r[2]) for r in ROWS])
    examples = read_corpus(path, audio, require_labels=False)
    assert all(e.label is None for e in examples)
    gold = tmp_path / "gold.csv"
    gold.write_text("id,label\n" + "".join(f"{r[0]},{r[1]}\n" for r in ROWS))
    labelled = read_corpus(path, audio, labels_csv=gold)
    assert [e.label for e in labelled] == [LABEL_TO_ID[r[1]] for r in ROWS]
    assert read_labels_csv(gold)[ROWS[2][0]] == "fear"  # raw names: the run maps them onto its classes


def test_missing_audio_file_names_row_and_path(tmp_path):
    path, audio = _corpus(tmp_path)
    (audio / ROWS[2][0]).unlink()
    with pytest.raises(CorpusError, match=rf"train\.csv, row 4: audio file not found: .*{ROWS[2][0]}"):
        read_corpus(path, audio)


def test_unreadable_and_empty_audio(tmp_path):
    path, audio = _corpus(tmp_path)
    (audio / ROWS[1][0]).write_bytes(b"not audio at all" * 10)
    examples = read_corpus(path, audio)
    with pytest.raises(CorpusError, match=rf"row 3: unreadable audio file .*{ROWS[1][0]}"):
        check_audio(examples, path)
    sf.write(audio / ROWS[1][0], np.zeros((0,), "float32"), 44100, format="WAV")
    with pytest.raises(CorpusError):
        check_audio(examples, path)
    (audio / ROWS[1][0]).write_bytes(b"")
    with pytest.raises(CorpusError, match=rf"row 3: .*{ROWS[1][0]}"):
        check_audio(examples, path)


def test_label_not_in_set(tmp_path):
    rows = list(ROWS)
    rows[1] = (rows[1][0], "happiness", rows[1][2])
    path, audio = _corpus(tmp_path, rows=rows)
    with pytest.raises(CorpusError, match=r"row 3: label 'happiness' is not one of neutral, disgust"):
        read_corpus(path, audio)


def test_missing_columns(tmp_path):
    path, audio = _corpus(tmp_path, header=("id", "transcription"), rows=[(r[0], r[2]) for r in ROWS])
    with pytest.raises(CorpusError, match=r"missing column\(s\) label.*found id, transcription"):
        read_corpus(path, audio)


def test_duplicate_id(tmp_path):
    path, audio = _corpus(tmp_path, rows=ROWS + [ROWS[0]])
    with pytest.raises(CorpusError, match="row 6: duplicate id"):
        read_corpus(path, audio)


REAL_COUNTS = {"neutral": 1166, "disgust": 705, "anger": 399, "joy": 362, "sadness": 345, "fear": 23}


def test_class_weights_on_the_real_distribution():
    labels = [LABEL_TO_ID[name] for name, n in REAL_COUNTS.items() for _ in range(n)]
    w = class_weights(labels, LABELS, "inverse")
    expected = [3000 / REAL_COUNTS[name] for name in LABELS]
    assert w == pytest.approx(expected)
    assert w[LABEL_TO_ID["neutral"]] == pytest.approx(2.573, abs=1e-3)
    assert w[LABEL_TO_ID["fear"]] == pytest.approx(130.43, abs=1e-2)
    ws = class_weights(labels, LABELS, "sqrt_inverse")
    assert ws == pytest.approx(np.sqrt(expected))
    # A different weighting, not a rescale: fear/neutral drops from ~51x to ~7x.
    assert ws[LABEL_TO_ID["fear"]] / ws[LABEL_TO_ID["neutral"]] == pytest.approx(np.sqrt(130.43 / 2.573), rel=1e-3)
    with pytest.raises(CorpusError, match="no training examples for class.*fear named in data.labels"):
        class_weights([0, 1, 2, 3, 4], LABELS, "inverse")
    # Classes derived from the corpus: a class absent from a training fold is left out, not an error.
    derived = class_weights([0, 1, 1, 2, 3, 4], LABELS, "inverse", configured=False)
    assert derived[LABEL_TO_ID["fear"]] == 0 and derived[0] == pytest.approx(6.0) and derived[1] == pytest.approx(3.0)


def test_stratified_split_is_seeded_and_keeps_proportions(tmp_path):
    from ser_hpc.data.corpus import Example
    labels = [LABEL_TO_ID[name] for name, n in REAL_COUNTS.items() for _ in range(n)]
    examples = [Example(f"{i:08x}-00000000.mp3", tmp_path, "", lab, i + 2) for i, lab in enumerate(labels)]
    train, dev = stratified_split(examples, 0.16, 1234)
    assert (len(train), len(dev)) == (2520, 480)  # the authors' split sizes
    dev_counts = np.bincount([e.label for e in dev], minlength=6)
    for name, n in REAL_COUNTS.items():
        assert abs(dev_counts[LABEL_TO_ID[name]] - n * 0.16) <= 1
    again, dev2 = stratified_split(examples, 0.16, 1234)
    assert [e.id for e in dev2] == [e.id for e in dev]
    _, dev3 = stratified_split(examples, 0.16, 7)
    assert [e.id for e in dev3] != [e.id for e in dev]
    assert not {e.id for e in train} & {e.id for e in dev}
