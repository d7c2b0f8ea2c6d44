"""Fetch every backbone of a grid into the Hugging Face cache (run on the login node).

    HF_HOME=/shared/hf_cache python jobs/prefetch_models.py configs/grid/emospeech2024.yaml

Then checks each loads with no network, as it will on a compute node.
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from ser_hpc.config import ConfigError
from ser_hpc.grid.checks import CheckError
from ser_hpc.grid.checks import prefetch
from ser_hpc.logs import setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid YAML")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        results = prefetch(args.grid)
    except (CheckError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, name, outcome in results:
        print(f"{kind:6s} {name}: {outcome}; loads offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
