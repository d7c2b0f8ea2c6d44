"""results/<grid>/manifest.json: one entry per launch, and the one reader of its job ids.

Each launch records where it ran from (host, git commit, package versions, the code
snapshot its jobs run), what it submitted (packs, arrays) and, per pack, the Slurm task
that trains it and its log. The submitit path records the ids as submitit returns them
(a one-task "array" is a plain job: ``6``, not ``6_0``); the sbatch path's submit.sh
records each id as sbatch prints it (``python -m ser_hpc.grid.manifest``). ``jobs/status.py``
reads the tasks back with ``pack_tasks``.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import atomic_io


def new_launch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def read(out_dir: Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    return atomic_io.read_json(path) if path.exists() else {"grid_name": Path(out_dir).name, "launches": []}


def append_launch(out_dir: Path, entry: dict) -> None:
    """Add a launch (every relaunch is kept)."""
    manifest = read(out_dir)
    manifest["launches"].append(entry)
    atomic_io.write_json(Path(out_dir) / "manifest.json", manifest)


def record_sbatch_job(out_dir: Path, launch_id: str, var: str, job_id: str) -> None:
    """submit.sh: sbatch gave job ``job_id`` to the chain's job ``var`` (``train_2``, ...):
    note it, and for an array each pack's task id and log, in the launch ``launch_id``."""
    manifest = read(out_dir)
    launch = next((x for x in manifest["launches"] if x.get("launch_id") == launch_id), None)
    if launch is None:
        raise KeyError(f"no launch {launch_id} in {Path(out_dir) / 'manifest.json'}")
    kind, k = var.rsplit("_", 1)
    key = "train_array" if kind == "train" else kind
    if not launch["job_ids"].get(key):  # an array split at MaxArraySize: its first job stands for it
        launch["job_ids"][key] = job_id
    arrays = launch.get(f"{kind}_arrays") or []
    if arrays:
        array = arrays[int(k) - 1]
        array["job_id"] = job_id
        for item in array["items"]:
            index = item - array["offset"]
            if kind == "train":
                launch["tasks"][str(item)] = {"task_id": f"{job_id}_{index}",
                                              "log": array["log"].replace("%A", job_id).replace("%a", str(index))}
    atomic_io.write_json(Path(out_dir) / "manifest.json", manifest)


@dataclass
class PackTask:
    executor: str
    task_id: str | None = None   # as Slurm names it: "<array>_<index>", or a plain job id
    log: str | None = None       # where a failed run's traceback went


def pack_tasks(manifest: dict) -> tuple[dict[int, PackTask], dict[str, str]]:
    """The latest launch's task (and log) of every pack, and the latest launch's other jobs
    (data preparation, features, aggregation) by kind."""
    tasks: dict[int, PackTask] = {}
    others: dict[str, str] = {}
    for launch in manifest.get("launches", []):
        recorded = launch.get("tasks") or {}
        others = {k: str(v) for k, v in (launch.get("job_ids") or {}).items() if k != "train_array" and v}
        for pack in launch.get("packs") or []:
            task = recorded.get(str(pack)) or {}
            tasks[pack] = PackTask(launch.get("executor") or "?", task.get("task_id"), task.get("log"))
    return tasks, others


if __name__ == "__main__":  # submit.sh: python -m ser_hpc.grid.manifest OUT_DIR LAUNCH_ID VAR JOB_ID
    record_sbatch_job(Path(sys.argv[1]), *sys.argv[2:5])
