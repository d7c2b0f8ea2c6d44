"""results/<grid>/plan.json: the expanded grid that array tasks and aggregation read.

It holds every run's full resolved config, so a task never re-reads the grid YAML (which
the researcher may have edited since) and the sbatch templates need only a pack index.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .. import atomic_io
from ..run_status import RunStatus
from ..train.run_folder import RunFolder
from .expand import PlannedRun
from .spec import GridSpec


def build_plan(spec: GridSpec, runs: list[PlannedRun], packs: list[list[PlannedRun]]) -> dict[str, Any]:
    return {
        "grid_name": spec.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "launch_dir": os.getcwd(),  # run configs hold paths relative to it
        "results_dir": str(spec.out_dir),
        "ensemble": spec.ensemble,
        "packs": [[r.run_id for r in pack] for pack in packs],
        "runs": [{"run_id": r.run_id, "name": r.name, "pair": r.pair, "pack": r.pack,
                  "overrides": r.overrides, "config": r.config} for r in runs],
    }


def plan_json(plan: dict[str, Any]) -> str:
    """plan.json's text: one pack and one run per line. Indented JSON goes through the
    pure-Python encoder (seconds for 10,000 runs); each line here is one C-encoded dump."""
    def value(key: str, obj: Any) -> str:
        if key in ("packs", "runs") and isinstance(obj, list) and obj:
            return "[\n" + ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in obj) + "\n]"
        return json.dumps(obj, ensure_ascii=False)
    return "{\n" + ",\n".join(f"{json.dumps(k)}: {value(k, v)}" for k, v in plan.items()) + "\n}\n"


def write_plan(plan: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / "plan.json"
    atomic_io.write_text(path, plan_json(plan))
    return path


def read_plan(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"no plan at {path}: launch the grid first (jobs/launch_grid.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def run_folder(plan: dict[str, Any], run: dict[str, Any]) -> RunFolder:
    """A run's folder, wherever the current directory is (configs hold launch-relative paths)."""
    path = Path(run["config"]["run"]["dir"])
    return RunFolder(path if path.is_absolute() else Path(plan["launch_dir"]) / path)


def run_states(plan: dict[str, Any]) -> dict[str, RunStatus]:
    """run_id -> done, failed or missing, from the runs' final.json files."""
    states = {}
    for run in plan["runs"]:
        final = run_folder(plan, run).read_final()
        states[run["run_id"]] = RunStatus.of_final(final)
    return states
