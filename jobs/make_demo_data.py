#!/usr/bin/env python
"""Write the synthetic demo corpus and the tiny backbones (idempotent: reruns are no-ops).

    python jobs/make_demo_data.py [--out results/demo_data] [--n-train 720 --n-test 180 --format mp3]
    python jobs/make_demo_data.py --variant acted     # also the second corpus of the benchmark example

Layout: <out>/corpus/{train.csv,test.csv,test_labels.csv,audio/},
<out>/backbones/{wav2vec2-tiny,wavlm-tiny,roberta-tiny,bert-tiny,wav2vec2-small,whisper-tiny}/ and, with
--variant acted, <out>/corpus_acted/{manifest.csv,audio/}: 4 classes under raw codes (A anger,
H joy, N neutral, S sadness), 8 other speakers, balanced, FLAC at 22.05 kHz.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

try:
    import ser_hpc  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_hpc.demo.backbones import build_demo_backbones
from ser_hpc.demo.corpus import generate_corpus, generate_variant_corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo_data", help="output folder (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=720)
    ap.add_argument("--n-test", type=int, default=180)
    ap.add_argument("--format", default="mp3", choices=["mp3", "wav", "flac", "ogg"])
    ap.add_argument("--sample-rate", type=int, default=44100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=None, help="processes rendering audio (default: usable CPUs, max 8)")
    ap.add_argument("--variant", choices=["acted"], help="also write this second corpus (benchmark grids)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    corpus = generate_corpus(out / "corpus", n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                             audio_format=args.format, sample_rate=args.sample_rate, workers=args.workers)
    texts = []  # the tokenizers learn the corpus vocabulary, as a real one would cover it
    for key in ("train_path", "test_path"):
        with open(corpus[key], newline="", encoding="utf-8") as fh:
            texts += [row["transcription"] for row in csv.DictReader(fh)]
    backbones = build_demo_backbones(out / "backbones", seed=args.seed, corpus_texts=texts)
    if args.variant:
        variant = generate_variant_corpus(out / f"corpus_{args.variant}", args.variant, seed=args.seed,
                                          workers=args.workers)
        print(f"corpus       {variant['root']} (variant {args.variant}: {variant['manifest_path']}, "
              f"label map {variant['label_map']})")

    print(f"corpus       {corpus['root']}")
    for key in ("train_path", "test_path", "test_labels_path", "audio_dir"):
        print(f"  {key:<16} {corpus[key]}")
    print(f"  train counts     {corpus['counts']['train']}")
    print(f"  test counts      {corpus['counts']['test']}")
    print(f"backbones    {out / 'backbones'}")
    for name, path in backbones.items():
        print(f"  {name:<16} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
