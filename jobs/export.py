#!/usr/bin/env python
"""Export an aggregated ensemble (results/<grid>/ensemble, or a copy) for use outside ser-hpc.

    python jobs/export.py ENSEMBLE_DIR --out DEST --format hf     # transformers folder (trust_remote_code)
    python jobs/export.py ENSEMBLE_DIR --out DEST --format onnx   # ONNX graphs + onnxruntime predictor
    python jobs/export.py ENSEMBLE_DIR --out DEST --fold 2        # a grid with folds: fold 2 alone

hf: DEST holds config.json (id2label / label2id, the members, the ensemble method, auto_map),
model.safetensors (the heads), backbones/<name>/ (each backbone's weights and tokenizer or
feature extractor), preprocessor_config.json, the model code (configuration_, modeling_,
pipeline_ser_ensemble.py) and README.md (the model card). It loads offline with
AutoModelForAudioClassification.from_pretrained(DEST, trust_remote_code=True), and audio
ensembles work with pipeline("audio-classification", model=DEST, trust_remote_code=True)
(audio+text ensembles take the transcription: clf("clip.wav", text="...")).

onnx: DEST holds group_<g>.onnx (one graph per backbone pair with its members' heads; dynamic
batch, samples and tokens axes), group_<g>.json (its preprocessing), tokenizers/,
onnx_ensemble.json and README.md; label with
    python jobs/predict.py --onnx DEST --csv FILE --audio-dir DIR --out preds.csv

A fold ensemble exports the average of its folds (as predict.py), or --fold K's alone.
Members with fine-tuned backbone layers are exported with their own backbone copy.
Backbones load offline (HF_HUB_OFFLINE=1 unless set), from the HF cache or the paths in
ensemble.json. Before anything is written, the exported model is checked against
ser-hpc's forward on a synthetic clip (and each ONNX graph against PyTorch).

DEST is built in a temp folder beside it and renamed at the end: a failed export leaves
no DEST. An existing DEST is refused unless --overwrite.

Exit status: 0 exported; 2 bad input (not an ensemble folder, a backbone not found
offline, an existing DEST, a member the export cannot reproduce), naming the file or key.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.offline import offline_by_default  # noqa: E402

offline_by_default()  # never hang on an offline compute node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensemble_dir", type=Path, help="the ensemble folder (results/<grid>/ensemble)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to create")
    parser.add_argument("--format", choices=("hf", "onnx"), default="hf", help="hf (default) or onnx")
    parser.add_argument("--fold", type=int, default=None, metavar="K",
                        help="grids with folds: export fold K's ensemble only (default: the average of all folds)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    parser.add_argument("--language", help="model card: the corpus language code (default: es for EmoSPeech)")
    parser.add_argument("--speech-style", help="model card: acted / natural / ... speech, in words "
                                               "(default: known for EmoSPeech and the demo corpus)")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from ser_hpc.export import ExportError
    from ser_hpc.export.build import build_export_model
    from ser_hpc.export.model_card import model_card
    from ser_hpc.export.staging import check_destination, staged_folder
    from ser_hpc.inference.ensemble import EnsembleError
    from ser_hpc.models.encoders import BackboneError

    import warnings
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")  # torch, inside WavLM
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    start = time.monotonic()
    dest = args.out.expanduser().absolute()
    try:
        check_destination(dest, args.overwrite)  # before the (slow) loading
        export = build_export_model(args.ensemble_dir, args.fold)
        with staged_folder(dest, args.overwrite) as tmp:
            if args.format == "hf":
                from ser_hpc.export.hf import write_hf
                write_hf(export, tmp)
                graph_diffs = []
            else:
                from ser_hpc.export.onnx_graph import write_onnx
                graph_diffs = write_onnx(export, tmp)
            (tmp / "README.md").write_text(model_card(export, args.format, args.language, args.speech_style),
                                           encoding="utf-8")
    except (EnsembleError, BackboneError, ExportError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    for note in export.notes:
        print(f"export: note: {note}", file=sys.stderr)
    cfg = export.config
    print(f"exported {len(cfg.members)} member(s) of {len(cfg.ensembles)} ensemble(s) on {len(cfg.groups)} backbone "
          f"group(s) -> {dest} ({args.format}, {time.monotonic() - start:.0f} s); check against ser-hpc's forward: "
          f"max abs diff {export.check_max_diff:.1e}"
          + (f"; ONNX vs PyTorch: {max(graph_diffs):.1e}" if graph_diffs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
