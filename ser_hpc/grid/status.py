"""Where a grid stands: one row per run (state, pack, best dev macro-F1 so far, steps, elapsed time,
and for failures the reason and the log to read). The results tree says what finished or started;
one squeue and one sacct call say what is queued, running, requeued or died without a word. Without
Slurm, or without an answer from it, the tree alone is used. Only small files are read.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import atomic_io
from ..plan_file import read_plan
from ..run_status import RunStatus
from ..slurm import ACTIVE, RUNNING, TaskState, query
from ..train.run_folder import RunFolder
from . import manifest

# The states a row can show (a run without final.json is pending, running or requeued here).
STATES = tuple(s.value for s in RunStatus if s is not RunStatus.MISSING)


@dataclass
class RunRow:
    run_id: str
    name: str
    pack: int | None
    state: RunStatus = RunStatus.PENDING
    dev_macro_f1: float | None = None
    steps: int | None = None
    max_steps: int | None = None
    elapsed_s: float | None = None
    reason: str | None = None
    log: str | None = None
    slurm: str | None = None     # e.g. "12_3 RUNNING", "12_4 PENDING (Priority)"
    info: str | None = None      # a hint for a human (no scheduler info, last write age)


@dataclass
class GridStatus:
    results_dir: str
    grid_name: str
    runs: list[RunRow]
    slurm: str                   # where scheduler states came from, in words
    jobs: dict[str, str] = field(default_factory=dict)  # "prepare"/"aggregate" -> "<id> <STATE> (reason)"
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.state == s for r in self.runs) for s in STATES}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _resolve(row: RunRow, folder: RunFolder, task: TaskState | None, now: float) -> None:
    """Set row.state and its details."""
    final_t, metrics_t = _mtime(folder.final), _mtime(folder.metrics)
    final = atomic_io.read_json(folder.final) if final_t is not None else None  # written whole (temp + rename)
    last_write = None  # set when the tree alone says the run is under way
    if final is not None and final.get("status") == RunStatus.DONE:
        row.state = RunStatus.DONE
    elif task is not None and task.state in ACTIVE:
        if final is not None and task.start is not None and final_t >= task.start:
            row.state = RunStatus.FAILED  # in this attempt
        else:  # not started, or retrying a run that failed in an earlier launch
            final = None
            if task.state in RUNNING:  # the task trains all its pack's runs at once
                row.state = RunStatus.RUNNING
            else:
                row.state = RunStatus.REQUEUED if task.requeues else RunStatus.PENDING
    elif task is None and metrics_t and final_t and metrics_t > final_t:
        # metrics.jsonl newer than the failed final.json: a retry under way.
        row.state, final, last_write = RunStatus.RUNNING, None, metrics_t
    elif final is not None:
        row.state = RunStatus.FAILED
    elif task is not None:  # the task ended (or is gone) and the run never wrote final.json
        row.state = RunStatus.FAILED
        row.reason = f"no final.json: Slurm task {task.job_id} ended {task.state}"
    elif metrics_t or folder.config.exists():  # started, and nothing says it stopped
        row.state, last_write = RunStatus.RUNNING, max(t for t in (metrics_t, _mtime(folder.config)) if t)
    if task is not None:
        row.slurm = str(task) + (f", requeued {task.requeues}x" if task.requeues else "")
    if last_write:
        row.info = f"no scheduler info; last write {_age(now - last_write)} ago"
    if final is not None:
        row.dev_macro_f1, row.steps, row.elapsed_s = (final.get(k) for k in ("dev_macro_f1", "steps", "elapsed_s"))
        if row.state == RunStatus.FAILED:
            row.reason = str(final.get("reason") or "no reason given").splitlines()[0]
        if final.get("resumed_from"):  # preempted or requeued on a time limit, then resumed
            row.info = "resumed at step " + ", ".join(map(str, final["resumed_from"]))
    elif row.state in (RunStatus.RUNNING, RunStatus.FAILED):
        row.dev_macro_f1, row.steps, row.elapsed_s = folder.progress()


def grid_status(results_dir: str | Path, use_slurm: bool = True) -> GridStatus:
    results_dir = Path(results_dir)
    plan = read_plan(results_dir)
    tasks, others = manifest.pack_tasks(manifest.read(results_dir))
    job_ids = {t.task_id.split("_")[0] for t in tasks.values() if t.task_id} | set(others.values())
    states = query(sorted(job_ids)) if use_slurm else None
    if not use_slurm:
        source = "not used (--no-slurm): results tree only"
    elif not job_ids:
        source = "no Slurm job ids in manifest.json: results tree only"
    else:
        source = "squeue/sacct" if states is not None else "squeue/sacct did not answer: results tree only"
    states = states or {}
    now, runs = time.time(), []
    for entry in plan.get("runs", []):
        pack, train = entry.get("pack"), (entry.get("config") or {}).get("train") or {}
        row = RunRow(entry["run_id"], entry.get("name") or entry["run_id"], pack,
                     max_steps=train.get("max_steps") or None)
        pack_task = tasks.get(pack)
        task = states.get(pack_task.task_id) if pack_task and pack_task.task_id else None
        _resolve(row, RunFolder(results_dir / "runs" / row.run_id), task, now)
        if row.state == RunStatus.FAILED and pack_task is not None:
            row.log = pack_task.log
        runs.append(row)
    status = GridStatus(str(results_dir), plan.get("grid_name") or results_dir.name, runs, source)
    status.jobs = {kind: str(states[job]) for kind, job in others.items() if job in states}
    extra = sorted({p.name for p in (results_dir / "runs").glob("*")} - {r.run_id for r in runs})
    if extra:
        status.notes.append(f"{len(extra)} run folder(s) not in plan.json (an earlier grid): {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
    return status


def _fmt_elapsed(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(status: GridStatus, only: str | None = None) -> str:
    c = status.counts()
    lines = [f"grid {status.grid_name} ({status.results_dir}): {len(status.runs)} runs, "
             + ", ".join(f"{c[s]} {s}" for s in STATES) + f"; Slurm: {status.slurm}"]
    lines += [f"{kind} job {job}" for kind, job in status.jobs.items()]
    rows = [r for r in status.runs if only is None or r.state == only]
    width = max([len("run"), *(len(r.run_id) for r in rows)])
    columns = f"{{:<{width}}}  {{:<8}}  {{:>4}}  {{:>6}}  {{:>9}}  {{:>7}}  {{}}".format
    lines.append(columns("run", "state", "pack", "dev F1", "steps", "elapsed", "details"))
    for r in rows:
        f1 = "-" if r.dev_macro_f1 is None else f"{100 * r.dev_macro_f1:.2f}"
        steps = "-" if r.steps is None else (f"{r.steps}/{r.max_steps}" if r.max_steps else str(r.steps))
        details = "; ".join(x for x in (r.reason, f"log: {r.log}" if r.log else None, r.slurm, r.info) if x)
        pack = "-" if r.pack is None else str(r.pack)
        lines.append(columns(r.run_id, r.state, pack, f1, steps, _fmt_elapsed(r.elapsed_s), details))
    lines += [f"note: {n}" for n in status.notes]
    return "\n".join(lines)


def to_json(status: GridStatus) -> str:
    return json.dumps({**asdict(status), "counts": status.counts()}, indent=2)
