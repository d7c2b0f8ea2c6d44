"""Train one run: ``python jobs/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]``.

Example: ``python jobs/train.py configs/run/demo.yaml run.dir=results/demo_run train.lr=1e-4``
"""
import argparse
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.config import ConfigError, load_config, valid_keys
from ser_hpc.data.audio import AudioError
from ser_hpc.data.corpus import CorpusError
from ser_hpc.logs import setup_logging
from ser_hpc.models.encoders import BackboneError
from ser_hpc.train.trainer import train_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="YAML config files, then key=value overrides")
    parser.add_argument("--keys", action="store_true", help="list every config key and exit")
    args = parser.parse_args(argv)
    if args.keys:
        print("\n".join(valid_keys()))
        return 0
    setup_logging()
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
    print(f"results: {cfg.run.dir}\ndev macro-F1: {final['dev_macro_f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
