import math

import pytest
import torch
from torch import nn

from ser_hpc.config import ModelConfig
from ser_hpc.models.encoders import BackboneOutput
from ser_hpc.models.head import EmotionHead, LayerMix
from ser_hpc.models.pooling import AttentionPooling


def test_attention_pooling_equals_hand_computation():
    torch.manual_seed(0)
    pool = AttentionPooling(4)
    h = torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    u = pool.u.detach()
    # By hand: scores u.h_t / sqrt(E) over the two real steps, softmax, weighted sum.
    s = [float(u @ h[0, t]) / math.sqrt(4) for t in range(2)]
    e = [math.exp(v - max(s)) for v in s]
    w = [v / sum(e) for v in e]
    expected = w[0] * h[0, 0] + w[1] * h[0, 1]
    assert torch.allclose(pool(h, mask)[0], expected, atol=1e-6)
    weights = pool.weights(h, mask)[0]
    assert weights[2] == 0 and torch.allclose(weights[:2], torch.tensor(w), atol=1e-6)


def test_pooling_ignores_padding_values():
    pool = AttentionPooling(8)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    out = pool(h, mask)
    h2 = h.clone()
    h2[0, 3:] = 1e6  # garbage in the padding
    assert torch.allclose(pool(h2, mask), out)
    assert torch.allclose(pool(h[:1, :3], mask[:1, :3]), out[:1], atol=1e-6)


def test_layer_mix_is_softmax_normalised():
    mix = LayerMix(3)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    states = torch.randn(3, 2, 4, 5)
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert torch.allclose(mix(states), (w[:, None, None, None] * states).sum(0), atol=1e-6)


def _feats(b=2, f=7, s=4, dw=24, tw=16, l_s=3, l_t=2):
    return BackboneOutput(torch.randn(l_s, b, f, dw), torch.ones(b, f, dtype=torch.bool),
                          torch.randn(l_t, b, s, tw), torch.ones(b, s, dtype=torch.bool))


@pytest.mark.parametrize("heads", [0, 4])
def test_unequal_widths_are_projected_to_a_common_width(heads):
    cfg = ModelConfig(fusion_attention_heads=heads, head_width=32, hidden_layers=2)
    head = EmotionHead(cfg, speech_shape=(3, 24), text_shape=(2, 16), num_classes=6).eval()
    assert isinstance(head.text.proj, torch.nn.Linear) and head.text.proj.out_features == 24
    assert isinstance(head.speech.proj, torch.nn.Identity)
    feats = _feats()
    h, mask = head.fuse(feats)
    assert h.shape == (2, 7 + 4, 24) and mask.shape == (2, 11)  # joined along time
    assert head(feats).shape == (2, 6)
    fixed = EmotionHead(ModelConfig(fusion_dim=20), (3, 24), (2, 16), 6)
    assert fixed.speech.proj.out_features == 20 and fixed.text.proj.out_features == 20


def test_mlp_shape_follows_the_paper():
    head = EmotionHead(ModelConfig(hidden_layers=3, head_width=512, dropout=0.2), (3, 24), None, 6)
    linears = [m for m in head.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 512)] + [(512, 512)] * 3 + [(512, 6)]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in head.classifier) == 4
    assert head.text is None


def test_single_modalities():
    feats = _feats()
    audio = EmotionHead(ModelConfig(modalities="audio"), (3, 24), None, 6).eval()
    text = EmotionHead(ModelConfig(modalities="text"), None, (2, 16), 6).eval()
    assert audio(feats).shape == (2, 6) and text(feats).shape == (2, 6)
    # The audio-only head does not look at text at all.
    feats2 = BackboneOutput(feats.speech, feats.speech_mask, torch.randn_like(feats.text), feats.text_mask)
    assert torch.equal(audio(feats), audio(feats2))


@pytest.mark.parametrize("pooling", ["attention", "mean", "attentive_stats"])
@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("attention_heads", [0, 4])
def test_every_pooling_and_fusion_ignores_padding(pooling, fusion, attention_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(pooling=pooling, fusion=fusion, fusion_attention_heads=attention_heads, head_width=32)
    head = EmotionHead(cfg, speech_shape=(3, 24), text_shape=(2, 16), num_classes=6).eval()
    feats = _feats(b=2, f=7, s=5)
    feats.speech_mask[0, 4:] = False  # clip 0: 4 frames and 3 tokens, the rest is padding
    feats.text_mask[0, 3:] = False
    out = head(feats)
    garbage = BackboneOutput(feats.speech.clone(), feats.speech_mask, feats.text.clone(), feats.text_mask)
    garbage.speech[:, 0, 4:] = 1e4
    garbage.text[:, 0, 3:] = -1e4
    assert torch.allclose(head(garbage), out, atol=1e-5)
    alone = BackboneOutput(feats.speech[:, :1, :4], feats.speech_mask[:1, :4], feats.text[:, :1, :3],
                           feats.text_mask[:1, :3])
    assert torch.allclose(head(alone), out[:1], atol=1e-5)
    width = 24 * (2 if pooling == "attentive_stats" else 1) * (2 if fusion == "late" else 1)
    assert head.classifier[0].in_features == width


def test_weighted_layers_skip_the_cnn_output_like_the_authors():
    head = EmotionHead(ModelConfig(), speech_shape=(5, 24), text_shape=None, num_classes=6)
    assert head.speech.used == [1, 2, 3, 4] and head.speech.mix.logits.numel() == 4
    from ser_hpc.config import EncoderConfig
    cfg = ModelConfig(speech=EncoderConfig(layers="weighted_all"))
    assert EmotionHead(cfg, (5, 24), None, 6).speech.used == [0, 1, 2, 3, 4]
    # States that hold only some layers (a feature store) are indexed by absolute layer.
    feats = _feats(l_s=5)
    held = BackboneOutput(feats.speech[1:], feats.speech_mask, None, None, speech_layers=(1, 2, 3, 4))
    head.eval()
    assert torch.allclose(head(held), head(feats), atol=1e-6)


def test_dropout_masks_do_not_depend_on_the_rank_that_holds_a_clip():
    """Two ranks holding halves of a global batch draw the masks one process draws (and one
    process draws exactly what nn.Dropout draws); attention dropout is per clip, whatever
    padding each rank's slice has."""
    from ser_hpc.models.dropout import RowDropout, attention, global_batch_rows
    x = torch.randn(16, 64)
    for p in (0.1, 0.3):
        torch.manual_seed(3)
        plain = nn.Dropout(p).train()(x)
        torch.manual_seed(3)
        with global_batch_rows(0, 16):
            assert torch.equal(RowDropout(p).train()(x), plain)
        halves = []
        for rank in (0, 1):
            torch.manual_seed(3)  # every rank's head stream starts from the same seed
            with global_batch_rows(8 * rank, 16):
                halves.append(RowDropout(p).train()(x[8 * rank:8 * rank + 8]))
        assert torch.equal(torch.cat(halves), plain)
    mha = nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True).train()
    h, mask = torch.randn(4, 10, 32), torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = mask[3, 3:] = False
    padded = torch.cat([h, torch.randn(4, 4, 32)], 1), torch.cat([mask, torch.zeros(4, 4, dtype=torch.bool)], 1)
    torch.manual_seed(5)
    with global_batch_rows(0, 4):
        whole = attention(mha, *padded)[:, :10]
    for rank in (0, 1):
        rows = slice(2 * rank, 2 * rank + 2)
        torch.manual_seed(5)
        with global_batch_rows(2 * rank, 4):
            mine = attention(mha, h[rows], mask[rows])
        torch.testing.assert_close(mine[mask[rows]], whole[rows][mask[rows]], atol=1e-6, rtol=0)
    mha.eval()  # no dropout: the module's own attention, as in evaluation and inference
    torch.testing.assert_close(attention(mha, h, mask)[mask],
                               mha(h, h, h, key_padding_mask=~mask, need_weights=False)[0][mask])
