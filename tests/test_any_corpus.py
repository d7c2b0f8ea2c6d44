"""Any corpus: class lists from config or corpus, manifests and EmoBox folders through
load_splits, speaker-independent folds, text-less corpora, and a real 5-class run."""
from __future__ import annotations

import csv
import json
import logging

import pytest
import yaml

from ser_hpc.config import ConfigError, DataConfig, config_from_dict, load_config
from ser_hpc.data.clips import CorpusError
from ser_hpc.data.sources import all_clips, load_splits
from ser_hpc.data.split import class_weights
from tests.corpora import CLASSES, make_emobox_corpus, make_manifest_corpus


def _manifest_cfg(root, path, **kw) -> DataConfig:
    return DataConfig(format="manifest", manifest=str(path), audio_dir=str(root / "audio"), **kw)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    return root, make_manifest_corpus(root, "tsv", n_per_class=10, speakers=6)


@pytest.fixture(scope="module")
def emobox(tmp_path_factory):
    return make_emobox_corpus(tmp_path_factory.mktemp("emobox"), n_per_class=8, speakers=6, folds=3)


def test_manifest_classes_are_derived_and_folds_are_speaker_independent(manifest):
    root, path = manifest
    tests = []
    for fold in (1, 2, 3):
        s = load_splits(_manifest_cfg(root, path, folds=3, fold=fold))
        assert s.labels == tuple(sorted(CLASSES)) and "neutral" not in s.labels and not s.labels_configured
        spk = {name: {e.speaker for e in getattr(s, name)} for name in ("train", "dev", "test")}
        assert not spk["test"] & (spk["train"] | spk["dev"]), spk   # no speaker in two folds
        assert not spk["dev"] & spk["train"], spk                   # dev is speaker-disjoint too
        assert {e.label for e in s.test} == set(range(5))           # stratified: every class in every fold
        assert not s.has_text
        tests.append({e.id for e in s.test})
    assert not (tests[0] & tests[1]) and not (tests[1] & tests[2]) and not (tests[0] & tests[2])
    assert set().union(*tests) == {c.id for c in all_clips(_manifest_cfg(root, path, folds=3, fold=1))[0]}
    again = load_splits(_manifest_cfg(root, path, folds=3, fold=2))
    assert [e.id for e in again.test] == sorted(tests[1], key=[e.id for e in again.test].index)


def test_label_map_merges_and_drops_with_counts_logged(manifest, caplog):
    root, path = manifest
    with caplog.at_level(logging.INFO, logger="ser_hpc.data"):
        s = load_splits(_manifest_cfg(root, path, folds=3, fold=1, label_map={"contempt": "anger", "fear": None}))
    assert s.labels == ("anger", "joy", "sadness")
    n_fear = sum(1 for e in all_clips(_manifest_cfg(root, path))[0] if e.label == "fear")
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "data.label_map maps to null" in logged
    # one log line per split (train+dev, test), each counting the dropped clips per raw label
    dropped = sum(int(r.getMessage().rsplit("fear ", 1)[1]) for r in caplog.records if "maps to null" in r.getMessage())
    assert dropped == n_fear
    assert len(s.train) + len(s.dev) + len(s.test) == 50 - n_fear


def test_configured_labels_keep_their_order_and_an_untrained_class_is_refused(manifest):
    root, path = manifest
    order = ["sadness", "joy", "fear", "contempt", "anger", "neutral"]
    s = load_splits(_manifest_cfg(root, path, folds=3, fold=1, labels=order))
    assert s.labels == tuple(order) and s.labels_configured
    assert max(e.label for e in s.train) == 4  # nothing is neutral
    with pytest.raises(CorpusError, match="no training examples for class.*neutral named in data.labels"):
        class_weights([e.label for e in s.train], s.labels, "inverse", configured=True)
    with pytest.raises(CorpusError, match=r"label 'fear' is not one of anger, joy"):
        load_splits(_manifest_cfg(root, path, folds=3, fold=1, labels=["anger", "joy", "sadness", "contempt"]))


def test_text_is_optional_and_asking_for_it_is_refused(manifest, tmp_path):
    root, path = manifest
    with pytest.raises(CorpusError, match=r"manifest\.tsv.*no transcriptions.*model\.modalities=audio"):
        load_splits(_manifest_cfg(root, path, folds=3, fold=1), needs_text=True)
    texty = make_manifest_corpus(tmp_path, "jsonl", n_per_class=4, speakers=4, with_text=True, with_split=True)
    s = load_splits(DataConfig(format="manifest", manifest=str(texty), audio_dir=str(tmp_path / "audio")),
                    needs_text=True)
    assert s.has_text and all(e.text for e in s.train + s.dev + s.test)
    assert s.test and s.dev  # the split column's train / valid / test


def test_folds_need_a_test_fold_and_the_config_checks_the_keys(manifest):
    root, path = manifest
    with pytest.raises(CorpusError, match=r"set data\.fold \(1\.\.3\)"):
        load_splits(_manifest_cfg(root, path, folds=3))
    with pytest.raises(ConfigError, match="data.folds.*got 1"):
        load_config(overrides=["data.format=manifest", "data.manifest=x.csv", "data.folds=1",
                               "model.speech.name=x", "model.modalities=audio"])
    with pytest.raises(ConfigError, match="data.format=emobox needs data.root"):
        load_config(overrides=["data.format=emobox", "model.speech.name=x", "model.modalities=audio"])
    with pytest.raises(ConfigError, match="data.format.*one of emospeech, manifest, emobox"):
        load_config(overrides=["data.format=kaldi", "model.speech.name=x", "model.modalities=audio"])
    # label_map entries can be set one by one, dots and nulls included, from the command line or YAML
    cfg = load_config(overrides=["data.label_map.exc=happy", "data.label_map.xxx=null", "data.label_map.a.b=c",
                                 "model.speech.name=x", "model.modalities=audio"])
    assert cfg.data.label_map == {"exc": "happy", "xxx": None, "a.b": "c"}
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).data.label_map == cfg.data.label_map


def test_emobox_folds_classes_and_leakage(emobox):
    data_root, audio_dir = emobox
    name = data_root.name
    cfg = DataConfig(format="emobox", root=str(data_root), audio_dir=str(audio_dir), fold=2)
    s = load_splits(cfg)
    label_map = json.loads((data_root / "label_map.json").read_text())
    assert s.labels == tuple(dict.fromkeys(label_map.values()))  # EmoBox's classes, in label_map.json order
    with open(data_root / "fold_2" / f"{name}_test_fold_2.jsonl") as fh:
        want = [json.loads(line)["key"] for line in fh if line.strip()]
    assert [e.id for e in s.test] == want
    assert not {e.speaker for e in s.dev} & {e.speaker for e in s.train} or s.train[0].speaker is None
    with pytest.raises(CorpusError, match=r"folds 1, 2, 3; set data\.fold"):
        load_splits(DataConfig(format="emobox", root=str(data_root), audio_dir=str(audio_dir)))
    # a raw label can be re-mapped over label_map.json (several raw labels -> one class)
    merged = load_splits(DataConfig(format="emobox", root=str(data_root), audio_dir=str(audio_dir), fold=1,
                                    label_map={"con": "Angry"}))
    assert merged.labels == ("Angry", "Fear", "Happy", "Sad")
    # a fold whose test clip is also in its train list is refused, naming the id
    train_file = data_root / "fold_3" / f"{name}_train_fold_3.jsonl"
    leaked = (data_root / "fold_3" / f"{name}_test_fold_3.jsonl").read_text().splitlines()[0]
    original = train_file.read_text()
    try:
        train_file.write_text(original + leaked + "\n")
        with pytest.raises(CorpusError, match=json.loads(leaked)["key"]):
            load_splits(DataConfig(format="emobox", root=str(data_root), audio_dir=str(audio_dir), fold=3))
    finally:
        train_file.write_text(original)


def test_a_five_class_audio_only_run_carries_its_classes_everywhere(demo_assets, manifest, tmp_path):
    """A real run (tiny wav2vec2) on a 5-class manifest fold: the head has 5 outputs and the
    classes are in config.yaml, the probability CSV headers and final.json."""
    from ser_hpc.train.loop import train_pack
    root, path = manifest
    run = tmp_path / "run"
    cfg = config_from_dict({
        "data": {"format": "manifest", "manifest": str(path), "audio_dir": str(root / "audio"), "folds": 3,
                 "fold": 1, "crop_seconds": 1.0, "eval_batch_size": 16},
        "model": {"modalities": "audio", "speech": {"name": str(demo_assets["backbones"]["wav2vec2-tiny"])},
                  "head_width": 32},
        "train": {"lr": 2e-3, "batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 2},
        "run": {"dir": str(run), "name": "five"}})
    final = train_pack([cfg])[0]
    labels = sorted(CLASSES)
    assert final["status"] == "done" and final["labels"] == labels
    assert list(final["per_class_f1"]) == labels and len(final["confusion_matrix"]) == 5
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["labels"] == labels
    for name in ("dev_probs.csv", "test_probs.csv"):
        with open(run / name, newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["id", "label", *labels] and all(r[1] in labels for r in rows[1:])
    # the same config again (classes left to the corpus) is the same run: skipped, not refused
    assert train_pack([config_from_dict(yaml.safe_load(cfg.to_yaml()) | {"data": {**cfg.to_dict()["data"],
                                                                                "labels": None}})])[0]["status"] == "done"
