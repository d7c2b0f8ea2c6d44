"""Frozen encoders and the full model on real (tiny, random) checkpoints loaded by path."""
import numpy as np
import pytest
import torch

from ser_hpc.config import ModelConfig
from ser_hpc.models.backbones import FrozenBackbones
from ser_hpc.models.encoders import BackboneError, SpeechEncoder, TextEncoder
from ser_hpc.models.head import build_head


def test_tokenizers_are_real(demo_assets):
    for name in ("roberta-tiny", "bert-tiny"):
        enc = TextEncoder(str(demo_assets["backbones"][name]))
        assert len(enc.tokenizer) > 500  # not the 5-token vocabulary of a silently ignored file
        ids = enc.tokenizer("¿Por qué nadie lo dijo? ¡Qué vergüenza!")["input_ids"]
        assert len(ids) > 6


def test_backbones_are_frozen_and_stay_in_eval_mode(demo_assets):
    bb = FrozenBackbones(str(demo_assets["backbones"]["wav2vec2-tiny"]), str(demo_assets["backbones"]["roberta-tiny"]))
    bb.train()
    assert not bb.speech.backbone.training and not bb.text.backbone.training
    assert not any(p.requires_grad for p in bb.parameters())
    assert bb.speech.sample_rate == 16000 and bb.speech.accepts_padding_mask


@pytest.mark.parametrize("speech,text", [("wav2vec2-tiny", "roberta-tiny"), ("wavlm-tiny", "bert-tiny")])
def test_padding_does_not_change_predictions(demo_assets, speech, text):
    """A clip scored alone and inside a padded batch gets the same probabilities."""
    torch.manual_seed(0)
    bbs = demo_assets["backbones"]
    backbones = FrozenBackbones(str(bbs[speech]), str(bbs[text]))
    head = build_head(ModelConfig(fusion_attention_heads=4, head_width=32), backbones, 6).eval()
    rng = np.random.default_rng(0)
    lengths = [16000, 40000, 23456]
    waves = torch.zeros(3, max(lengths))
    for i, n in enumerate(lengths):
        waves[i, :n] = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    texts = ["hola", "¡Qué rabia me da todo esto, de verdad!", "Bueno, mañana seguimos."]
    cpu = torch.device("cpu")
    with torch.no_grad():
        batched = torch.softmax(head(backbones(waves, torch.tensor(lengths), texts, cpu)), -1)
        for i, n in enumerate(lengths):
            alone = torch.softmax(head(backbones(waves[i:i + 1, :n], torch.tensor([n]), texts[i:i + 1], cpu)), -1)
            assert torch.allclose(alone[0], batched[i], atol=1e-5), (i, alone, batched[i])


def test_group_norm_speech_model_is_run_clip_by_clip(tmp_path):
    """wav2vec2-base-style models (group norm) cannot take a padding mask: still padding-invariant."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
                         num_conv_pos_embeddings=16, mask_time_prob=0.0)
    torch.manual_seed(0)
    Wav2Vec2Model(cfg).save_pretrained(tmp_path / "w2v-group")
    enc = SpeechEncoder(str(tmp_path / "w2v-group"))
    assert not enc.accepts_padding_mask
    waves = torch.randn(2, 20000)
    waves[0, 12000:] = 0
    states, mask = enc(waves, torch.tensor([12000, 20000]))
    alone, _ = enc(waves[:1, :12000], torch.tensor([12000]))
    n = int(mask[0].sum())
    assert n == alone.shape[2] and not mask[0, n:].any()
    assert torch.allclose(states[:, 0, :n], alone[:, 0], atol=1e-5)


def test_unequal_widths_real_pair(demo_assets):
    bbs = demo_assets["backbones"]
    backbones = FrozenBackbones(str(bbs["wavlm-tiny"]), str(bbs["roberta-tiny"]))
    assert backbones.speech.width != backbones.text.width  # 96 vs 64
    head = build_head(ModelConfig(), backbones, 6)
    assert head.text.proj.in_features == backbones.text.width
    assert head.text.proj.out_features == backbones.speech.width


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(BackboneError, match=r"speech model path does not exist: .*nope"):
        SpeechEncoder(str(tmp_path / "nope"))
    with pytest.raises(BackboneError, match=r"text model path does not exist"):
        TextEncoder(str(tmp_path / "nope"))
