"""Speech encoder families: Whisper (log-mel, 30 s windows, frames that cover audio),
emotion2vec (a FunASR folder), the wav2vec2 family's model types, layer subsets, and a
feature store written in shards that a killed extraction resumes."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ser_hpc.config import ConfigError, config_from_dict
from ser_hpc.models.backbones import FrozenBackbones
from ser_hpc.models.encoders import BackboneError
from ser_hpc.models.speech_families import WhisperSpeech, frames_for, speech_encoder, speech_spec
from tests.conftest import REPO, run_config_tree
from tests.test_grid import write_grid

SR = 16000


@pytest.fixture(scope="module")
def whisper(demo_assets):
    return WhisperSpeech(str(demo_assets["backbones"]["whisper-tiny"]))


def test_whisper_keeps_the_frames_that_cover_audio_whatever_the_batch(whisper):
    torch.manual_seed(0)
    lengths = [3 * SR, 45 * SR, 10 * SR + 7, 401]
    waves = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.1 * torch.randn(n)
    states, mask = whisper(waves, torch.tensor(lengths))
    assert states.shape == (5, 4, 2250, 64)  # 4 layers + embeddings; the 45 s clip's frames
    assert mask.sum(1).tolist() == [-(-n // 320) for n in lengths] == [150, 2250, 501, 2]
    assert (states[:, ~mask] == 0).all()  # the 30 s window's padding is never kept
    for i, n in enumerate(lengths):  # each clip alone: the same frames as in the batch
        alone, m = whisper(waves[i:i + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(alone[:, 0, : m.sum()], states[:, i, : m.sum()], atol=1e-5, rtol=1e-5)
    # 45 s = two windows: the second window's frames are those of its 15 s encoded on their own.
    tail, _ = whisper(waves[1:2, 30 * SR: 45 * SR], torch.tensor([15 * SR]))
    torch.testing.assert_close(states[:, 1, 1500:2250], tail[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[:, 1, :750], tail[:, 0])  # the windows really differ


def test_families_are_detected_from_the_checkpoint_and_others_refused(demo_assets, tmp_path):
    from transformers import Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertModel
    bb = demo_assets["backbones"]
    assert speech_spec(str(bb["whisper-tiny"])).family == "whisper"
    assert speech_spec(str(bb["whisper-tiny"])).frame_rate == 50.0
    spec = speech_spec(str(bb["wav2vec2-tiny"]))
    assert (spec.family, spec.model_type, spec.num_states, spec.width) == ("wav2vec2", "wav2vec2", 5, 64)
    assert speech_spec(str(bb["wavlm-tiny"])).model_type == "wavlm"
    for cfg_cls, model_cls, kind in ((HubertConfig, HubertModel, "hubert"),
                                     (Data2VecAudioConfig, Data2VecAudioModel, "data2vec-audio")):
        cfg = cfg_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
        model_cls(cfg).save_pretrained(tmp_path / kind)
        enc = speech_encoder(str(tmp_path / kind))
        states, mask = enc(torch.randn(2, SR), torch.tensor([SR, SR // 2]))
        assert speech_spec(str(tmp_path / kind)).family == "wav2vec2" and states.shape[0] == 3
        assert mask.sum(1).tolist() == [int(frames_for(enc.frame_rule, n)) for n in (SR, SR // 2)] == [49, 24]
    with pytest.raises(BackboneError, match=r"is a 'bert' checkpoint.*supported families: wav2vec2 \(wav2vec2, "
                                            r"hubert, wavlm, data2vec-audio\); whisper"):
        speech_spec(str(bb["bert-tiny"]))


def test_emotion2vec_folder_is_a_speech_backbone(tmp_path):
    from ser_hpc.models.availability import check_available
    from ser_hpc.models.emotion2vec import save_random_emotion2vec
    folder = save_random_emotion2vec(tmp_path / "e2v", depth=2, embed_dim=32)
    spec = speech_spec(str(folder))
    assert (spec.family, spec.num_states, spec.width) == ("emotion2vec", 3, 32)
    check_available(str(folder), "speech")  # the launcher accepts it
    backbones = FrozenBackbones(str(folder), None)
    states, mask = backbones.speech(torch.randn(2, SR), torch.tensor([SR, SR // 2]))
    assert states.shape[:2] == (3, 2) and mask.sum(1).tolist() == backbones.speech.frame_lengths(
        torch.tensor([SR, SR // 2])).tolist()
    with pytest.raises(BackboneError, match="fine-tuning emotion2vec layers is not supported"):
        speech_encoder(str(folder), finetune_top_layers=1)


def test_layer_choices(demo_assets):
    from ser_hpc.models.head import layers_used
    assert layers_used("every_2", 25) == list(range(2, 25, 2)) and layers_used([24, 6, 12, 6], 25) == [6, 12, 24]
    assert layers_used("every_5", 25) == [5, 10, 15, 20] and layers_used("last", 25) == [24]
    with pytest.raises(ConfigError, match=r"model.speech.layers \[6, 30\] names hidden states \[30\]"):
        layers_used([6, 30], 25, "model.speech.layers")
    tree = run_config_tree(demo_assets, "x", **{"model.speech.layers": "every_0"})
    with pytest.raises(ConfigError, match="every_N"):
        config_from_dict(tree)
    cfg = config_from_dict(run_config_tree(demo_assets, "x", **{"model.speech.layers": [2, 4]}))
    assert cfg.model.speech.layers == [2, 4]


@pytest.mark.slow
def test_whisper_cached_equals_online_and_fine_tunes(demo_assets, tmp_path):
    """Whole clips: the cached run reads what the online run computes (float16 aside); a layer
    subset is all the store holds; the top encoder layer of Whisper can be fine-tuned."""
    from ser_hpc.features.store import FeatureStore
    from ser_hpc.train.loop import train_pack
    over = {"model.speech.name": str(demo_assets["backbones"]["whisper-tiny"]), "data.crop_seconds": 0.0,
            "data.features_dir": str(tmp_path / "feat"), "train.max_steps": 6, "train.eval_every": 3,
            "model.speech.layers": [2, 4]}
    runs = {mode: train_pack([config_from_dict(run_config_tree(demo_assets, tmp_path / mode, **over,
                                                               **{"train.features": mode}))])[0]
            for mode in ("online", "cached")}
    assert runs["online"]["status"] == runs["cached"]["status"] == "done"

    def probs(run):
        with open(tmp_path / run / "dev_probs.csv", newline="") as fh:
            return np.array([[float(v) for v in list(r.values())[2:]] for r in csv.DictReader(fh)])
    assert np.abs(probs("online") - probs("cached")).max() < 0.02
    store = max((FeatureStore(p) for p in (tmp_path / "feat").iterdir() if (p / "meta.json").is_file()),
                key=lambda s: s.meta["clips"])
    assert store.speech_layers == (2, 4) and store.meta["speech"]["family"] == "whisper"
    tuned = train_pack([config_from_dict(run_config_tree(demo_assets, tmp_path / "tuned", **{
        **over, "model.speech.finetune_top_layers": 1, "train.max_steps": 2, "train.eval_every": 2}))])[0]
    assert tuned["status"] == "done" and (tmp_path / "tuned" / "best_backbone.safetensors").is_file()


@pytest.mark.slow
def test_a_store_in_shards_resumes_and_reads_as_one(demo_assets, tmp_path):
    from ser_hpc.features.extract import extract, read_all_clips, shard_plan
    over = {"train.features": "cached", "data.features_dir": str(tmp_path / "sharded"), "data.crop_seconds": 0.0}
    cfg = config_from_dict(run_config_tree(demo_assets, tmp_path / "r", **over, **{"data.features_shard_hours": 0.05}))
    shards = shard_plan(read_all_clips(cfg), 0.05)
    assert len(shards) >= 3 and sorted(i for s in shards for i in s) == list(range(336))
    assert extract([cfg], shard=1) is None  # one array task's shard: the store is not complete yet
    folder = next((tmp_path / "sharded").iterdir())
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "speech_v0_s1.npy" in written and "meta.json" not in written
    store = extract([cfg])  # "resumes": writes the other shards, keeps shard 1
    assert store.meta["shards"] == len(shards) and (folder / "speech_v0_s1.npy").stat().st_mtime_ns == \
        written["speech_v0_s1.npy"]
    whole = extract([config_from_dict(run_config_tree(demo_assets, tmp_path / "r", **{
        **over, "data.features_dir": str(tmp_path / "whole"), "data.features_shard_hours": 0}))])
    assert whole.meta["shards"] == 1
    for ex in read_all_clips(cfg).examples[::37]:  # other batches, other padding: float16 rounding apart
        np.testing.assert_allclose(store.speech(ex.id), whole.speech(ex.id), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(store.text(ex.id), whole.text(ex.id), atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_the_launcher_refuses_an_unsupported_family_and_prints_sizes(demo_assets, tmp_path):
    bb = demo_assets["backbones"]
    grid = write_grid(tmp_path, demo_assets, pairs=[{"name": "bert-as-speech", "speech": str(bb["bert-tiny"]),
                                                     "text": str(bb["roberta-tiny"])}])
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(grid), "--dry-run",
                          "--cluster", "local", "--quick-check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "is a 'bert' checkpoint, which ser_hpc cannot use as a speech encoder" in res.stderr
    # Whisper + cached features: the store's projected size, the window's cost, the layer refusal.
    grid = write_grid(tmp_path, demo_assets, name="w", overrides={
        "train.features": "cached", "data.features_dir": str(tmp_path / "feat"), "train.max_steps": 2},
        pairs=[{"name": "whisper", "speech": str(bb["whisper-tiny"]), "text": str(bb["roberta-tiny"])}],
        axes={"model.speech.layers": ["weighted", [2, 4]]})
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(grid), "--dry-run",
                          "--cluster", "local", "--quick-check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("  to extract:"))
    assert "336 clips" in line and "speech 4 layer(s), text 1 layer(s)" in line and "GB free" in line
    assert "pads every clip to 30 s windows: 336 clips of mean" in res.stdout
    small = write_grid(tmp_path, demo_assets, name="w2", overrides={
        "train.features": "cached", "data.features_dir": str(tmp_path / "feat"), "data.features_max_gb": 0.001},
        pairs=[{"name": "whisper", "speech": str(bb["whisper-tiny"]), "text": str(bb["roberta-tiny"])}],
        axes={"model.speech.layers": [[2, 9]]})
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(small), "--dry-run",
                          "--cluster", "local", "--quick-check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "names hidden states [9], but the encoder has 5" in res.stderr, res.stderr[-2000:]


def test_one_checkpoint_under_two_names_is_one_feature_store(demo_assets, tmp_path):
    """Stores are keyed by checkpoint content: two pairs naming copies of one checkpoint read one
    store, so the dry run lists (and the features array extracts) it once."""
    bb = demo_assets["backbones"]
    copy = tmp_path / "copy-of-wav2vec2"
    shutil.copytree(bb["wav2vec2-tiny"], copy)
    grid = write_grid(tmp_path, demo_assets, name="twice", overrides={
        "train.features": "cached", "data.features_dir": str(tmp_path / "feat"), "train.max_steps": 2},
        pairs=[{"name": "original", "speech": str(bb["wav2vec2-tiny"]), "text": str(bb["roberta-tiny"])},
               {"name": "copy", "speech": str(copy), "text": str(bb["roberta-tiny"])}],
        axes={"model.hidden_layers": [1]})
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "launch_grid.py"), str(grid), "--dry-run",
                          "--cluster", "local", "--quick-check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stores = [x for x in res.stdout.splitlines() if x.startswith("  to extract:")]
    assert len(stores) == 1, res.stdout
    assert "a features job, 1 task(s)" in res.stdout, res.stdout
