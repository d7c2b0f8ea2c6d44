"""Run the frozen backbones once over a corpus into the feature store (train.features=cached).

    python jobs/extract_features.py RUN_CONFIG.yaml [MORE.yaml ...] [key=value ...]
        extracts the store one run reads (data.features_dir); reused when complete
    python jobs/extract_features.py --plan results/<grid>/plan.json [--task N]
        a launched grid's features job: every store of its cached runs, or task N of the
        features array (one shard of one store: plan.json's feature_tasks[N])

Example: ``python jobs/extract_features.py configs/run/demo.yaml train.features=cached``
"""
import argparse
import sys

import _bootstrap  # noqa: F401  (repo root on sys.path)

from ser_hpc.offline import offline_by_default  # noqa: E402

offline_by_default()  # backbones from local folders or the prefetched cache: a job never waits on the hub

from ser_hpc.config import ConfigError, load_config  # noqa: E402
from ser_hpc.data.audio import AudioError  # noqa: E402
from ser_hpc.data.corpus import CorpusError  # noqa: E402
from ser_hpc.features.store import FeatureStoreError  # noqa: E402
from ser_hpc.logs import setup_logging  # noqa: E402
from ser_hpc.models.encoders import BackboneError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="YAML config files, then key=value overrides")
    parser.add_argument("--plan", help="a launched grid's plan.json")
    parser.add_argument("--task", type=int, help="with --plan: one features array task (a shard of a store)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides anywhere on the line
    setup_logging()
    try:
        if args.plan:
            from ser_hpc.features.job import run_features
            print("\n".join(run_features(args.plan, args.task)))
            return 0
        files = [a for a in args.items if "=" not in a]
        if not files:
            parser.error("give a run config (YAML) or --plan")
        from ser_hpc.features.extract import extract
        store = extract([load_config(files, [a for a in args.items if "=" in a])])
    except (ConfigError, CorpusError, AudioError, BackboneError, FeatureStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{store.folder}: {store.meta['clips']} clips, {store.views} view(s), {store.nbytes / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
