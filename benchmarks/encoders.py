#!/usr/bin/env python
"""Speech encoders at full size: extraction throughput and feature-store bytes per audio hour.

    python benchmarks/encoders.py                  # XLS-R 300M and Whisper large-v3 shapes (minutes on a CPU)
    python benchmarks/encoders.py --tiny           # the same code at toy shapes (seconds)
    python benchmarks/encoders.py --json out.json  # also write the table as JSON

Random weights with the shapes of XLS-R 300M (wav2vec2: 24 layers x 1024, 16 heads, FFN 4096,
layer-norm conv feature encoder) and Whisper large-v3's encoder (32 layers x 1280, 20 heads,
FFN 5120, 128 mel bins), written with ``save_pretrained`` and loaded back through
``ser_hpc.models.speech_families.speech_encoder``, the path a features job takes (Whisper:
log-mel, 30 s windows, the frames that cover audio kept). Each encoder encodes one clip of
3, 10 and 40 s (the median of ``--repeats`` forwards after one warm-up), and the table gives
audio seconds per wall second. Bytes per audio hour are what a feature store holds per hidden
state kept (frames per hour x width x 2 B, float16) and for all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SR = 16000
CLIPS = (3.0, 10.0, 40.0)


def _xlsr(tiny: bool):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
    width, layers, heads, ffn, conv = (64, 4, 4, 128, 32) if tiny else (1024, 24, 16, 4096, 512)
    cfg = Wav2Vec2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, conv_dim=(conv,) * 7, feat_extract_norm="layer",
                         do_stable_layer_norm=True, conv_bias=True, mask_time_prob=0.0, vocab_size=32)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, do_normalize=True, return_attention_mask=True)
    return Wav2Vec2Model(cfg), fe


def _whisper(tiny: bool):
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    width, layers, heads, ffn, mels = (64, 4, 4, 128, 80) if tiny else (1280, 32, 20, 5120, 128)
    cfg = WhisperConfig(d_model=width, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn,
                        num_mel_bins=mels, max_source_positions=1500, decoder_layers=1, vocab_size=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperEncoder(cfg), WhisperFeatureExtractor(feature_size=mels, sampling_rate=SR)


def measure(name: str, build, tiny: bool, repeats: int, folder: Path) -> list[dict]:
    from ser_hpc.models.speech_families import frames_for, speech_encoder, speech_spec
    torch.manual_seed(0)
    model, fe = build(tiny)
    path = folder / name
    model.save_pretrained(path)
    fe.save_pretrained(path)
    del model
    encoder = speech_encoder(str(path))
    spec = speech_spec(str(path))
    params = sum(p.numel() for p in encoder.backbone.parameters())
    frames_per_hour = int(frames_for(spec.frame_rule, 3600 * SR))
    layer_bytes = frames_per_hour * spec.width * 2
    rows = []
    for seconds in CLIPS:
        n = int(seconds * SR)
        wave = 0.1 * torch.randn(1, n)
        with torch.no_grad():
            encoder(wave, torch.tensor([n]))  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                states, mask = encoder(wave, torch.tensor([n]))
                times.append(time.perf_counter() - start)
        wall = statistics.median(times)
        rows.append({"encoder": name, "family": spec.family, "params_M": round(params / 1e6, 1), "clip_s": seconds,
                     "frames": int(mask.sum()), "states": spec.num_states, "width": spec.width,
                     "wall_s": round(wall, 3), "audio_s_per_s": round(seconds / wall, 2),
                     "GB_per_audio_hour_per_state": round(layer_bytes / 1e9, 3),
                     "GB_per_audio_hour_all_states": round(layer_bytes * spec.num_states / 1e9, 2)})
        print(f"{name}: {seconds:g} s clip -> {rows[-1]['frames']} frames in {wall:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes: the same code in seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        print("note: this script times the CPU path; on a GPU node move the encoder with .to('cuda')", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure("xlsr-300m-shaped" if not args.tiny else "xlsr-tiny", _xlsr, args.tiny, args.repeats, Path(tmp))
        rows += measure("whisper-large-v3-encoder-shaped" if not args.tiny else "whisper-tiny", _whisper, args.tiny,
                        args.repeats, Path(tmp))
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| encoder | params | clip | frames kept | wall | audio s / s | GB per audio hour per state | all states |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['params_M']} M | {r['clip_s']:g} s | {r['frames']} | {r['wall_s']:.2f} s | "
              f"{r['audio_s_per_s']:.2f} | {r['GB_per_audio_hour_per_state']:.3f} | "
              f"{r['GB_per_audio_hour_all_states']:.2f} ({r['states']} x {r['width']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
