"""Tiny random-initialised speech and text backbones saved like real checkpoints.

No model hub is reachable here, so the demo and the tests build four small models from
transformers configs and ``save_pretrained`` them; the pipeline then loads them through
the very ``from_pretrained(path)`` code that loads XLS-R or RoBERTa for real.

Speech models use the XLS-R layout (``feat_extract_norm="layer"``, stable layer norm):
it accepts an attention mask, so padded batches give the same valid frames as single
clips; the standard conv stack keeps 20 ms frames at 16 kHz.  The WavLM is 96 wide and
the text models 64, so the pipeline has to project unequal widths, as with real pairs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertModel, PreTrainedTokenizerFast, RobertaConfig, RobertaModel,
                          Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model, WavLMConfig, WavLMModel,
                          WhisperConfig, WhisperFeatureExtractor, WhisperModel)

from ser_hpc.atomic_io import write_json
from ser_hpc.demo.sentences import demo_sentences

BACKBONES_VERSION = 2
MANIFEST = "manifest.json"
VOCAB_SIZE = 1500
MAX_POSITIONS = 512  # real BERT/RoBERTa length; the demo needs ~128 tokens

# Extra Spanish so the tokenizers see words outside the emotion templates.
EXTRA_SPANISH = """\
Buenos días a todos y gracias por venir. ¿Cómo están ustedes? ¡Qué día tan bonito hace hoy!
El año pasado la región recibió más de dos millones de visitantes, según el informe anual.
La niña corrió por el jardín, saltó la valla y se escondió detrás del árbol más viejo.
Mañana habrá lluvias débiles en el norte y temperaturas suaves en el resto del país...
Señorías, el pingüino del zoológico cumple años; la cigüeña volvió a la torre de la iglesia.
Necesitamos más médicos, más maestras y más inversión en investigación y desarrollo.
¿Por qué nadie contestó? ¡Porque estábamos todos en la reunión, evidentemente!
Mi abuela cocinaba paella los domingos; el olor a azafrán llenaba toda la casa.
"""

SPEECH = {
    # name: (config class, model class, width, layers, heads, ffn width, conv channels)
    "wav2vec2-tiny": (Wav2Vec2Config, Wav2Vec2Model, 64, 4, 4, 128, 32),
    "wavlm-tiny": (WavLMConfig, WavLMModel, 96, 3, 4, 192, 32),
    # The demo grid's speech encoder. A random network is a random projection: 32 conv channels
    # lose most of the prosody (a linear probe on pooled features: 0.50 test macro-F1), 128 keep
    # more of it (0.58). Trained from cached features, it costs one extra forward per clip.
    "wav2vec2-small": (Wav2Vec2Config, Wav2Vec2Model, 128, 4, 4, 256, 128),
}
TEXT = ("roberta-tiny", "bert-tiny")
WHISPER = "whisper-tiny"  # a whole Whisper checkpoint (encoder + a small decoder), 80 mels, 4 encoder layers


def _speech_model(name: str):
    cfg_cls, model_cls, width, layers, heads, ffn, channels = SPEECH[name]
    cfg = cfg_cls(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
        conv_dim=(channels,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
        mask_time_prob=0.0, mask_feature_prob=0.0, vocab_size=32,
    )
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                  do_normalize=True, return_attention_mask=True)
    return model_cls(cfg), fe


def _whisper_model():
    """Whisper's layout at a toy size: the real 30 s window (3000 mel frames, 1500 encoder
    positions), 80 mels, a 4-layer encoder 64 wide; a 1-layer decoder so the checkpoint holds
    both halves, as real ones do."""
    cfg = WhisperConfig(d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=32, vocab_size=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[],
                        begin_suppress_tokens=[])
    return WhisperModel(cfg), WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)


def _bpe_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with RoBERTa's special tokens and ids (<s>=0 <pad>=1 </s>=2 <unk>=3)."""
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=MAX_POSITIONS)


def _wordpiece_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Uncased WordPiece like BERT's; accents kept so Spanish survives a decode."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", do_lower_case=True, strip_accents=False, model_max_length=MAX_POSITIONS)


def _text_model(name: str, texts: list[str]):
    if name == "roberta-tiny":
        tok = _bpe_tokenizer(texts)
        cfg = RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=MAX_POSITIONS + 2,  # +2: RoBERTa offsets positions by pad id
                            pad_token_id=1, bos_token_id=0, eos_token_id=2)
        return RobertaModel(cfg), tok, "RobertaTokenizerFast"
    tok = _wordpiece_tokenizer(texts)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=MAX_POSITIONS, pad_token_id=tok.pad_token_id)
    return BertModel(cfg), tok, "BertTokenizerFast"


def _save_atomically(target: Path, save) -> None:
    """Let ``save(dir)`` fill a temp dir next to ``target``, then swap it in with one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_backbones(out_dir, seed: int = 1234, corpus_texts: list[str] | None = None) -> dict[str, Path]:
    """Write wav2vec2-tiny, wavlm-tiny, roberta-tiny, bert-tiny, wav2vec2-small and whisper-tiny
    under ``out_dir`` (or reuse them).

    Tokenizers are trained on ``corpus_texts`` (e.g. the demo transcriptions) plus template
    sentences and some extra Spanish.  Returns name -> model directory.
    """
    out_dir = Path(out_dir)
    texts = list(corpus_texts or []) + demo_sentences(3000, seed) + EXTRA_SPANISH.splitlines()
    params = {"seed": seed, "version": BACKBONES_VERSION,
              "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    # Slot order fixes each model's seed: models added later go last, so the others keep their weights.
    names = ["wav2vec2-tiny", "wavlm-tiny", *TEXT, "wav2vec2-small", WHISPER]
    paths = {name: out_dir / name for name in names}
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("params") == params and all((p / "config.json").is_file() for p in paths.values()):
            return paths
    except (OSError, ValueError):
        pass
    (out_dir / MANIFEST).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # temp dirs of a run that was killed
        shutil.rmtree(stale, ignore_errors=True)

    for i, name in enumerate(names):
        torch.manual_seed(seed + i)  # each model's weights depend only on seed and its slot
        if name in SPEECH or name == WHISPER:
            model, fe = _speech_model(name) if name in SPEECH else _whisper_model()
            _save_atomically(paths[name], lambda d: (model.save_pretrained(d), fe.save_pretrained(d)))
        else:
            model, tok, tok_class = _text_model(name, texts)

            def save(d, model=model, tok=tok, tok_class=tok_class):
                model.save_pretrained(d)
                tok.save_pretrained(d)
                # name the model's own tokenizer class so AutoTokenizer gives a RoBERTa/BERT
                # tokenizer (it still reads the trained tokenizer.json; in transformers 5 the
                # BERT class rebuilds its normalizer from strip_accents/do_lower_case here)
                cfg_path = Path(d) / "tokenizer_config.json"
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                cfg["tokenizer_class"] = tok_class
                write_json(cfg_path, cfg)

            _save_atomically(paths[name], save)

    write_json(out_dir / MANIFEST, {"params": params, "models": {n: n for n in names}})  # last: complete
    return paths


# Benchmarks need the backbone to dominate the cost, as XLS-R and RoBERTa-large do on the
# cluster: random models with the shapes of wav2vec2-base (XLS-R's layer-norm layout) and BERT-base.
BASE_SIZED = ("wav2vec2-base-sized", "bert-base-sized")


def build_base_sized_backbones(out_dir, seed: int = 1234, corpus_texts: list[str] | None = None) -> dict[str, Path]:
    """Write (or reuse) random wav2vec2-base-sized (95 M) and BERT-base-sized (~90 M) models."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in BASE_SIZED}
    params = {"seed": seed, "version": BACKBONES_VERSION, "kind": "base-sized"}
    try:
        if json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")).get("params") == params:
            return paths
    except (OSError, ValueError):
        pass
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    speech = Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True,
                                          mask_time_prob=0.0, mask_feature_prob=0.0))
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                  do_normalize=True, return_attention_mask=True)
    _save_atomically(paths["wav2vec2-base-sized"], lambda d: (speech.save_pretrained(d), fe.save_pretrained(d)))
    tok = _wordpiece_tokenizer(list(corpus_texts or []) + demo_sentences(3000, seed) + EXTRA_SPANISH.splitlines())
    text = BertModel(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    _save_atomically(paths["bert-base-sized"], lambda d: (text.save_pretrained(d), tok.save_pretrained(d)))
    write_json(out_dir / MANIFEST, {"params": params, "models": {n: n for n in BASE_SIZED}})
    return paths
