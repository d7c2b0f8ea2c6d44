"""One training run end to end on the demo corpus, and every bad input it must refuse."""
import csv
import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from ser_hpc.config import ConfigError, config_from_dict, copy_config
from ser_hpc.data.corpus import CorpusError
from ser_hpc.models.encoders import BackboneError
from ser_hpc.train.loop import train_pack
from tests.conftest import TEST_CORPUS, run_config_tree


def _cfg(assets, run_dir, **over):
    return config_from_dict(run_config_tree(assets, run_dir, **over))


@pytest.mark.slow
def test_end_to_end_run_beats_chance_and_writes_its_folder(demo_assets, tmp_path):
    run = tmp_path / "run"
    # Online training (the backbones run at every step) with the demo's layer mixes and crops.
    cfg = _cfg(demo_assets, run, **{"train.max_steps": 300, "train.eval_every": 50, "train.log_every": 50,
                                    "model.text.layers": "last", "model.speech.layers": "weighted",
                                    "model.head_width": 128, "model.hidden_layers": 1, "data.crop_seconds": 3.0})
    final = train_pack([cfg])[0]
    assert final["status"] == "done" and final["reason"] is None
    # Beating chance, measured: the predictions on dev + test (134 clips) against 2000
    # shuffles of the same predictions (same predicted class mix, links to the truth broken).
    gold, pred = [], []
    for name in ("dev_probs.csv", "test_probs.csv"):
        with open(run / name, newline="") as fh:
            for row in csv.DictReader(fh):
                gold.append(final["labels"].index(row["label"]))
                pred.append(max(range(6), key=lambda c: float(row[final["labels"][c]])))
    observed = f1_score(gold, pred, labels=range(6), average="macro", zero_division=0)
    rng = np.random.default_rng(0)
    shuffled = [f1_score(gold, rng.permutation(pred), labels=range(6), average="macro", zero_division=0)
                for _ in range(2000)]
    assert observed > max(shuffled), (observed, max(shuffled))    # p < 1/2000
    assert observed > 1.6 * np.mean(shuffled), (observed, np.mean(shuffled))  # and by a wide margin
    assert min(final["dev_macro_f1"], final["test_macro_f1"]) > 0.2, final  # chance is about 0.15
    assert set(final["per_class_f1"]) == {"neutral", "disgust", "anger", "sadness", "joy", "fear"}
    cm = final["confusion_matrix"]
    assert len(cm) == 6 and all(len(r) == 6 for r in cm)
    assert sum(map(sum, cm)) == sum(1 for _ in open(run / "dev_probs.csv")) - 1
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(50, 301, 50))
    assert max(l["dev_macro_f1"] for l in lines) == pytest.approx(final["dev_macro_f1"])
    # config.yaml: the run's config with its resolved classes; the caller's config is left as it was.
    resolved = copy_config(cfg)
    resolved.data.labels = final["labels"]
    assert (run / "config.yaml").read_text() == resolved.to_yaml() and cfg.data.labels is None
    # The checkpoint holds the head only, never a frozen backbone weight.
    weights = load_file(run / "best_head.safetensors")
    assert weights and not any("backbone" in k for k in weights)
    assert sum(v.numel() for v in weights.values()) < 200_000
    with open(run / "test_probs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == TEST_CORPUS[1] and all(abs(sum(float(r[c]) for c in final["labels"]) - 1) < 1e-3 for r in rows)
    # A rerun never redoes a finished run.
    mtime = (run / "final.json").stat().st_mtime_ns
    assert train_pack([cfg])[0]["dev_macro_f1"] == final["dev_macro_f1"]
    assert (run / "final.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_same_seed_same_result(demo_assets, tmp_path):
    a = train_pack([_cfg(demo_assets, tmp_path / "a")])[0]
    b = train_pack([_cfg(demo_assets, tmp_path / "b")])[0]
    assert a["dev_macro_f1"] == b["dev_macro_f1"]
    assert (tmp_path / "a" / "dev_probs.csv").read_text() == (tmp_path / "b" / "dev_probs.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("modalities", ["audio", "text"])
def test_single_modality_runs(demo_assets, tmp_path, modalities):
    final = train_pack([_cfg(demo_assets, tmp_path / modalities, **{"model.modalities": modalities})])[0]
    assert final["status"] == "done"


@pytest.mark.slow
def test_bf16_and_grad_accumulation(demo_assets, tmp_path):
    final = train_pack([_cfg(demo_assets, tmp_path / "bf16", **{"train.bf16": True, "train.grad_accum_steps": 2})])[0]
    assert final["status"] == "done" and final["steps"] == 6


def test_nan_loss_fails_the_run_with_reason(demo_assets, tmp_path):
    final = train_pack([_cfg(demo_assets, tmp_path / "nan", **{"train.lr": 1e30})])[0]
    assert final["status"] == "failed"
    assert "diverged" in final["reason"] and "loss is" in final["reason"]
    on_disk = json.loads((tmp_path / "nan" / "final.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["reason"] == final["reason"]


def _copy_corpus(assets, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(assets["corpus"], corpus)
    return corpus


def _first_train_id(corpus):
    with open(corpus / "train.csv", newline="", encoding="utf-8") as fh:
        return next(csv.DictReader(fh))["id"]


def test_missing_audio_fails_before_training(demo_assets, tmp_path):
    corpus = _copy_corpus(demo_assets, tmp_path)
    ident = _first_train_id(corpus)
    (corpus / "audio" / ident).unlink()
    cfg = _cfg(demo_assets, tmp_path / "run", **{"data.train_csv": str(corpus / "train.csv"),
                                                 "data.audio_dir": str(corpus / "audio")})
    with pytest.raises(CorpusError, match=rf"train\.csv, row 2: audio file not found: .*{ident}"):
        train_pack([cfg])[0]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["status"] == "failed" and ident in final["reason"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_zero_length_audio_fails_before_training(demo_assets, tmp_path):
    corpus = _copy_corpus(demo_assets, tmp_path)
    ident = _first_train_id(corpus)
    (corpus / "audio" / ident).write_bytes(b"")
    cfg = _cfg(demo_assets, tmp_path / "run", **{"data.train_csv": str(corpus / "train.csv"),
                                                 "data.audio_dir": str(corpus / "audio")})
    with pytest.raises(CorpusError, match=rf"row 2: .*{ident}"):
        train_pack([cfg])[0]


def test_bad_label_fails_before_training(demo_assets, tmp_path):
    corpus = _copy_corpus(demo_assets, tmp_path)
    text = (corpus / "train.csv").read_text(encoding="utf-8").splitlines()
    ident, label, rest = text[3].split(",", 2)
    text[3] = ",".join([ident, "surprise", rest])
    (corpus / "train.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
    cfg = _cfg(demo_assets, tmp_path / "run", **{"data.train_csv": str(corpus / "train.csv"),
                                                 "data.audio_dir": str(corpus / "audio")})
    with pytest.raises(CorpusError, match=r"row 4: label 'surprise'"):
        train_pack([cfg])[0]


def test_missing_model_path_fails_before_training(demo_assets, tmp_path):
    cfg = _cfg(demo_assets, tmp_path / "run", **{"model.text.name": str(tmp_path / "no-such-model")})
    with pytest.raises(BackboneError, match="no-such-model"):
        train_pack([cfg])[0]
    assert json.loads((tmp_path / "run" / "final.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_folder_of_another_config_is_not_overwritten(demo_assets, tmp_path):
    run = tmp_path / "run"
    train_pack([_cfg(demo_assets, run)])[0]
    before = (run / "final.json").read_text()
    with pytest.raises(ConfigError, match="different config"):
        train_pack([_cfg(demo_assets, run, **{"train.lr": 1e-4})])[0]
    assert (run / "final.json").read_text() == before
