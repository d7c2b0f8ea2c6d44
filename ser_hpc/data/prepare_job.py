"""The grid's data-preparation job: every clip its runs read, decoded once into
data.prepared_dir (idempotent), and whether a plan still needs it."""
from __future__ import annotations

import logging
import os

from .. import slurm
from ..config import config_from_dict
from ..plan_file import job_start
from .sources import clips_key

log = logging.getLogger("ser_hpc.data")


def prepared_data_configs(plan: dict) -> list:
    """The distinct data configs of a plan that read prepared audio."""
    seen, out = set(), []
    for run in plan["runs"]:
        if not run["config"]["data"].get("prepared_dir"):
            continue
        key = clips_key(run["config"]["data"])  # every clip of the corpus, whatever the test fold
        if key not in seen:  # a Config only for each distinct data section
            seen.add(key)
            out.append(config_from_dict(run["config"]).data)
    return out


def needs_preparation(plan: dict) -> bool:
    """True when a data config reads prepared audio that is not all there yet."""
    from ..data.prepared import PreparedAudio
    from ..data.prepared_format import PreparedAudioError
    from ..data.sources import load_splits
    for data in prepared_data_configs(plan):
        splits = load_splits(data)
        try:
            PreparedAudio(data.prepared_dir, data.sample_rate).check(splits.train + splits.dev + splits.test)
        except PreparedAudioError:
            return True
    return False


def run_prepare(plan_path: str) -> list[dict]:
    """The grid's first job: decode every clip once into data.prepared_dir (idempotent)."""
    from ..data.prepare import prepare_for_data_config
    plan = job_start(plan_path)
    workers = slurm.cpus_per_task() or os.cpu_count() or 1
    summaries = []
    for data in prepared_data_configs(plan):
        summary = prepare_for_data_config(data, workers=min(workers, 8))
        log.info("prepared audio for %s in %s: %s", data.train_csv or data.manifest or data.root, data.prepared_dir,
                 summary.as_dict())
        summaries.append(summary.as_dict())
    return summaries
