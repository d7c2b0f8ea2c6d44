"""Decode a corpus once into 16 kHz prepared audio (idempotent: an unchanged corpus decodes nothing).

    python jobs/prepare_audio.py RUN_CONFIG.yaml [MORE.yaml ...] [key=value ...] [--workers N]
        prepares data.train_csv, data.dev_csv and data.test_csv into data.prepared_dir
        at data.sample_rate (e.g. data.prepared_dir=/shared/prepared_audio)
    python jobs/prepare_audio.py --csv TRAIN.csv [--csv TEST.csv] --audio-dir DIR [--audio-dir DIR2] --out DIR
        [--sample-rate 16000] [--workers N]
        one --audio-dir for all CSVs, or one per --csv

Example: ``python jobs/prepare_audio.py configs/run/demo.yaml data.prepared_dir=results/prepared_audio``
"""
import argparse
import json
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.config import ConfigError, load_config
from ser_hpc.data.audio import AudioError
from ser_hpc.data.corpus import CorpusError
from ser_hpc.data.prepare import MAX_WORKERS, prepare_corpus, prepare_for_data_config
from ser_hpc.logs import setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="YAML config files, then key=value overrides")
    parser.add_argument("--plan", help="a launched grid's plan.json: prepare every data config it uses")
    parser.add_argument("--csv", action="append", default=[], help="a corpus CSV (id,[label,]transcription)")
    parser.add_argument("--audio-dir", action="append", default=[], help="folder of the files named by `id`")
    parser.add_argument("--out", help="prepared audio folder (with --csv)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="target rate with --csv (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"decoding processes (default: usable CPUs, at most {MAX_WORKERS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_intermixed_args(argv)  # key=value overrides anywhere on the line
    setup_logging()
    progress = not args.no_progress
    try:
        if args.plan:
            from ser_hpc.data.prepare_job import run_prepare
            for summary in run_prepare(args.plan):
                print(summary)
            return 0
        if args.csv:
            if args.items:
                parser.error("give either a run config or --csv, not both")
            if not args.out:
                parser.error("--csv needs --out")
            dirs = args.audio_dir
            if len(dirs) == 1:
                dirs = dirs * len(args.csv)
            if len(dirs) != len(args.csv):
                parser.error("give one --audio-dir, or one per --csv")
            summary = prepare_corpus(list(zip(args.csv, dirs)), args.out, args.sample_rate,
                                     workers=args.workers, progress=progress)
        else:
            files = [a for a in args.items if "=" not in a]
            if not files:
                parser.error("give a run config (YAML) or --csv/--audio-dir/--out")
            cfg = load_config(files, [a for a in args.items if "=" in a])
            if args.out:
                cfg.data.prepared_dir = args.out
            summary = prepare_for_data_config(cfg.data, workers=args.workers, progress=progress)
    except (ConfigError, CorpusError, AudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
