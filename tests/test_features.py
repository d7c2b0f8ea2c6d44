"""Cached backbone features (train.features=cached): the store, and heads trained from it."""
import csv
import json
import shutil

import numpy as np
import pytest

from ser_hpc.config import ConfigError, config_from_dict
from ser_hpc.features.dataset import CachedCrops, crop_frames
from ser_hpc.features.extract import extract, read_all_clips, store_spec
from ser_hpc.features.store import FeatureStore, FeatureStoreError
from ser_hpc.train.schedule import lr_factor
from ser_hpc.train.loop import train_pack
from tests.conftest import run_config_tree

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def small_corpus(demo_assets, tmp_path_factory):
    """A subset of the demo corpus (same audio): at most 16 train clips per class, and the
    first 24 test clips."""
    root = tmp_path_factory.mktemp("feat_corpus")
    src = demo_assets["corpus"]
    with open(src / "train.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    label = rows[0].index("label")
    keep = [r for r in rows[1:] if sum(x[label] == r[label] for x in rows[1:rows.index(r) + 1]) <= 16]
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([rows[0]] + keep)
    for name in ("test.csv", "test_labels.csv"):
        with open(src / name, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        with open(root / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows[:25])
    return root


def small_train_ids(corpus) -> list[str]:
    with open(corpus / "train.csv", newline="", encoding="utf-8") as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def _tree(assets, corpus, run_dir, features_dir, **over):
    tree = run_config_tree(assets, run_dir, **{"data.features_dir": str(features_dir), "data.augment_prob": 0.0,
                                               "train.max_steps": 8, "train.eval_every": 4, "train.log_every": 4,
                                               "train.batch_size": 8, **over})
    tree["data"].update(train_csv=str(corpus / "train.csv"), test_csv=str(corpus / "test.csv"),
                        test_labels_csv=str(corpus / "test_labels.csv"))
    return tree


def _cfg(assets, corpus, run_dir, features_dir, **over):
    return config_from_dict(_tree(assets, corpus, run_dir, features_dir, **over))


@pytest.mark.slow
def test_cached_run_equals_online_run_on_whole_clips(demo_assets, small_corpus, tmp_path):
    """With whole clips (no crop) and no augmentation a cached run sees the same backbone
    outputs as an online one, up to float16 storage: same dev predictions, within tolerance."""
    over = {"data.crop_seconds": 0.0, "model.speech.layers": "weighted", "train.max_steps": 12,
            "train.eval_every": 6}
    online = train_pack([_cfg(demo_assets, small_corpus, tmp_path / "online", tmp_path / "feat", **over)])[0]
    cached = train_pack([_cfg(demo_assets, small_corpus, tmp_path / "cached", tmp_path / "feat",
                            **over, **{"train.features": "cached"})])[0]
    assert online["status"] == cached["status"] == "done"
    assert cached["dev_macro_f1"] == pytest.approx(online["dev_macro_f1"], abs=0.03)

    def probs(run):
        with open(tmp_path / run / "dev_probs.csv", newline="") as fh:
            return np.array([[float(v) for v in list(r.values())[2:]] for r in csv.DictReader(fh)])
    a, b = probs("online"), probs("cached")
    assert a.shape == b.shape and np.abs(a - b).max() < 0.02, np.abs(a - b).max()
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.95
    # The store holds every clip once, at its true length, in float16.
    # (the online run's evaluation store of dev + test clips sits beside it: take the full one)
    store = max((FeatureStore(p) for p in (tmp_path / "feat").iterdir() if (p / "meta.json").is_file()),
                key=lambda s: s.meta["clips"])
    assert store.meta["clips"] == len(small_train_ids(small_corpus)) + 24 and store.views == 1
    clip = read_all_clips(_cfg(demo_assets, small_corpus, tmp_path / "x", tmp_path / "feat")).examples[0]
    states = store.speech(clip.id)
    assert states.dtype == np.float16 and states.shape[1:] == (4, 64)  # transformer layers 1-4 of wav2vec2-tiny
    import soundfile as sf
    seconds = sf.info(str(clip.audio_path)).duration
    assert abs(len(states) - seconds * 50) < 3  # 20 ms frames, no padding stored


@pytest.mark.slow
def test_store_reused_invalidated_and_torn_shard_refused(demo_assets, small_corpus, tmp_path):
    feat = tmp_path / "feat"
    cfg = _cfg(demo_assets, small_corpus, tmp_path / "r", feat, **{"train.features": "cached"})
    first = extract([cfg])
    shard = first.folder / "speech_v0.npy"
    mtime = shard.stat().st_mtime_ns
    again = extract([cfg])  # a relaunch, or a second grid on the same corpus and backbones
    assert again.folder == first.folder and shard.stat().st_mtime_ns == mtime
    # A head that reads fewer layers reuses the store that holds more.
    last = _cfg(demo_assets, small_corpus, tmp_path / "r", feat, **{"train.features": "cached",
                                                                     "model.speech.layers": "last"})
    assert extract([last]).folder == first.folder
    # The same checkpoints at another path (another checkout, a moved project): the same store,
    # keyed by the files' content; a checkpoint overwritten in place gets a new one.
    moved = tmp_path / "moved"
    for kind in ("wav2vec2-tiny", "roberta-tiny"):
        shutil.copytree(demo_assets["backbones"][kind], moved / kind)
    elsewhere = _cfg(demo_assets, small_corpus, tmp_path / "r", feat, **{"train.features": "cached",
                     "model.speech.name": str(moved / "wav2vec2-tiny"), "model.text.name": str(moved / "roberta-tiny")})
    assert extract([elsewhere]).folder == first.folder and shard.stat().st_mtime_ns == mtime
    weights = moved / "wav2vec2-tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert store_spec([elsewhere], read_all_clips(elsewhere))["speech"]["model"] != \
        store_spec([cfg], read_all_clips(cfg))["speech"]["model"]
    # A changed corpus (one transcription edited) gets a new store; the old one is kept.
    changed = tmp_path / "changed"
    shutil.copytree(small_corpus, changed)
    text = (changed / "train.csv").read_text(encoding="utf-8").splitlines()
    head, row = text[0], text[1].rsplit(",", 1)
    text[1] = row[0] + ',"una frase distinta"'
    (changed / "train.csv").write_text("\n".join([head] + text[1:]) + "\n", encoding="utf-8")
    cfg2 = _cfg(demo_assets, changed, tmp_path / "r", feat, **{"train.features": "cached"})
    spec1 = store_spec([cfg], read_all_clips(cfg))
    spec2 = store_spec([cfg2], read_all_clips(cfg2))
    assert spec1["corpus"] == spec2["corpus"] and spec1["text"]["texts"] != spec2["text"]["texts"]
    second = extract([cfg2])
    assert second.folder != first.folder and (first.folder / "meta.json").exists()
    # A torn shard (a truncated copy) is refused by name, never read.
    with open(second.folder / "text.npy", "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 100)
    with pytest.raises(FeatureStoreError, match=r"text\.npy is torn"):
        FeatureStore(second.folder)


@pytest.mark.slow
def test_augmented_views_and_feature_space_crops(demo_assets, small_corpus, tmp_path):
    cfg = _cfg(demo_assets, small_corpus, tmp_path / "r", tmp_path / "feat",
               **{"train.features": "cached", "data.cached_augment_copies": 2, "data.crop_seconds": 1.0})
    store = extract([cfg])
    assert store.views == 3
    corpus = read_all_clips(cfg)
    train = [e for e in corpus.examples if e.id in corpus.train_ids]
    test = [e for e in corpus.examples if e.id not in corpus.train_ids]
    assert all(store.has_view(e.id, 2) for e in train) and not any(store.has_view(e.id, 1) for e in test)
    # A view is the clip augmented (differs), as long as speed perturbation allows.
    e = train[0]
    assert not np.array_equal(store.speech(e.id, 0)[:10], store.speech(e.id, 1)[:10])
    assert crop_frames(store, 1.0) == 49  # the conv stack's frames for 1 s, as the backbone counts them
    always = CachedCrops(train, store, 1.0, 1.0, seed=3)
    never = CachedCrops(train, store, 1.0, 0.0, seed=3)
    items = [always[i]["speech"] for i in range(8)]
    assert all(x.shape == (49, 4, 64) for x in items)
    clean = [never[i]["speech"] for i in range(8)]
    assert any(not np.array_equal(a, b) for a, b in zip(items, clean))
    # Same (seed, epoch, index) -> same crop and view; another epoch draws again.
    assert np.array_equal(CachedCrops(train, store, 1.0, 1.0, seed=3)[5]["speech"], items[5])


def test_cached_pack_resumes_exactly(demo_assets, small_corpus, tmp_path):
    """A killed cached pack resumes from its checkpoint to the same result (same data order, RNG)."""
    # plateau + warmup: the lr of the first 4 steps does not depend on the run's length
    over = {"train.features": "cached", "model.fusion": "late", "train.lr_schedule": "plateau",
            "train.warmup_steps": 3, "train.lr_patience": 1, "train.lr_decay": 0.5}
    whole = train_pack([_cfg(demo_assets, small_corpus, tmp_path / "whole", tmp_path / "feat", **over)])[0]
    cut = _cfg(demo_assets, small_corpus, tmp_path / "cut", tmp_path / "feat", **over, **{"train.max_steps": 4})
    train_pack([cut])[0]
    # Relaunch the same run with the full schedule from its step-4 checkpoint.
    tree = _tree(demo_assets, small_corpus, tmp_path / "cut", tmp_path / "feat", **over)
    (tmp_path / "cut" / "final.json").unlink()
    (tmp_path / "cut" / "config.yaml").write_text(config_from_dict(tree).to_yaml())
    resumed = train_pack([config_from_dict(tree)])[0]
    assert resumed["resumed_from"] == [4]
    assert resumed["dev_macro_f1"] == whole["dev_macro_f1"]
    assert (tmp_path / "cut" / "dev_probs.csv").read_text() == (tmp_path / "whole" / "dev_probs.csv").read_text()


def test_cached_refuses_finetuning_and_deepspeed(demo_assets, small_corpus, tmp_path):
    with pytest.raises(ConfigError, match="cannot fine-tune backbone layers"):
        _cfg(demo_assets, small_corpus, tmp_path, tmp_path / "f",
             **{"train.features": "cached", "model.speech.finetune_top_layers": 1})
    with pytest.raises(ConfigError, match="deepspeed"):
        _cfg(demo_assets, small_corpus, tmp_path, tmp_path / "f",
             **{"train.features": "cached", "train.strategy": "deepspeed"})
    tree = _tree(demo_assets, small_corpus, tmp_path, tmp_path / "f", **{"train.features": "cached"})
    tree["data"]["features_dir"] = None
    with pytest.raises(ConfigError, match="data.features_dir"):
        config_from_dict(tree)


@pytest.mark.parametrize("schedule", ["plateau", "cosine", "linear"])
def test_lr_schedules(schedule):
    f = [lr_factor(schedule, s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a <= b + 1e-12 for a, b in zip(f[:10], f[1:10]))
    if schedule == "plateau":
        assert f[10:] == [1.0] * 90
        assert lr_factor("plateau", 50, 100, 10, plateau_scale=0.81) == pytest.approx(0.81)
    else:
        assert f[10] == pytest.approx(1.0) and f[-1] < 0.02  # decays to ~0 at the last step
        assert all(a >= b for a, b in zip(f[10:], f[11:]))
        assert f[55] == pytest.approx(0.5, abs=0.02)


def test_every_pooling_and_fusion_trains_in_one_pack(demo_assets, small_corpus, tmp_path):
    variants = [(p, f) for p in ("attention", "mean", "attentive_stats") for f in ("early", "late")]
    cfgs = [_cfg(demo_assets, small_corpus, tmp_path / f"{p}-{f}", tmp_path / "feat",
                 **{"train.features": "cached", "model.pooling": p, "model.fusion": f, "run.name": f"{p}-{f}"})
            for p, f in variants]
    finals = train_pack(cfgs)
    assert [r["status"] for r in finals] == ["done"] * 6
    for (p, f), final in zip(variants, finals):
        cfg = json.loads((tmp_path / f"{p}-{f}" / "final.json").read_text())
        assert cfg["dev_macro_f1"] == final["dev_macro_f1"] and final["test_macro_f1"] is not None


@pytest.mark.slow
def test_one_modality_heads_share_the_fused_pack_and_store(demo_assets, small_corpus, tmp_path):
    """On cached features a text-only and an audio-only head join a fused head's pack and
    read its store (holding both), each only its own modality: every run ends exactly as
    when it trains alone on a store of its own modality, and no second store is written."""
    def cfg(where, feat, modalities, extra=None):
        over = {"train.features": "cached", "model.modalities": modalities, "run.name": modalities,
                "model.fusion": "late", **(extra or {})}
        return _cfg(demo_assets, small_corpus, tmp_path / where / modalities, tmp_path / feat, **over)
    kinds = ["audio+text", "text", "audio"]
    # the one-modality entries of a grid clear the encoder they do not read
    clear = {"text": {"model.speech.name": ""}, "audio": {"model.text.name": ""}}
    packed = train_pack([cfg("pack", "feat", m, clear.get(m)) for m in kinds])
    assert len([p for p in (tmp_path / "feat").iterdir() if (p / "meta.json").is_file()]) == 1
    for kind, final in zip(kinds, packed):
        alone = train_pack([cfg("alone", f"feat-{kind}", kind, clear.get(kind))])[0]
        assert final["status"] == alone["status"] == "done"
        assert final["dev_macro_f1"] == alone["dev_macro_f1"], kind
        for name in ("dev_probs.csv", "test_probs.csv"):
            assert ((tmp_path / "pack" / kind / name).read_text()
                    == (tmp_path / "alone" / kind / name).read_text()), (kind, name)
    alone_stores = {kind: [json.loads((p / "meta.json").read_text()) for p in (tmp_path / f"feat-{kind}").iterdir()]
                    for kind in ("text", "audio")}
    assert alone_stores["text"][0]["speech"] is None and alone_stores["audio"][0]["text"] is None


def test_online_evaluation_reads_a_memory_mapped_store(demo_assets, small_corpus, tmp_path):
    """Online training with data.features_dir keeps dev/test backbone outputs in a float16
    store of just those clips (memory-mapped), not in RAM: same dev predictions within
    float16 precision as the in-memory float32 cache."""
    ram = train_pack([_cfg(demo_assets, small_corpus, tmp_path / "ram", tmp_path / "unused",
                         **{"data.features_dir": None})])[0]
    disk = train_pack([_cfg(demo_assets, small_corpus, tmp_path / "disk", tmp_path / "feat")])[0]
    assert ram["status"] == disk["status"] == "done"
    # (the online run's evaluation store of dev + test clips sits beside it: take the full one)
    store = max((FeatureStore(p) for p in (tmp_path / "feat").iterdir() if (p / "meta.json").is_file()),
                key=lambda s: s.meta["clips"])
    n_train_csv = len((small_corpus / "train.csv").read_text(encoding="utf-8").splitlines()) - 1
    assert store.meta["clips"] == round(0.16 * n_train_csv) + 24  # the dev split and the test clips only
    assert not (tmp_path / "unused").exists()

    def probs(run, name):
        with open(tmp_path / run / name, newline="") as fh:
            return np.array([[float(v) for v in list(r.values())[2:]] for r in csv.DictReader(fh)])
    for name in ("dev_probs.csv", "test_probs.csv"):
        a, b = probs("ram", name), probs("disk", name)
        assert a.shape == b.shape and np.abs(a - b).max() < 0.02, (name, np.abs(a - b).max())
