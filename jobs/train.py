"""Train one run, or one pack of a launched grid.

    python jobs/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    python jobs/train.py --plan results/<grid>/plan.json --pack N   (N defaults to $SLURM_ARRAY_TASK_ID)

Example: ``python jobs/train.py configs/run/demo.yaml run.dir=results/demo_run train.lr=1e-4``
"""
import argparse
import os
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.config import ConfigError, load_config, valid_keys
from ser_hpc.data.audio import AudioError
from ser_hpc.data.corpus import CorpusError
from ser_hpc.grid.tasks import run_pack
from ser_hpc.logs import setup_logging
from ser_hpc.models.encoders import BackboneError
from ser_hpc.train.trainer import train_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="YAML config files, then key=value overrides")
    parser.add_argument("--keys", action="store_true", help="list every config key and exit")
    parser.add_argument("--plan", help="a grid's plan.json (array task mode)")
    parser.add_argument("--pack", type=int, help="pack index (default: $SLURM_ARRAY_TASK_ID)")
    args = parser.parse_args(argv)
    if args.keys:
        print("\n".join(valid_keys()))
        return 0
    setup_logging()
    if args.plan:
        pack = args.pack if args.pack is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if pack is None:
            parser.error("--plan needs --pack N or $SLURM_ARRAY_TASK_ID")
        try:
            statuses = run_pack(args.plan, int(pack))
        except Exception as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("\n".join(f"{run_id}: {status}" for run_id, status in statuses.items()))
        return 0
    files = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    try:
        cfg = load_config(files, overrides)
        final = train_run(cfg)
    except (ConfigError, CorpusError, AudioError, BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if final["status"] != "done":
        print(f"run failed: {final['reason']}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0":
        print(f"results: {cfg.run.dir}\ndev macro-F1: {final['dev_macro_f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
