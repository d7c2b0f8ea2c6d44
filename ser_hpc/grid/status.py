"""Where a grid stands: one row per run with its state, pack, best dev macro-F1 so far,
steps, elapsed time, and for failures the reason and the log to read.

States: pending, running, requeued, done, failed. The results tree says what finished
(final.json) and what has started (config.yaml, metrics.jsonl); Slurm (squeue / sacct for
the job ids in manifest.json) says what is queued, running, requeued or died without a
word (timeout, cancel, node failure): one squeue and one sacct call for all job ids
(``query``; sacct -D keeps one record per attempt, so requeues show). Either may be missing
(no Slurm here, no slurmdbd): then the tree alone is used. Only small
files are read (plan.json, manifest.json, final.json, and metrics.jsonl of unfinished
runs), so hundreds of runs take well under a second.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..run_status import RunStatus
from ..train.run_folder import RunFolder

ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                    "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"})
TIMEOUT_S = 10  # squeue / sacct: a login node that cannot reach the controller must not hang


@dataclass
class TaskState:
    job_id: str               # "<array>_<task>" or a plain job id
    state: str                # Slurm's state, first word (CANCELLED by 0 -> CANCELLED)
    reason: str = ""
    requeues: int = 0         # earlier attempts of this task (sacct -D records before the last)
    start: float | None = None  # epoch seconds, when started

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        # squeue exits 1 when every id is gone from the controller: that is an answer.
        return "" if "Invalid job id" in res.stderr else None
    return res.stdout


def _epoch(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:  # "Unknown", "N/A", "None"
        return None


def expand_ids(job_id: str) -> list[str]:
    """``12_[0-3%2]`` / ``12_[1,4-5]`` -> 12_0, 12_1, ...; anything else -> [job_id]."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def query(job_ids: list[str]) -> dict[str, TaskState] | None:
    """Task id -> state for the given (array) job ids; None when neither command answers."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return None
    joined = ",".join(ids)
    acct = _run(["sacct", "-n", "-P", "-X", "-D", "-j", joined, "-o", "JobID,State,Start,Reason"])
    # -O with RestartCnt: a requeue is visible at once, before sacct's records catch up.
    live = _run(["squeue", "-h", "-r", "-j", joined, "-O", "JobArrayID:|,State:|,Reason:|,StartTime:|,RestartCnt:|"])
    if acct is None and live is None:
        return None
    states: dict[str, TaskState] = {}
    compact: dict[str, TaskState] = {}
    for line in (acct or "").splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        jid, state, start, reason = parts[:4]
        word = (state.split() or [""])[0]
        if "[" in jid:  # a not-yet-started range of array tasks: weakest evidence
            for tid in expand_ids(jid):
                compact[tid] = TaskState(tid, word, reason)
            continue
        prev = states.get(jid)
        states[jid] = TaskState(jid, word, reason, prev.requeues + 1 if prev else 0, _epoch(start))
    for tid, st in compact.items():
        states.setdefault(tid, st)
    for line in (live or "").splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 5:
            continue
        jid, state, reason, start, restarts = parts[:5]
        prev = states.get(jid)
        requeues = max(prev.requeues if prev else 0, int(restarts) if restarts.isdigit() else 0)
        # squeue's start time of a pending job is only an estimate: keep real starts only.
        started = _epoch(start) if state != "PENDING" else None
        states[jid] = TaskState(jid, state, reason, requeues,
                                started or (prev.start if prev and state != "PENDING" else None))
    return states


# The states a row can show (a run without final.json is pending, running or requeued here).
STATES = tuple(s.value for s in RunStatus if s is not RunStatus.MISSING)
RUNNING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING"})


@dataclass
class PackTask:
    executor: str
    task_id: str | None = None   # Slurm "<array>_<index>", when known
    log: str | None = None       # the log a failed run's traceback went to


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


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def pack_tasks(results_dir: Path, manifest: dict) -> tuple[dict[int, PackTask], dict[str, str]]:
    """The latest launch's task (and log) of every pack, and the latest launch's other jobs
    (data preparation, aggregation) by kind."""
    logs = results_dir / "logs"
    try:
        names = os.listdir(logs)
    except OSError:
        names = []
    # slurm/submit_grid.sh launches record no job ids; their logs are named <array>_<pack>.out,
    # or <array>_<task>+<offset>.out for the arrays after the first of a grid split at
    # MaxArraySize (task i of such an array trains pack offset + i).
    sbatch_logs: dict[int, tuple[int, int, str]] = {}   # pack -> (array job, task index, log name)
    for n in names:
        m = re.fullmatch(r"(\d+)_(\d+)(?:\+(\d+))?\.out", n)
        if m:
            array, index = int(m.group(1)), int(m.group(2))
            pack = index + int(m.group(3) or 0)
            if array >= sbatch_logs.get(pack, (-1,))[0]:
                sbatch_logs[pack] = (array, index, n)
    tasks: dict[int, PackTask] = {}
    others: dict[str, str] = {}
    for launch in manifest.get("launches", []):
        executor, packs = launch.get("executor"), launch.get("packs") or []
        ids = launch.get("job_ids") or {}
        others = {k: str(v) for k, v in ids.items() if k != "train_array" and v}
        # submitit arrays index tasks 0..n-1 over the packs each was given; a grid split at
        # MaxArraySize records every array ("train_arrays"), an older launch only the one.
        arrays = [a for a in launch.get("train_arrays") or [] if a.get("job_id")]
        if executor == "slurm" and not arrays and ids.get("train_array"):
            arrays = [{"job_id": ids["train_array"], "packs": packs}]
        submitted = {pack: (str(a["job_id"]), i) for a in arrays for i, pack in enumerate(a.get("packs") or [])}
        for pack in packs:
            if executor == "slurm" and pack in submitted:
                tid = "{}_{}".format(*submitted[pack])
                err, out = logs / tid / f"{tid}_0_log.err", logs / tid / f"{tid}_0_log.out"
                tasks[pack] = PackTask(executor, tid, str(err if err.exists() or not out.exists() else out))
            elif executor == "sbatch":
                found = sbatch_logs.get(pack)
                tasks[pack] = PackTask(executor, f"{found[0]}_{found[1]}" if found else None,
                                       str(logs / found[2]) if found else None)
            elif executor == "local":
                tasks[pack] = PackTask(executor, None, str(logs / f"local_pack{pack}.log"))
            else:
                tasks[pack] = PackTask(executor or "?")
    return tasks, others


def read_progress(run_dir: Path) -> tuple[float | None, int | None, float | None]:
    """(best dev macro-F1 so far, last step, elapsed seconds) from metrics.jsonl."""
    best = step = elapsed = None
    for rec in RunFolder(run_dir).read_metrics():
        f1 = rec.get("dev_macro_f1")
        if isinstance(f1, (int, float)) and (best is None or f1 > best):
            best = f1
        step, elapsed = rec.get("step", step), rec.get("elapsed_s", elapsed)
    return best, step, elapsed


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _reason(task: TaskState) -> str:
    return f" ({task.reason})" if task.reason not in ("", "None") else ""


def _resolve(row: RunRow, run_dir: Path, task: TaskState | None, pack_task: PackTask | None,
             turn: list[bool], now: float) -> None:
    """Set row.state and its details. ``turn[0]``: no earlier run of this pack is in progress."""
    final_path = run_dir / "final.json"
    final = _json(final_path) if final_path.exists() else None
    final_t, metrics_t = _mtime(final_path), _mtime(run_dir / "metrics.jsonl")
    if task is not None:
        row.slurm = f"{task.job_id} {task.state}" + _reason(task)
        if task.requeues:
            row.slurm += f", requeued {task.requeues}x"
    if isinstance(final, dict) and final.get("status") == RunStatus.DONE:
        row.state = RunStatus.DONE
    elif task is not None and task.active:
        # A failed final.json older than this attempt is from an earlier launch: being retried.
        fresh = isinstance(final, dict) and task.start is not None and final_t is not None and final_t >= task.start
        if fresh:
            row.state = RunStatus.FAILED
        elif task.state in RUNNING and turn[0]:
            row.state, turn[0] = RunStatus.RUNNING, False
            final = None
        else:
            row.state = RunStatus.REQUEUED if task.requeues and task.state not in RUNNING else RunStatus.PENDING
            final = None
    elif isinstance(final, dict) or final_path.exists():
        # No live task: a metrics.jsonl newer than the failed final.json is a retry under way.
        if task is None and metrics_t and final_t and metrics_t > final_t:
            row.state, final = RunStatus.RUNNING, None
            row.info = f"no scheduler info; last write {_age(now - metrics_t)} ago"
        else:
            row.state = RunStatus.FAILED
            if not isinstance(final, dict):
                row.reason, final = "unreadable final.json", None
    elif task is not None:  # the task ended (or is gone) and the run never wrote final.json
        row.state = RunStatus.FAILED
        row.reason = f"no final.json: Slurm task {task.job_id} ended {task.state}"
    elif metrics_t or (run_dir / "config.yaml").exists():
        row.state = RunStatus.RUNNING
        last = max(t for t in (metrics_t, _mtime(run_dir / "config.yaml")) if t)
        row.info = f"no scheduler info; last write {_age(now - last)} ago"
    if isinstance(final, dict):
        row.dev_macro_f1, row.steps = final.get("dev_macro_f1"), final.get("steps")
        row.elapsed_s = final.get("elapsed_s")
        if row.state == RunStatus.FAILED:
            row.reason = row.reason or str(final.get("reason") or "no reason given").splitlines()[0]
        if final.get("resumed_from"):  # preempted or requeued on a time limit, then resumed
            row.info = "resumed at step " + ", ".join(map(str, final["resumed_from"]))
    elif row.state in (RunStatus.RUNNING, RunStatus.FAILED):
        row.dev_macro_f1, row.steps, row.elapsed_s = read_progress(run_dir)
    if row.state == RunStatus.FAILED and pack_task is not None:
        row.log = pack_task.log


def grid_status(results_dir: str | Path, use_slurm: bool = True) -> GridStatus:
    results_dir = Path(results_dir)
    plan = _json(results_dir / "plan.json")
    if not isinstance(plan, dict):
        raise FileNotFoundError(f"{results_dir / 'plan.json'} not found or unreadable: is this a launched grid?")
    manifest = _json(results_dir / "manifest.json") or {}
    tasks, others = pack_tasks(results_dir, manifest)
    slurm_ids = {t.task_id.split("_")[0] for t in tasks.values() if t.task_id} | set(others.values())
    states, source = None, "not used (--no-slurm): results tree only"
    if use_slurm and not slurm_ids:
        source = "no Slurm job ids in manifest.json or logs/: results tree only"
    elif use_slurm:
        states = query(sorted(slurm_ids))
        source = "squeue/sacct" if states is not None else "squeue/sacct did not answer: results tree only"
    now = time.time()
    runs, turns = [], {}
    planned = plan.get("runs", [])
    for entry in planned:
        pack = entry.get("pack")
        train = (entry.get("config") or {}).get("train") or {}
        row = RunRow(entry["run_id"], entry.get("name") or entry["run_id"], pack,
                        max_steps=train.get("max_steps") or None)
        pack_task = tasks.get(pack)
        task = states.get(pack_task.task_id) if states and pack_task and pack_task.task_id else None
        _resolve(row, results_dir / "runs" / row.run_id, task, pack_task, turns.setdefault(pack, [True]), now)
        runs.append(row)
    status = GridStatus(str(results_dir), plan.get("grid_name") or results_dir.name, runs, source)
    for kind, job in others.items():
        if states and job in states:
            status.jobs[kind] = f"{job} {states[job].state}" + _reason(states[job])
    extra = _extra_folders(results_dir, {e["run_id"] for e in planned})
    if extra:
        status.notes.append(f"{len(extra)} run folder(s) not in plan.json (an earlier grid): {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
    return status


def _extra_folders(results_dir: Path, planned: set[str]) -> list[str]:
    try:
        return sorted(n for n in os.listdir(results_dir / "runs") if n not in planned)
    except OSError:
        return []


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
    lines.append(f"{'run':<{width}}  {'state':<8}  {'pack':>4}  {'dev F1':>6}  {'steps':>9}  {'elapsed':>7}  details")
    for r in rows:
        f1 = "-" if r.dev_macro_f1 is None else f"{100 * r.dev_macro_f1:.2f}"
        steps = "-" if r.steps is None else (f"{r.steps}/{r.max_steps}" if r.max_steps else str(r.steps))
        details = "; ".join(x for x in (r.reason, f"log: {r.log}" if r.log else None, r.slurm, r.info) if x)
        pack = "-" if r.pack is None else str(r.pack)
        lines.append(f"{r.run_id:<{width}}  {r.state:<8}  {pack:>4}  {f1:>6}  {steps:>9}  "
                     f"{_fmt_elapsed(r.elapsed_s):>7}  {details}")
    lines += [f"note: {n}" for n in status.notes]
    return "\n".join(lines)


def to_json(status: GridStatus) -> str:
    return json.dumps({**asdict(status), "counts": status.counts()}, indent=2)
