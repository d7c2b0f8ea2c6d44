#!/usr/bin/env python
"""Where a grid stands: one table of every run.

    python jobs/status.py results/<grid_name> [--state failed] [--no-slurm] [--json]

Each run's state (pending, running, requeued, done, failed), pack, best dev macro-F1 so far,
steps, elapsed time, and for failures the reason and the log path. Slurm states come from
squeue/sacct for the job ids in manifest.json when those commands work; otherwise the
results tree alone is used. Exit status: 0, or 2 when RESULTS_DIR is not a launched grid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.grid.status import STATES, grid_status, render, to_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path, help="results/<grid_name>")
    parser.add_argument("--state", choices=STATES, help="list only runs in this state (the summary counts all)")
    parser.add_argument("--no-slurm", action="store_true", help="do not call squeue/sacct")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        status = grid_status(args.results_dir, use_slurm=not args.no_slurm)
    except FileNotFoundError as exc:
        print(f"status: error: {exc}", file=sys.stderr)
        return 2
    print(to_json(status) if args.json else render(status, args.state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
