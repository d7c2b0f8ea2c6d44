"""A pack: K runs in one process on one backbone forward per batch.

The promise tested here: every run of a pack ends exactly as the same run trained alone
(same seed), also after an interrupted and resumed pack; a head that stops early or
diverges stops alone; the dev backbone outputs are computed once and reused.
"""
import csv
import json
import shutil
import signal

import numpy as np
import pytest
import torch

from ser_hpc.config import ConfigError, config_from_dict
from ser_hpc.data.sources import load_splits
from ser_hpc.train import distributed as D
from ser_hpc.train.preemption import Preempted, PreemptionFlag
from ser_hpc.train.heads import predict
from ser_hpc.train.loop import setup, train_pack
from tests.conftest import run_config_tree
from tests.run_compare import assert_same_run, read_metrics

# Heads that differ in every kind of head setting; dropout > 0 so that each head's RNG
# stream matters. "stopper" stops early (its lr is too small to improve after its
# first evaluations), "nan" diverges at once.
HEADS = {
    "base": {},
    "deep": {"model.hidden_layers": 2, "model.dropout": 0.3, "train.lr": 1e-3},
    "wide-last": {"model.head_width": 96, "model.speech.layers": "last", "train.weight_decay": 0.1,
                  "model.fusion_attention_heads": 2},
    "stopper": {"train.lr": 1e-7, "train.early_stop_patience": 1, "train.class_weights": "none"},
}
COMMON = {"train.max_steps": 24, "train.eval_every": 6, "train.log_every": 6, "model.dropout": 0.2,
          "data.crop_seconds": 1.5}
# Same seed, same batches, same arithmetic per head: we expect bit-identical results on
# CPU; the tolerance only absorbs float summation order, should a BLAS kernel change it.
ATOL = 1e-6


def _cfg(assets, run_dir, name, **over):
    tree = run_config_tree(assets, run_dir, **{**COMMON, **HEADS.get(name, {}), **over})
    tree["run"]["name"] = name
    return config_from_dict(tree)


def _probs(path):
    with open(path, newline="") as fh:
        return {r["id"]: [float(v) for k, v in r.items() if k not in ("id", "label")] for r in csv.DictReader(fh)}


def _assert_same_run(a, b, fa, fb):
    assert fa["status"] == fb["status"] == "done" and fa["stopped_early"] == fb["stopped_early"]
    assert_same_run(a, b, atol=ATOL)  # finals, every evaluation's F1 and losses
    for x, y in zip(read_metrics(a), read_metrics(b)):
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)  # each head keeps its own lr schedule
    for name in ("dev_probs.csv", "test_probs.csv"):
        pa, pb = _probs(a / name), _probs(b / name)
        assert pa.keys() == pb.keys()
        assert max(abs(u - v) for k in pa for u, v in zip(pa[k], pb[k])) <= ATOL


@pytest.fixture(scope="module")
def alone(demo_assets, tmp_path_factory):
    """Each head trained alone, as its own process would."""
    root = tmp_path_factory.mktemp("alone")
    return {name: (root / name, train_pack([_cfg(demo_assets, root / name, name)])[0]) for name in HEADS}


@pytest.mark.slow
def test_every_run_of_a_pack_ends_as_it_does_alone(demo_assets, alone, tmp_path):
    names = list(HEADS) + ["nan"]
    cfgs = [_cfg(demo_assets, tmp_path / n, n, **({"train.lr": 1e30} if n == "nan" else {})) for n in names]
    finals = dict(zip(names, train_pack(cfgs)))
    for name in HEADS:
        _assert_same_run(tmp_path / name, alone[name][0], finals[name], alone[name][1])
        assert json.loads((tmp_path / name / "final.json").read_text()) == finals[name]
        assert (tmp_path / name / "best_head.safetensors").exists()
    # The early stopper stopped alone, the others ran to the last step.
    assert finals["stopper"]["stopped_early"] and finals["stopper"]["steps"] < 24
    assert all(finals[n]["steps"] == 24 for n in ("base", "deep", "wide-last"))
    # The diverged head failed alone, with the reason, and no best weights.
    assert finals["nan"]["status"] == "failed" and "diverged" in finals["nan"]["reason"]
    assert json.loads((tmp_path / "nan" / "final.json").read_text())["status"] == "failed"
    # The heads really differ (the test would prove nothing if they were the same model).
    assert len({json.dumps(f["confusion_matrix"]) for n, f in finals.items() if n != "nan"}) >= 3
    # A rerun of the pack redoes nothing.
    mtime = (tmp_path / "base" / "final.json").stat().st_mtime_ns
    again = train_pack(cfgs[:4])
    assert [f["dev_macro_f1"] for f in again] == [finals[n]["dev_macro_f1"] for n in HEADS]
    assert (tmp_path / "base" / "final.json").stat().st_mtime_ns == mtime


class _SignalAfter(PreemptionFlag):
    """The preemption flag as the loop sees it once SIGTERM arrived after ``steps`` steps."""

    def __init__(self, steps):
        super().__init__()
        self.checks = steps

    @property
    def raised(self):
        self.checks -= 1
        if self.checks < 0:
            self.signum = signal.SIGTERM
        return self.signum is not None


@pytest.mark.slow
def test_a_pack_resumes_even_when_killed_between_two_heads_checkpoints(demo_assets, alone, tmp_path):
    names = ["base", "deep", "wide-last"]
    cfgs = [_cfg(demo_assets, tmp_path / n, n) for n in names]
    with pytest.raises(Preempted) as info:
        train_pack(cfgs, _SignalAfter(15))
    assert info.value.step == 16
    # Kill between heads: "deep" wrote its step-16 checkpoint, "base" did not get to it.
    ckpt = tmp_path / "base" / "checkpoint"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000012", "step_000016"]
    shutil.rmtree(ckpt / "step_000016")
    (ckpt / "latest.json").write_text(json.dumps({"step": 12, "dir": "step_000012"}))
    finals = train_pack(cfgs)
    for name, final in zip(names, finals):
        assert final["resumed_from"] == [12]  # all rolled back to the step they all hold
        _assert_same_run(tmp_path / name, alone[name][0], final, alone[name][1])
    assert sorted(p.name for p in (tmp_path / "deep" / "checkpoint").glob("step_*")) == ["step_000018", "step_000024"]


def test_only_head_settings_may_differ_within_a_pack(demo_assets, tmp_path):
    a = _cfg(demo_assets, tmp_path / "a", "base")
    with pytest.raises(ConfigError, match="differ in data.crop_seconds"):
        train_pack([a, _cfg(demo_assets, tmp_path / "b", "base", **{"data.crop_seconds": 3.0})])
    with pytest.raises(ConfigError, match="fine-tunes backbone layers"):
        train_pack([a, _cfg(demo_assets, tmp_path / "c", "base", **{"model.speech.finetune_top_layers": 1})])
    with pytest.raises(ConfigError, match="same run.dir"):
        train_pack([a, _cfg(demo_assets, tmp_path / "a", "deep")])
    assert not (tmp_path / "a").exists()  # refused before anything was written


@pytest.mark.slow
def test_dev_backbone_outputs_are_computed_once_and_give_the_fresh_predictions(demo_assets, tmp_path):
    cfgs = [_cfg(demo_assets, tmp_path / n, n) for n in ("base", "deep")]
    trainer, heads = setup(cfgs, load_splits(cfgs[0].data), D.DistEnv(), torch.device("cpu"))
    calls = []
    trainer.backbones.register_forward_hook(lambda *a: calls.append(1))
    dev = trainer.splits.dev
    first = predict(trainer, heads, dev, cache=True)
    n_batches = len(calls)
    assert n_batches == -(-len(dev) // 16)  # one forward per length-sorted batch, for both heads
    again = predict(trainer, heads, dev, cache=True)
    assert len(calls) == n_batches  # cached: no backbone forward at all
    fresh = predict(trainer, heads, dev, cache=False)
    for k in (0, 1):
        assert first[k].ids == again[k].ids == fresh[k].ids == sorted(e.id for e in dev)
        np.testing.assert_array_equal(first[k].probs, again[k].probs)
        np.testing.assert_allclose(first[k].probs, fresh[k].probs, atol=1e-6)
    # Padding does not change a prediction: one clip per batch gives the same probabilities.
    trainer.cfg.data.eval_batch_size = 1
    trainer._dev_cache = None
    single = predict(trainer, heads, dev, cache=True)
    for k in (0, 1):
        np.testing.assert_allclose(single[k].probs, first[k].probs, atol=1e-5)
    # float16 storage halves the memory at a small, bounded cost.
    full = trainer._dev_cache.nbytes
    trainer.cfg.train.eval_cache_dtype = "float16"
    trainer._dev_cache = None
    half = predict(trainer, heads, dev, cache=True)
    assert trainer._dev_cache.nbytes < 0.6 * full
    for k in (0, 1):
        np.testing.assert_allclose(half[k].probs, single[k].probs, atol=2e-2)
        assert (half[k].probs.argmax(1) == single[k].probs.argmax(1)).mean() > 0.95


def test_the_rng_streams_keep_heads_apart(demo_assets, tmp_path):
    """The same two heads, one shared global RNG: dropout masks would differ from alone."""
    cfgs = [_cfg(demo_assets, tmp_path / n, n) for n in ("base", "base2")]
    _, (a, b) = setup(cfgs, load_splits(cfgs[0].data), D.DistEnv(), torch.device("cpu"))
    feats = torch.randn(4, 8)
    drop = torch.nn.Dropout(0.5)
    with a.rng:
        first = drop(feats)
    with b.rng:  # same seed, same init: b's stream starts where a's did
        second = drop(feats)
    assert torch.equal(first, second)
    with a.rng:
        third = drop(feats)
    assert not torch.equal(first, third)  # a's stream moved on


# Every head setting (HEAD_KEYS but the run's name and folder) with a value that differs
# from BASE_HEAD: a pack of these heads must train each one exactly as it trains alone.
BASE_HEAD = {"train.lr_schedule": "plateau", "train.lr_patience": 1, "train.lr_decay": 0.9, "train.warmup_steps": 0,
             "train.max_grad_norm": 0.0, "model.dropout": 0.1, "model.speech.layers": "weighted",
             "model.text.layers": "last", "model.fusion": "early", "model.pooling": "attention"}
ONE_KEY_DIFFERS = {
    "model.hidden_layers": 0, "model.head_width": 48, "model.dropout": 0.3, "model.fusion_dim": 40,
    "model.fusion_attention_heads": 2, "model.speech.layers": "last", "model.text.layers": "weighted",
    "model.fusion": "late", "model.pooling": "mean", "train.lr": 5e-3, "train.weight_decay": 0.3,
    "train.lr_schedule": "cosine", "train.warmup_steps": 5, "train.lr_decay": 0.5, "train.lr_patience": 3,
    "train.early_stop_patience": 1, "train.max_grad_norm": 0.05, "train.class_weights": "sqrt_inverse",
}
CACHED = {"train.features": "cached", "train.max_steps": 12, "train.eval_every": 3, "train.log_every": 3,
          "train.checkpoint_every": 12,
          "data.augment_prob": 0.0, "data.crop_seconds": 1.5}


@pytest.mark.slow
def test_every_head_setting_is_the_heads_own(demo_assets, tmp_path_factory, tmp_path):
    """For each key a pack lets differ (HEAD_KEYS), a head whose value differs from the
    pack's first run trains as it does alone: its own lr schedule, warmup, clipping, decay,
    early stopping, class weights, layers and architecture (cached features: cheap heads)."""
    from ser_hpc.train.packing import HEAD_KEYS
    assert set(ONE_KEY_DIFFERS) == HEAD_KEYS - {"run.name", "run.dir"}, "a new head key needs a value here"
    features = tmp_path_factory.mktemp("pack_keys_features")
    over = {**CACHED, **BASE_HEAD, "data.features_dir": str(features)}
    names = ["base"] + sorted(ONE_KEY_DIFFERS)
    cfgs = [_cfg(demo_assets, tmp_path / "pack" / n, n, **{**over, **({n: ONE_KEY_DIFFERS[n]} if n != "base" else {})})
            for n in names]
    finals = dict(zip(names, train_pack(cfgs)))  # the pack extracts the store all heads read
    for name, cfg in zip(names, cfgs):
        cfg.run.dir = str(tmp_path / "alone" / name)
        alone = train_pack([cfg])[0]
        try:
            _assert_same_run(tmp_path / "pack" / name, tmp_path / "alone" / name, finals[name], alone)
        except AssertionError as exc:
            raise AssertionError(f"head {name!r} of the pack differs from its run alone: {exc}") from None
    lrs = {n: [m["lr"] for m in read_metrics(tmp_path / "pack" / n)] for n in names}
    for key in ("train.lr_schedule", "train.warmup_steps", "train.lr_decay", "train.lr"):
        assert lrs[key] != lrs["base"], key  # the key really changed the schedule
    assert finals["train.early_stop_patience"]["stopped_early"] and not finals["base"]["stopped_early"]
