#!/usr/bin/env python
"""Aggregate a grid: leaderboard + top-k ensemble under RESULTS_DIR/ensemble/.

    python jobs/aggregate.py results/<grid_name> [--top-k K] [--method mean|vote] [--selection topk|greedy]

Exit status: 0 on success, 1 when nothing can be ensembled (no finished run, members
with inconsistent outputs; the leaderboard is still written), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import ser_hpc  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_hpc.ensemble.aggregate import AggregateError, aggregate
from ser_hpc.ensemble.settings import METHODS, SELECTIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="results/<grid_name>")
    parser.add_argument("--top-k", type=int, default=None,
                        help="ensemble size (default: plan.json ensemble.top_k, else 3)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="mean: average class probabilities; vote: majority vote (default: plan.json, else mean)")
    parser.add_argument("--selection", choices=SELECTIONS, default=None,
                        help="topk: the top-k runs by dev (the paper); greedy: forward selection with replacement "
                             "on dev (Caruana et al. 2004) (default: plan.json, else topk)")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    try:
        aggregate(args.results_dir, top_k=args.top_k, method=args.method, selection=args.selection)
    except AggregateError as exc:
        print(f"aggregate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
