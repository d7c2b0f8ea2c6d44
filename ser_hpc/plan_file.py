"""Reading a launched grid's plan.json: what every job of the chain starts from, on a compute
node or locally (the grid layer writes it, ``grid/plan.py``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import slurm
from .logs import setup_logging
from .run_status import RunStatus
from .train.run_folder import RunFolder


def read_plan(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    path = path if path.suffix == ".json" else path / "plan.json"  # a grid's results folder, or its plan
    if not path.is_file():
        raise FileNotFoundError(f"no plan at {path}: launch the grid first (jobs/launch_grid.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def run_folder(plan: dict[str, Any], run: dict[str, Any]) -> RunFolder:
    """A run's folder, wherever the current directory is (configs hold launch-relative paths)."""
    path = Path(run["config"]["run"]["dir"])
    return RunFolder(path if path.is_absolute() else Path(plan["launch_dir"]) / path)


def run_states(plan: dict[str, Any]) -> dict[str, RunStatus]:
    """run_id -> done, failed or missing, from the runs' final.json files."""
    return {run["run_id"]: RunStatus.of_final(run_folder(plan, run).read_final()) for run in plan["runs"]}


def job_start(plan_path: str) -> dict:
    """Every job's first lines: logging, threads, the plan, its launch directory (run configs
    hold paths relative to it). The offline-hub variables come with the job's environment
    (``cluster.job_env``): the hub library reads them when it is imported, before this runs."""
    import torch
    setup_logging()
    cpus = slurm.cpus_per_task() or os.environ.get("SER_HPC_THREADS")
    if cpus:
        torch.set_num_threads(int(cpus))
    plan = read_plan(plan_path)
    os.chdir(plan["launch_dir"])
    return plan
