#!/usr/bin/env python
"""Label recordings with an aggregated ensemble (results/<grid>/ensemble, or a copy of it).

    python jobs/predict.py ENSEMBLE_DIR --csv FILE [--audio-dir DIR] --out preds.csv
    python jobs/predict.py ENSEMBLE_DIR --audio clip.wav --text "la transcripción"
    python jobs/predict.py ENSEMBLE_DIR --fold 2 --csv FILE --out preds.csv   (a grid with folds)
    python jobs/predict.py --onnx DEST --csv FILE [--audio-dir DIR] --out preds.csv   (an ONNX export)

A grid with a data.fold axis has one ensemble per fold (ENSEMBLE_DIR/fold_K/): by default
all of them label the clips and their scores are averaged; --fold K uses fold K's alone.

The CSV is in EmoSPeech format: `id` (the audio file name in --audio-dir, default the
CSV's folder), `transcription` and, optionally, `label`. The output has `id,label` and one
probability column per class (the ensemble's scores: mean probabilities, or vote shares
for a vote ensemble). With gold labels, macro-F1 and per-class F1 are printed.

Clips are batched by length and run on the GPU when there is one (a progress bar on
stderr from 50 rows up). Members sharing a backbone pair share one backbone forward per
batch. Audio is decoded from the source files, not from the training jobs' prepared-audio
cache; for runs trained on that cache (int16, about 90 dB SNR) scores can differ from
their dev_probs.csv by that quantisation noise. A clip longer than --window seconds
(default 15, the longest training clip) is scored over windows of that length, --hop
seconds apart (default half the window), the last one ending at the clip's end; each
member's probabilities are averaged over the windows. Backbones load offline
(HF_HUB_OFFLINE=1 unless set): from the HF cache or the paths in ensemble.json, which
--backbone OLD=NEW can replace on a machine where they live elsewhere.

--onnx DEST labels with the graphs of `jobs/export.py ENSEMBLE_DIR --out DEST --format onnx`
on onnxruntime instead of the ensemble folder: the same decoding, windows and combination,
the same output (within 1e-4 of the ensemble folder's probabilities); it needs no backbone.

Exit status: 0 every row labelled; 1 some rows not labelled (missing or unreadable audio,
each reported with its id; the others are still written); 2 bad input (arguments, the
ensemble folder, the CSV, a backbone, or transcriptions that the members need).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.offline import offline_by_default  # noqa: E402

offline_by_default()  # never hang on an offline compute node

from ser_hpc.atomic_io import write_text  # noqa: E402
from ser_hpc.data.corpus import CorpusError  # noqa: E402
from ser_hpc.inference.ensemble import (EnsembleError, combine_fold_results, ensemble_labels,  # noqa: E402
                                        fold_ensemble_dirs, load_ensemble)
from ser_hpc.inference.inputs import InputRow, read_input_csv  # noqa: E402
from ser_hpc.inference.onnx_predictor import load_onnx_ensemble, onnx_labels, predict_onnx  # noqa: E402
from ser_hpc.inference.output import errors_text, metrics_text, predictions_csv, single_clip_text  # noqa: E402
from ser_hpc.inference.predictor import MissingTextError, predict  # noqa: E402
from ser_hpc.inference.windows import DEFAULT_HOP_FRACTION, DEFAULT_WINDOW_S  # noqa: E402
from ser_hpc.models.encoders import BackboneError  # noqa: E402


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensemble_dir", type=Path, nargs="?", help="the ensemble folder (results/<grid>/ensemble)")
    parser.add_argument("--onnx", type=Path, metavar="DEST",
                        help="label with an ONNX export (jobs/export.py --format onnx) instead of ENSEMBLE_DIR")
    parser.add_argument("--csv", type=Path, help="EmoSPeech-format CSV: id[,label],transcription")
    parser.add_argument("--audio-dir", type=Path, help="folder of the CSV's audio files (default: the CSV's folder)")
    parser.add_argument("--out", type=Path, help="output CSV (required with --csv)")
    parser.add_argument("--audio", type=Path, help="one clip to label")
    parser.add_argument("--text", help="the clip's transcription (with --audio)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips (or windows) per forward (default 8)")
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW_S,
                        help=f"window length in seconds for long clips (default {DEFAULT_WINDOW_S:g})")
    parser.add_argument("--hop", type=float, default=None,
                        help=f"hop between windows in seconds (default {DEFAULT_HOP_FRACTION:g} x window)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--workers", type=int, default=0, help="audio decoding worker processes (default 0)")
    parser.add_argument("--backbone", action="append", default=[], metavar="OLD=NEW",
                        help="load backbone NEW where ensemble.json names OLD (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fold", type=int, default=None, metavar="K",
                        help="grids with folds: use fold K's ensemble only (default: the mean of all folds')")
    args = parser.parse_args(argv)
    if bool(args.ensemble_dir) == bool(args.onnx):
        parser.error("give either ENSEMBLE_DIR or --onnx DEST")
    if args.onnx and args.backbone:
        parser.error("--backbone applies to ENSEMBLE_DIR; an ONNX export carries its backbones")
    if bool(args.csv) == bool(args.audio):
        parser.error("give either --csv (with --out) or --audio")
    if args.csv and not args.out:
        parser.error("--csv needs --out")
    if args.text is not None and not args.audio:
        parser.error("--text goes with --audio")
    if args.batch_size < 1 or args.window <= 0 or (args.hop is not None and args.hop <= 0) or args.workers < 0:
        parser.error("--batch-size, --window and --hop must be positive, --workers >= 0")
    mapping = {}
    for item in args.backbone:
        if "=" not in item:
            parser.error(f"--backbone {item!r} is not OLD=NEW")
        old, new = item.split("=", 1)
        mapping[old] = new

    try:
        labels = onnx_labels(args.onnx) if args.onnx else ensemble_labels(args.ensemble_dir)
        if args.csv:
            rows = read_input_csv(args.csv, args.audio_dir or args.csv.parent, labels)
        else:
            rows = [InputRow(args.audio.name, args.audio, args.text, None, 0)]
        device = _device(args.device)
        progress = False if args.no_progress else None
        if args.onnx:
            ensemble = load_onnx_ensemble(args.onnx, args.fold, device.type)
            result = predict_onnx(ensemble, rows, args.batch_size, args.window, args.hop, args.workers, progress)
        else:
            results = []
            for folder in fold_ensemble_dirs(args.ensemble_dir, args.fold):  # [ensemble_dir] without folds
                ensemble = load_ensemble(folder, device, mapping)  # one fold at a time: one set of backbones in memory
                results.append(predict(ensemble, rows, args.batch_size, args.window, args.hop, args.workers,
                                       progress=progress))
                del ensemble
            result = combine_fold_results(results)
    except (CorpusError, EnsembleError, BackboneError, MissingTextError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2

    for note in result.notes:
        print(f"predict: note: {note}", file=sys.stderr)
    if args.csv:
        write_text(args.out, predictions_csv(result))
        print(f"labelled {len(result.labelled)} of {len(rows)} row(s) -> {args.out} "
              f"({result.audio_s:.0f} s of audio in {result.elapsed_s:.1f} s on {device}"
              + (", onnxruntime" if args.onnx else "") + ")")
    elif result.labelled:
        print(single_clip_text(result))
    metrics = metrics_text(result)
    if metrics:
        print(metrics)
    if result.errors:
        print(errors_text(result), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
