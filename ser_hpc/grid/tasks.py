"""What array tasks and the aggregation job run, on a compute node or locally.

The same functions back submitit jobs, the sbatch templates (via jobs/train.py --pack)
and the local / debug executors.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import config_from_dict
from ..logs import setup_logging
from ..train.trainer import train_run
from .plan import read_plan

log = logging.getLogger("ser_hpc.grid")


def _job_environment() -> None:
    # Compute nodes are offline: never let transformers try the hub (it would hang, then fail).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SER_HPC_THREADS")
    if cpus:
        torch.set_num_threads(int(cpus))


def run_pack(plan_path: str, pack_index: int) -> dict[str, str]:
    """Train every run of one pack; one run's failure does not stop the others.

    Returns run_id -> status. Raises at the end if any run failed, so the scheduler
    records the task as failed too (the aggregation job depends on the array with
    ``afterany`` and still runs).
    """
    setup_logging()
    _job_environment()
    plan = read_plan(plan_path)
    os.chdir(plan["launch_dir"])
    if not 0 <= pack_index < len(plan["packs"]):
        raise IndexError(f"pack {pack_index} out of range: the plan has {len(plan['packs'])} packs")
    by_id = {r["run_id"]: r for r in plan["runs"]}
    statuses = {}
    for run_id in plan["packs"][pack_index]:
        run = by_id[run_id]
        log.info("pack %d: run %s (%s)", pack_index, run_id, run["name"])
        try:
            final = train_run(config_from_dict(run["config"], f"plan run {run_id}"))
            statuses[run_id] = final["status"]
        except Exception as exc:  # recorded in the run's final.json by train_run
            log.error("pack %d: run %s failed: %s", pack_index, run_id, exc)
            statuses[run_id] = "failed"
    failed = [r for r, s in statuses.items() if s != "done"]
    if failed:
        raise RuntimeError(f"pack {pack_index}: {len(failed)} of {len(statuses)} run(s) failed: {', '.join(failed)}")
    return statuses


def run_aggregation(results_dir: str) -> dict:
    """The dependent job: leaderboard and ensemble of whatever finished."""
    setup_logging()
    from ..ensemble.aggregate import aggregate  # matplotlib only where it is needed
    return aggregate(Path(results_dir).resolve())
