"""Launch a grid: ``python jobs/launch_grid.py GRID.yaml [--cluster slurm|local|debug] [--dry-run] [--wait] [key=value ...]``

key=value overrides (applied to every run) may come anywhere on the command line. A key
that the grid's axes or backbone pairs set, and run.dir (the grid names the run folders),
are refused. Exit status: 0 done / submitted, 1 some runs failed, 2 bad input (nothing
submitted), 3 another launch of this grid holds its lock.

Expands backbone pairs x head hyperparameters into runs, checks the data and that every
backbone loads offline, then submits ONE training array (a task per pack of runs; several
when there are more packs than the cluster's MaxArraySize) and an aggregation job that
depends on it (on all of them). Finished runs are skipped on relaunch. With Slurm it
returns at once with the job ids unless --wait is given; local and debug run to the end.
Every job of a launch runs a snapshot of the code taken at submission
(results/<grid>/code/<id>/), not the checkout as it is when the job starts (--no-snapshot).
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from ser_hpc.config import ConfigError
from ser_hpc.data.audio import AudioError
from ser_hpc.data.corpus import CorpusError
from ser_hpc.grid.checks import CheckError
from ser_hpc.grid.launch import describe, describe_problems, emit_sbatch, launch, plan_launch, summary
from ser_hpc.locks import LockHeld
from ser_hpc.logs import setup_logging
from ser_hpc.models.encoders import BackboneError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid YAML, e.g. configs/grid/emospeech2024.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides applied to every run")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], help="executor (default: the profile's)")
    parser.add_argument("--profile", help="cluster profile YAML (default: the grid's 'cluster')")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="with --dry-run: list every run (by default a grid of more than 50 runs shows a summary "
                             "per backbone pair and its first and last runs)")
    parser.add_argument("--wait", action="store_true", help="with slurm: wait for the aggregation job")
    parser.add_argument("--emit-sbatch", action="store_true",
                        help="write the plan and the job chain as a script of sbatch calls (run by "
                             "slurm/submit_grid.sh); print the script's path")
    parser.add_argument("--quick-check", action="store_true",
                        help="check audio files exist without opening them (huge corpora on slow file systems)")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run the jobs from the checkout as it is when each job starts, instead of from a "
                             "snapshot of the code taken now (results/<grid>/code/<id>/)")
    args = parser.parse_intermixed_args(argv)  # key=value anywhere, e.g. after --cluster local
    setup_logging()
    try:
        lp = plan_launch(args.grid, args.overrides, args.cluster, args.profile, args.quick_check,
                         code_snapshot=not args.no_snapshot)
    except (ConfigError, CorpusError, AudioError, BackboneError, CheckError, FileNotFoundError) as exc:
        print(f"error: {exc}\nnothing was submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(lp, verbose=args.verbose), flush=True)  # the plan first, then what stops it
    if lp.problems:
        print(f"error: {describe_problems(lp)}\nnothing was submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    try:
        if args.emit_sbatch:
            print(emit_sbatch(lp, args.overrides))
            return 0
        sub = launch(lp, args.overrides)
    except LockHeld as exc:
        print(f"error: another launch of grid {lp.spec.name} is in progress: {exc}\nnothing was submitted",
              file=sys.stderr)
        return 3
    out = lp.spec.out_dir.resolve()
    if sub.executor == "slurm":
        arrays = (f"train arrays {', '.join(a['job_id'] for a in sub.train_arrays)}" if len(sub.train_arrays) > 1
                  else f"train array {sub.job_ids.get('train') or '(nothing to train)'}")
        print(f"submitted: {arrays} ({len(sub.packs)} task(s)), "
              f"aggregation {sub.job_ids['aggregate']} (afterany)\nresults: {out}")
        if not args.wait:
            return 0
        try:
            sub.handles["aggregate"].result()
        except Exception as exc:  # the aggregation's own error, e.g. no run finished
            print(f"aggregation failed: {exc}", file=sys.stderr)
    print(summary(out))
    ok = (out / "ensemble" / "ensemble.json").exists()
    return 0 if ok and not sub.failed_packs else 1


if __name__ == "__main__":
    sys.exit(main())
