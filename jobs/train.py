"""Train one run, or one pack of a launched grid.

    python jobs/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    python jobs/train.py --plan results/<grid>/plan.json --pack N   (N defaults to $SLURM_ARRAY_TASK_ID)

Example: ``python jobs/train.py configs/run/demo.yaml run.dir=results/demo_run train.lr=1e-4``

Files and key=value overrides may come in any order, before or after the options; files
apply in their order, then the overrides. One process trains a run folder at a time: while
another live process holds it, this one stops at once (exit status 3) naming the holder's
host, pid and Slurm job, or waits for it with --wait.
Exit status: 0 done, 1 the run failed, 2 bad input, 3 the run folder is in use.
"""
import argparse
import os
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.offline import offline_by_default  # noqa: E402

offline_by_default()  # backbones from local folders or the prefetched cache: a job never waits on the hub

from ser_hpc.config import ConfigError, key_help, load_config  # noqa: E402
from ser_hpc.data.audio import AudioError  # noqa: E402
from ser_hpc.data.corpus import CorpusError  # noqa: E402
from ser_hpc.locks import LockHeld  # noqa: E402
from ser_hpc.logs import setup_logging  # noqa: E402
from ser_hpc.models.encoders import BackboneError  # noqa: E402
from ser_hpc.run_status import RunStatus  # noqa: E402
from ser_hpc.train.loop import train_pack  # noqa: E402
from ser_hpc.train.pack_task import run_pack  # noqa: E402


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="YAML config files, then key=value overrides")
    parser.add_argument("--keys", action="store_true", help="list every config key and exit")
    parser.add_argument("--plan", help="a grid's plan.json (array task mode)")
    parser.add_argument("--pack", type=int, help="pack index (default: $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--wait", action="store_true",
                        help="if another process is training the same run folder, wait for it instead of stopping")
    args = parser.parse_intermixed_args(argv)  # key=value overrides anywhere on the line
    if args.keys:
        print("\n".join(key_help()))
        return 0
    setup_logging()
    if args.plan:
        pack = args.pack if args.pack is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if pack is None:
            parser.error("--plan needs --pack N or $SLURM_ARRAY_TASK_ID")
        if args.items:  # they would be silently ignored: the plan holds every run's resolved config
            parser.error(f"--plan takes no config files or key=value overrides (got {' '.join(args.items)}); "
                         "relaunch the grid with the overrides instead")
        try:  # the trainer locks the pack's run folders (and waits for them with --wait)
            statuses = run_pack(args.plan, int(pack), wait=args.wait)
        except LockHeld as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        except Exception as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("\n".join(f"{run_id}: {status}" for run_id, status in statuses.items()))
        return 0
    files = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    try:
        cfg = load_config(files, overrides)
        final = train_pack([cfg], wait=args.wait)[0]  # locks the run folder (waits for it with --wait)
    except LockHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, CorpusError, AudioError, BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if final["status"] != RunStatus.DONE:
        print(f"run failed: {final['reason']}", file=sys.stderr)
        return 1
    if _is_main():
        print(f"results: {Path(cfg.run.dir).resolve()}\ndev macro-F1: {final['dev_macro_f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
