"""Corpus formats: generic manifests (CSV/TSV/JSON Lines), EmoBox metadata, folds and dev splits,
read from small real corpora on disk (tests/corpora.py)."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_hpc.data.audio import load_audio
from ser_hpc.data.corpus import CorpusError
from ser_hpc.data.emobox import read_emobox
from ser_hpc.data.folds import assign_folds, check_leakage, split_dev
from ser_hpc.data.manifest import read_manifest
from tests.corpora import CLASSES, EMOBOX_CODES, make_emobox_corpus, make_manifest_corpus


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("manifests")
    return {fmt: make_manifest_corpus(root / fmt, fmt, with_text=True, with_split=True)
            for fmt in ("csv", "tsv", "jsonl")}


@pytest.fixture(scope="module")
def emobox(tmp_path_factory) -> tuple[Path, Path]:
    return make_emobox_corpus(tmp_path_factory.mktemp("emobox"))


def _rewrite_csv(src: Path, dst: Path, edit) -> Path:
    """Copy a CSV manifest with ``edit(rows)`` applied (rows as dicts, header kept)."""
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0])
    rows = edit(rows) or rows
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return dst


# --- manifests ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_manifest_formats_read(manifests, fmt):
    path = manifests[fmt]
    audio_dir = path.parent / "audio"
    clips = read_manifest(path, audio_dir, None)
    assert len(clips) == 5 * 12
    first = clips[0]
    assert first.id == "spk0/spk0_anger_00.wav"  # no id column: the audio value as written
    assert first.audio_path == audio_dir.absolute() / "spk0" / "spk0_anger_00.wav"
    assert first.audio_path.is_absolute() and first.audio_path.is_file()
    assert first.label == "anger" and first.speaker == "spk0" and first.text.startswith("this is")
    assert first.source == str(path)
    # CSV/TSV: header = line 1; JSON Lines: the physical line
    assert [c.row for c in clips] == (list(range(1, 61)) if fmt == "jsonl" else list(range(2, 62)))
    assert Counter(c.label for c in clips) == {c: 12 for c in CLASSES}
    assert Counter(c.split for c in clips) == {"train": 40, "dev": 10, "test": 10}  # "valid" -> dev
    assert {c.speaker for c in clips if c.split == "test"} == {"spk5"}
    assert sum(c.audio_path.suffix == ".flac" for c in clips) == 1


def test_jsonl_blank_lines_skipped_rows_stay_physical(tmp_path, manifests):
    lines = manifests["jsonl"].read_text().splitlines()
    path = _write(tmp_path / "gaps.jsonl", "\n".join(lines[:2] + ["", "   "] + lines[2:]) + "\n")
    clips = read_manifest(path, manifests["jsonl"].parent / "audio")
    assert len(clips) == 60 and [c.row for c in clips[:4]] == [1, 2, 5, 6]


def test_manifest_column_mapping_and_optional_columns(tmp_path, manifests):
    src = manifests["csv"]

    def rename(rows):
        return [{"file": r["audio"], "emotion": r["label"], "utt": f"u{i}", "spk": r["speaker"]}
                for i, r in enumerate(rows)]

    path = _rewrite_csv(src, tmp_path / "renamed.csv", rename)
    audio = src.parent / "audio"
    clips = read_manifest(path, audio, {"audio": "file", "label": "emotion", "id": "utt", "speaker": "spk"})
    assert clips[0].id == "u0" and clips[0].label == "anger" and clips[0].speaker == "spk0"
    assert clips[0].text is None and clips[0].split is None  # absent optional columns
    assert clips[0].audio_path == audio.absolute() / "spk0" / "spk0_anger_00.wav"
    # A column mapped to None is ignored even when the file has it.
    assert read_manifest(path, audio, {"audio": "file", "label": "emotion", "speaker": None})[0].speaker is None


def test_manifest_relative_to_manifest_folder_and_absolute(tmp_path, manifests):
    audio = manifests["csv"].parent / "audio"
    absolute = str((audio / "spk0" / "spk0_anger_00.wav").absolute())

    def edit(rows):
        for r in rows:
            r["audio"] = "audio/" + r["audio"]
        rows[0]["audio"] = absolute
        return rows

    path = _rewrite_csv(manifests["csv"], manifests["csv"].parent / "relative.csv", edit)
    clips = read_manifest(path, None, None)
    assert clips[0].audio_path == Path(absolute) and clips[0].id == absolute
    assert clips[1].audio_path == path.parent.absolute() / "audio" / "spk1" / "spk1_anger_01.wav"
    path.unlink()


def test_manifest_without_labels(tmp_path, manifests):
    def drop(rows):
        return [{k: v for k, v in r.items() if k != "label"} for r in rows]

    path = _rewrite_csv(manifests["csv"], tmp_path / "unlabelled.csv", drop)
    audio = manifests["csv"].parent / "audio"
    assert all(c.label is None for c in read_manifest(path, audio, None, require_labels=False))
    with pytest.raises(CorpusError, match=r"no column 'label' for data.columns.label.*columns found: audio, speaker"):
        read_manifest(path, audio, None)


def test_stereo_48k_and_flac_decode_to_mono_16k(manifests):
    clips = read_manifest(manifests["csv"], manifests["csv"].parent / "audio")
    infos = {c.id: sf.info(str(c.audio_path)) for c in clips}
    stereo = [c for c in clips if infos[c.id].channels == 2]
    flac = [c for c in clips if c.audio_path.suffix == ".flac"]
    assert len(stereo) == 1 and infos[stereo[0].id].samplerate == 48000
    assert len(flac) == 1 and infos[flac[0].id].format == "FLAC"
    assert all(infos[c.id].samplerate == 16000 and infos[c.id].channels == 1 for c in clips
               if c not in stereo and c not in flac)
    for clip in stereo + flac:
        info = infos[clip.id]
        wave = load_audio(clip.audio_path, 16000)
        assert wave.ndim == 1 and wave.dtype == np.float32
        assert abs(len(wave) - info.frames * 16000 / info.samplerate) <= 1
        assert 0.5 <= len(wave) / 16000 <= 1.5 and np.abs(wave).max() > 0.05


def test_audio_carries_class_signal(manifests):
    # A linear model on log band energies, trained on 4 speakers, beats chance (0.2) on the other 2.
    from sklearn.linear_model import LogisticRegression

    clips = read_manifest(manifests["csv"], manifests["csv"].parent / "audio")
    edges = np.geomspace(50, 1999, 25).astype(int)
    x = np.array([np.log(np.add.reduceat(np.abs(np.fft.rfft(load_audio(c.audio_path, 16000), n=16000))[:2000],
                                         edges) + 1e-6) for c in clips])
    held_out = np.array([c.speaker in ("spk4", "spk5") for c in clips])
    y = np.array([c.label for c in clips])
    x = (x - x[~held_out].mean(0)) / x[~held_out].std(0)
    model = LogisticRegression(max_iter=2000).fit(x[~held_out], y[~held_out])
    assert model.score(x[held_out], y[held_out]) >= 0.4


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _one_wav(folder: Path, name: str = "a.wav") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(str(folder / name), np.zeros(800, dtype=np.float32), 16000)
    return folder / name


def test_manifest_errors_name_file_row_and_key(tmp_path):
    _one_wav(tmp_path, "a.wav")
    _one_wav(tmp_path, "b.wav")
    cases = [
        ("missing.csv", "audio,label\na.wav,joy\n", {"speaker": "spk"},
         r"missing.csv: no column 'spk' for data.columns.speaker; columns found: audio, label"),
        ("nolabelcol.csv", "audio,emotion\na.wav,joy\n", None,
         r"no column 'label' for data.columns.label \(set data.columns.label"),
        ("split.csv", "audio,label,split\na.wav,joy,train\nb.wav,joy,holdout\n", None,
         r"split.csv, row 3: split 'holdout' is not one of train, dev"),
        ("dup.csv", "id,audio,label\nx,a.wav,joy\ny,b.wav,joy\nx,b.wav,sad\n", None,
         r"dup.csv, row 4: duplicate id 'x' \(first on row 2\)"),
        ("noaudio.csv", "audio,label\na.wav,joy\nspk9/c.wav,joy\n", None,
         r"noaudio.csv, row 3: audio file not found: .*spk9/c.wav"),
        ("emptylabel.csv", "audio,label\na.wav,joy\nb.wav,\n", None, r"emptylabel.csv, row 3: empty label"),
        ("emptyid.csv", "id,audio,label\n,a.wav,joy\n", None, r"emptyid.csv, row 2: empty id"),
        ("extra.csv", "audio,label\na.wav,joy,extra\n", None, r"extra.csv, row 2: 3 fields but the header has 2"),
        ("header.csv", "audio,label\n", None, r"header.csv: the manifest has no rows"),
        ("bad.jsonl", '{"audio": "a.wav", "label": "joy"}\n\n{"audio": "b.wav", "label": \n', None,
         r"bad.jsonl, row 3: not valid JSON"),
        ("list.jsonl", '["a.wav", "joy"]\n', None, r"list.jsonl, row 1: expected a JSON object"),
        ("m.txt", "audio,label\na.wav,joy\n", None,
         r"m.txt: unknown manifest format '.txt'; use one of .csv, .tsv, .jsonl"),
        ("cols.csv", "audio,label\na.wav,joy\n", {"wav": "audio"},
         r"data.columns: unknown key\(s\) wav; valid keys: audio, label, text, speaker, split, id"),
    ]
    for name, text, columns, message in cases:
        path = _write(tmp_path / name, text)
        with pytest.raises(CorpusError, match=message):
            read_manifest(path, tmp_path, columns)


def test_manifest_split_values_and_duplicate_audio_ids(tmp_path):
    _one_wav(tmp_path, "a.wav")
    path = _write(tmp_path / "s.tsv", 'audio\tlabel\tsplit\ttext\na.wav\tjoy\tVALIDATION\t"quoted" words\n'
                                      'a.wav\tsad\t\t\n')
    with pytest.raises(CorpusError, match=r"s.tsv, row 3: duplicate id 'a.wav' \(first on row 2\)"):
        read_manifest(path, tmp_path, None)
    path = _write(tmp_path / "s.tsv", 'audio\tlabel\tsplit\ttext\tid\na.wav\tjoy\tVALIDATION\t"quoted" words\t1\n'
                                      'a.wav\tsad\t\t\t2\n')
    clips = read_manifest(path, tmp_path, None)
    assert [c.split for c in clips] == ["dev", None]
    assert [c.text for c in clips] == ['"quoted" words', ""]  # TSV: bare quotes kept
    assert [c.id for c in clips] == ["1", "2"]


def test_missing_audio_counts_all_missing(tmp_path):
    path = _write(tmp_path / "m.csv", "audio,label\nx.wav,joy\ny.wav,joy\n")
    with pytest.raises(CorpusError, match=r"m.csv, row 2: audio file not found: .*x.wav \(2 of 2 audio files"):
        read_manifest(path, tmp_path, None)
    with pytest.raises(CorpusError, match=r"audio folder not found: .*nowhere \(data.audio_dir"):
        read_manifest(path, tmp_path / "nowhere", None)


def test_non_utf8_manifest(tmp_path):
    _one_wav(tmp_path, "a.wav")
    path = tmp_path / "latin.csv"
    path.write_bytes("audio,label,text\na.wav,joy,canción\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin.csv, row 2 .*not valid UTF-8"):
        read_manifest(path, tmp_path, None)


# --- EmoBox --------------------------------------------------------------------------------

def test_emobox_reads_clips_labels_and_folds(emobox):
    data_root, audio_dir = emobox
    corpus = read_emobox(data_root, audio_dir)
    assert corpus.name == "minicorp"
    assert corpus.label_order == list(EMOBOX_CODES)  # label_map.json's keys, in file order
    assert corpus.label_map == EMOBOX_CODES and corpus.display_order == list(EMOBOX_CODES.values())
    assert len(corpus.clips) == 60
    clip = corpus.clips[0]
    assert clip.id == "minicorp-spk0_anger_00" and clip.label == "ang" and clip.row == 1
    assert clip.audio_path == audio_dir.absolute() / "downloads/minicorp/wav/spk0_anger_00.wav"
    assert clip.text is None and clip.speaker is None and clip.split is None
    assert sorted(corpus.folds) == [1, 2, 3] and corpus.valid == {}
    ids = {c.id for c in corpus.clips}
    tests = []
    for train, test in corpus.folds.values():
        assert not set(train) & set(test) and set(train) | set(test) == ids
        tests.extend(test)
    assert sorted(tests) == sorted(ids)  # each clip tested exactly once
    assert sum(c.audio_path.suffix == ".flac" for c in corpus.clips) == 1


def test_emobox_stereo_and_flac_decode(emobox):
    corpus = read_emobox(*emobox)
    meta = {json.loads(line)["key"]: json.loads(line) for line in
            (emobox[0] / "minicorp.jsonl").read_text().splitlines()}
    odd = [c for c in corpus.clips if meta[c.id]["sample_rate"] != 16000]
    assert sorted(meta[c.id]["sample_rate"] for c in odd) == [22050, 48000]
    for clip in odd:
        wave = load_audio(clip.audio_path, 16000)
        assert wave.ndim == 1
        assert abs(len(wave) - meta[clip.id]["num_frame"] * 16000 / meta[clip.id]["sample_rate"]) <= 1


def _copy_emobox(emobox, tmp_path) -> Path:
    data_root, audio_dir = emobox
    root = tmp_path / "data" / "minicorp"
    shutil.copytree(data_root, root)
    return root


def test_emobox_fold_name_fallback_and_valid(emobox, tmp_path):
    root = _copy_emobox(emobox, tmp_path)
    expected = read_emobox(emobox[0], emobox[1]).folds
    (root / "fold_2" / "minicorp_test_fold_2.jsonl").rename(root / "fold_2" / "minicorp_test_fold2.jsonl")
    (root / "fold_2" / "minicorp_train_fold_2.jsonl").unlink()  # the other name stays as a stray
    with pytest.raises(CorpusError, match=r"fold_2: no train list for fold 2 \(looked for minicorp_train_fold_2.jsonl "
                                          r"and minicorp_train_fold2.jsonl\)"):
        read_emobox(root, emobox[1])
    shutil.copy(emobox[0] / "fold_2" / "minicorp_train_fold_2.jsonl", root / "fold_2" / "minicorp_train_fold2.jsonl")
    # A stray empty no-underscore copy next to the real file is ignored (EmoBox's emodb has one).
    (root / "fold_1" / "minicorp_test_fold1.jsonl").write_text("")
    # An official dev list (MELD-style) is read; a dev clip also in train is refused.
    test_lines = (root / "fold_3" / "minicorp_test_fold_3.jsonl").read_text().splitlines()
    (root / "fold_3" / "minicorp_test_fold_3.jsonl").write_text("\n".join(test_lines[:10]) + "\n")
    (root / "fold_3" / "minicorp_valid_fold_3.jsonl").write_text("\n".join(test_lines[10:]) + "\n")
    corpus = read_emobox(root, emobox[1])
    assert corpus.folds[2] == expected[2] and corpus.folds[1] == expected[1]
    assert len(corpus.folds[3][1]) == 10 and len(corpus.valid[3]) == 10


def test_emobox_leaking_fold_refused_naming_ids(emobox, tmp_path):
    root = _copy_emobox(emobox, tmp_path)
    test_file = root / "fold_2" / "minicorp_test_fold_2.jsonl"
    train_file = root / "fold_2" / "minicorp_train_fold_2.jsonl"
    leaked = test_file.read_text().splitlines()[:2]
    train_file.write_text(train_file.read_text() + "\n".join(leaked) + "\n")
    ids = [json.loads(line)["key"] for line in leaked]
    with pytest.raises(CorpusError, match=rf"fold 2 of .*minicorp: 2 clip id\(s\) are in both the train and the test "
                                          rf"list \('{ids[0]}', '{ids[1]}'\)"):
        read_emobox(root, emobox[1])


def test_emobox_metadata_errors(emobox, tmp_path):
    root = _copy_emobox(emobox, tmp_path)
    audio_dir = emobox[1]
    (root / "label_map.json").rename(root / "label_map.bak")
    with pytest.raises(CorpusError, match=r"label_map.json not found; data.root must be EmoBox's data/<corpus>/"):
        read_emobox(root, audio_dir)
    (root / "label_map.bak").rename(root / "label_map.json")

    meta = root / "minicorp.jsonl"
    original = meta.read_text()
    lines = original.splitlines()
    bad = json.loads(lines[3])
    bad["emo"] = "bor"
    meta.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    with pytest.raises(CorpusError, match=r"minicorp.jsonl, row 4: emo 'bor' .*is not in .*label_map.json, "
                                          r"whose labels are ang, con, fea, joy, sad"):
        read_emobox(root, audio_dir)

    del bad["wav"]
    bad["emo"] = "ang"
    meta.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    with pytest.raises(CorpusError, match=r"minicorp.jsonl, row 4: record has no 'wav'"):
        read_emobox(root, audio_dir)

    meta.write_text(original + lines[0] + "\n")
    with pytest.raises(CorpusError, match=r"minicorp.jsonl, row 61: duplicate key 'minicorp-spk0_anger_00' "
                                          r"\(first on row 1\)"):
        read_emobox(root, audio_dir)

    meta.write_text("\n".join(lines[1:]) + "\n")  # fold files still list the first key
    with pytest.raises(CorpusError, match=r"minicorp_(train|test)_fold_\d.jsonl, row \d+: key 'minicorp-spk0_anger_00' "
                                          r"is not in the corpus metadata"):
        read_emobox(root, audio_dir)
    meta.write_text(original)

    with pytest.raises(CorpusError, match=r"60 of 60 audio files listed in .*minicorp.jsonl are missing, e.g. "
                                          r".*data.audio_dir should be the folder that holds EmoBox's downloads/"):
        read_emobox(root, tmp_path / "elsewhere")
    with pytest.raises(CorpusError, match=r"nothere.jsonl not found; data.root must be EmoBox's data/<corpus>/"):
        read_emobox(shutil.copytree(root, tmp_path / "nothere"), audio_dir)


def test_emobox_label_case_mismatch_is_read_as_label_map_key(emobox, tmp_path, caplog):
    # EmoBox's emodb writes emo "neutral" while its label_map.json says "Neutral".
    root = _copy_emobox(emobox, tmp_path)
    (root / "label_map.json").write_text(json.dumps({k.upper(): v for k, v in EMOBOX_CODES.items()}))
    with caplog.at_level(logging.WARNING, logger="ser_hpc.data.emobox"):
        corpus = read_emobox(root, emobox[1])
    assert corpus.clips[0].label == "ANG" and corpus.label_order[0] == "ANG"
    assert "emo 'ang' is spelled 'ANG'" in caplog.text


# --- folds and dev splits ------------------------------------------------------------------

def _labels_speakers(n_per_class=12, speakers=6):
    labels, spk = [], []
    for label in CLASSES:
        for j in range(n_per_class):
            labels.append(label)
            spk.append(f"spk{j % speakers}")
    return labels, spk


def test_assign_folds_speaker_disjoint_and_stratified():
    labels, speakers = _labels_speakers()
    folds = assign_folds(labels, speakers, k=3, seed=7)
    assert sorted(set(folds)) == [1, 2, 3]
    for spk in set(speakers):
        assert len({f for f, s in zip(folds, speakers) if s == spk}) == 1  # no speaker in two folds
    for k in (1, 2, 3):
        assert {l for f, l in zip(folds, labels) if f == k} == set(CLASSES)  # every class in every fold
    assert assign_folds(labels, speakers, k=3, seed=7) == folds
    assert any(assign_folds(labels, speakers, k=3, seed=s) != folds for s in range(8, 12))


def test_assign_folds_without_speakers_is_stratified():
    labels, _ = _labels_speakers()
    folds = assign_folds(labels, None, k=4, seed=0)
    for k in range(1, 5):
        assert Counter(l for f, l in zip(folds, labels) if f == k) == {c: 3 for c in CLASSES}
    assert assign_folds(labels, [None] * len(labels), k=4, seed=0) == folds  # all unknown = no speakers


def test_assign_folds_errors_and_rare_class_warning(caplog):
    labels, speakers = _labels_speakers()
    with pytest.raises(CorpusError, match=r"7 folds requested but the corpus has only 6 speakers"):
        assign_folds(labels, speakers, k=7, seed=0)
    with pytest.raises(CorpusError, match=r"at least 2 folds, got k=1"):
        assign_folds(labels, None, k=1, seed=0)
    with pytest.raises(CorpusError, match=r"5 folds requested but the corpus has only 3 clips"):
        assign_folds(["a", "b", "c"], None, k=5, seed=0)
    with caplog.at_level(logging.WARNING, logger="ser_hpc.data.folds"):
        folds = assign_folds(labels + ["rare", "rare"], None, k=3, seed=0)
    assert len(folds) == 62 and "'rare' (2)" in caplog.text


def test_split_dev_speaker_disjoint_and_deterministic():
    labels, speakers = _labels_speakers(speakers=10)
    train, dev = split_dev(labels, speakers, fraction=0.2, seed=3)
    assert sorted(train + dev) == list(range(len(labels)))
    assert not {speakers[i] for i in train} & {speakers[i] for i in dev}
    assert 0.1 <= len(dev) / len(labels) <= 0.3
    assert {labels[i] for i in train} == set(CLASSES)
    assert split_dev(labels, speakers, fraction=0.2, seed=3) == (train, dev)


def test_split_dev_without_speakers(caplog):
    labels, _ = _labels_speakers()
    labels = labels + ["lonely"]
    with caplog.at_level(logging.WARNING, logger="ser_hpc.data.folds"):
        train, dev = split_dev(labels, None, fraction=0.25, seed=1)
    assert "'lonely'" in caplog.text and len(labels) - 1 in train
    assert Counter(labels[i] for i in dev) == {c: 3 for c in CLASSES}
    assert split_dev(labels, None, fraction=0.25, seed=1) == (train, dev)
    with pytest.raises(CorpusError, match=r"between 0 and 1"):
        split_dev(labels, None, fraction=1.0, seed=1)


def test_check_leakage_names_ids_and_where():
    check_leakage(["a", "b"], ["c"], "fold 1 of x")
    shared = [f"id{i}" for i in range(12)]
    with pytest.raises(CorpusError, match=r"fold 2 of /p/x: 12 clip id\(s\) .*'id0', .*'id9', \.\.\.\)") as err:
        check_leakage(shared + ["t"], shared + ["u"], "fold 2 of /p/x")
    assert "id10" not in str(err.value)
