#!/usr/bin/env python
"""Benchmark 3 (issue 5), data pipeline: training crops per second per DataLoader worker,
decoding the original mp3 files every time vs reading prepared audio.

    python benchmarks/data_pipeline.py [--corpus DIR] [--clips 160] [--seconds 5] [--json OUT.json]

Both cases run ``TrainCrops`` (5.5 s random crop, augmentation p = 0.3: speed 0.9/1.1,
synthetic reverberation, generated noise at 15-25 dB SNR) in this one process with one
torch thread, as a DataLoader worker runs (``num_workers=0``). Each case runs whole
epochs until ``--seconds`` have passed, so both see the same mix of augmentations.
The corpus is ``results/demo_data/corpus`` (``make demo``) when present, otherwise a
small demo corpus is generated into a temp folder (mp3, 44.1 kHz, 3-9 s clips).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ser_hpc.data.augment import Augmenter  # noqa: E402
from ser_hpc.data.corpus import read_corpus  # noqa: E402
from ser_hpc.data.dataset import TrainCrops, decode_source  # noqa: E402
from ser_hpc.data.prepare import prepare_audio  # noqa: E402
from ser_hpc.data.prepared import PreparedAudio  # noqa: E402

SAMPLE_RATE = 16000
CROP_SECONDS = 5.5
AUGMENT_PROB = 0.3
GOAL_RATIO, GOAL_RATE = 5.0, 200.0
DEFAULT_CORPUS = ROOT / "results" / "demo_data" / "corpus"


def crops_per_second(dataset: TrainCrops, min_seconds: float) -> tuple[float, int]:
    """Whole epochs of ``dataset[i]`` until ``min_seconds`` have passed: (crops/s, crops)."""
    dataset.set_epoch(1000)  # warm-up outside the timed epochs (kernels, caches, memory maps)
    for i in range(min(8, len(dataset))):
        dataset[i]
    n, epoch, start = 0, 0, time.perf_counter()
    while True:
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            dataset[i]
        n += len(dataset)
        epoch += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help=f"a demo-format corpus folder (default: {DEFAULT_CORPUS} "
                                                "if present, else a generated one)")
    ap.add_argument("--generate", action="store_true", help="generate a fresh demo corpus even if the default exists")
    ap.add_argument("--clips", type=int, default=160, help="train clips used (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per case")
    ap.add_argument("--workers", type=int, default=None, help="processes for the one-off preparation")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is not met")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # what a DataLoader worker runs with

    with tempfile.TemporaryDirectory(prefix="ser_hpc_bench_data_") as tmp:
        corpus = args.corpus or DEFAULT_CORPUS
        if args.generate or not (corpus / "train.csv").is_file():
            if args.corpus:
                ap.error(f"no train.csv in {args.corpus}")
            from ser_hpc.demo.corpus import generate_corpus
            corpus = Path(tmp) / "corpus"
            print(f"generating a demo corpus of {args.clips} clips in {corpus} ...", file=sys.stderr)
            generate_corpus(corpus, n_train=args.clips, n_test=12, seed=1234, workers=args.workers)
        examples = read_corpus(corpus / "train.csv", corpus / "audio")[: args.clips]

        summary = prepare_audio(examples, Path(tmp) / "prepared", SAMPLE_RATE, workers=args.workers)
        loader = PreparedAudio(Path(tmp) / "prepared", SAMPLE_RATE)
        clip_seconds = [loader.num_samples(e) / SAMPLE_RATE for e in examples]

        def crops(audio_loader) -> TrainCrops:
            augmenter = Augmenter(SAMPLE_RATE, AUGMENT_PROB, [0.9, 1.1], [15.0, 25.0])
            return TrainCrops(examples, SAMPLE_RATE, CROP_SECONDS, augmenter, seed=1234, audio_loader=audio_loader)

        decode_rate, decode_n = crops_per_second(crops(decode_source), args.seconds)
        prepared_rate, prepared_n = crops_per_second(crops(loader), args.seconds)
        plain = TrainCrops(examples, SAMPLE_RATE, CROP_SECONDS, None, seed=1234, audio_loader=loader)
        plain_rate, plain_n = crops_per_second(plain, args.seconds / 2)

    ratio = prepared_rate / decode_rate
    rows = [
        ("mp3: decode + resample every crop, aug p=0.3", decode_rate, decode_n),
        ("prepared int16 memmap, aug p=0.3", prepared_rate, prepared_n),
        ("prepared int16 memmap, no augmentation", plain_rate, plain_n),
    ]
    print(f"\nData pipeline: {len(examples)} clips from {corpus} (mean {np.mean(clip_seconds):.1f} s, "
          f"{min(clip_seconds):.1f}-{max(clip_seconds):.1f} s), crop {CROP_SECONDS} s at {SAMPLE_RATE} Hz, "
          f"1 torch thread (one DataLoader worker)")
    print(f"one-off preparation: {summary.clips} clips in {summary.seconds:.1f} s\n")
    print(f"| {'source':<46} | {'crops/s per worker':>18} | {'ms/crop':>7} | {'vs mp3':>6} | {'crops':>6} |")
    print(f"|{'-' * 48}|{'-' * 19}:|{'-' * 8}:|{'-' * 7}:|{'-' * 7}:|")
    for name, rate, n in rows:
        print(f"| {name:<46} | {rate:>18.1f} | {1000 / rate:>7.2f} | {rate / decode_rate:>5.1f}x | {n:>6} |")
    met_ratio, met_rate = ratio >= GOAL_RATIO, prepared_rate >= GOAL_RATE
    print(f"\nprepared / mp3 = {ratio:.1f}x (goal >= {GOAL_RATIO:g}x: {'met' if met_ratio else 'NOT met'}); "
          f"prepared = {prepared_rate:.0f} crops/s per worker (goal >= {GOAL_RATE:g}: "
          f"{'met' if met_rate else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({
            "clips": len(examples), "mean_clip_seconds": float(np.mean(clip_seconds)),
            "crop_seconds": CROP_SECONDS, "augment_prob": AUGMENT_PROB,
            "decode_crops_per_s": decode_rate, "prepared_crops_per_s": prepared_rate,
            "prepared_no_aug_crops_per_s": plain_rate, "ratio": ratio,
            "prepare_seconds": summary.seconds}, indent=2) + "\n")
    return 0 if (met_ratio and met_rate) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
