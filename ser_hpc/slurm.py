"""What Slurm says, in one place: a job's own environment (its id, restarts, CPUs), and on
a login node the answers of scontrol, squeue and sacct, parsed. Every call has a timeout:
a node that cannot reach the controller must not hang, and a missing or silent command is
"no answer" (None), never an error."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime

TIMEOUT_S = 10
# Slurm's states of a job that has not ended, and of one that is running.
ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                    "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"})
RUNNING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING"})
MAX_ARRAY_RE = re.compile(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", re.MULTILINE)


# ------------------------------------------------------------------ inside a job

def job_id() -> str | None:
    """This process's Slurm task: ``<array>_<index>`` for an array task, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times this job was requeued (0 on its first start, and outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def cpus_per_task() -> int | None:
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus else None


def first_host() -> str:
    """The first node of this job step (a DDP rendezvous host)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0] if out else "localhost"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def requeue(job: str) -> None:
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)


# ------------------------------------------------------------------ from a login node

def max_array_size() -> int | None:
    """MaxArraySize from ``scontrol show config``; None when scontrol is missing, fails or does not say."""
    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = MAX_ARRAY_RE.search(res.stdout) if res.returncode == 0 else None
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


@dataclass
class TaskState:
    job_id: str               # "<array>_<task>" or a plain job id
    state: str                # Slurm's state, first word (CANCELLED by 0 -> CANCELLED)
    reason: str = ""
    requeues: int = 0         # earlier attempts of this task (sacct -D records before the last)
    start: float | None = None  # epoch seconds, when started

    def __str__(self) -> str:  # "12_4 PENDING (Priority)"
        return f"{self.job_id} {self.state}" + (f" ({self.reason})" if self.reason not in ("", "None") else "")


def _epoch(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:  # "Unknown", "N/A", "None"
        return None


def _run(cmd: list[str], n: int) -> list[list[str]] | None:
    """The first n '|'-separated fields of each line the command prints; None when it does not answer."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        # squeue exits 1 when every id is gone from the controller: that is an answer.
        return [] if "Invalid job id" in res.stderr else None
    lines = [line.split("|") for line in res.stdout.splitlines()]
    return [[f.strip() for f in fields[:n]] for fields in lines if len(fields) >= n]


def expand_ids(job_id: str) -> list[str]:
    """``12_[0-3%2]`` / ``12_[1,4-5]`` -> 12_0, 12_1, ...; anything else -> [job_id]."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    bounds = [part.partition("-")[::2] for part in m[2].split(",")]
    return [f"{m[1]}_{i}" for lo, hi in bounds for i in range(int(lo), int(hi or lo) + 1)]


def query(job_ids: list[str]) -> dict[str, TaskState] | None:
    """Task id -> state for the given (array) job ids; None when neither command answers."""
    joined = ",".join(sorted({str(j) for j in job_ids if j}))
    if not joined:
        return None
    acct = _run(["sacct", "-n", "-P", "-X", "-D", "-j", joined, "-o", "JobID,State,Start,Reason"], 4)
    # -O with RestartCnt: a requeue is visible at once, before sacct's records catch up.
    live = _run(["squeue", "-h", "-r", "-j", joined, "-O", "JobArrayID:|,State:|,Reason:|,StartTime:|,RestartCnt:|"], 5)
    if acct is None and live is None:
        return None
    states: dict[str, TaskState] = {}
    not_started: dict[str, TaskState] = {}
    for jid, state, start, reason in acct or []:
        word = (state.split() or [""])[0]
        if "[" in jid:  # a range of array tasks not yet started: the weakest evidence, used last
            not_started.update({tid: TaskState(tid, word, reason) for tid in expand_ids(jid)})
        else:  # -D: one record per attempt, oldest first
            prev = states.get(jid)
            states[jid] = TaskState(jid, word, reason, prev.requeues + 1 if prev else 0, _epoch(start))
    states = not_started | states  # a task's own record beats its range's
    for jid, state, reason, start, restarts in live or []:  # squeue has the freshest word
        prev = states.get(jid)
        requeues = max(prev.requeues if prev else 0, int(restarts) if restarts.isdigit() else 0)
        # squeue's start time of a pending job is only an estimate: keep real starts only.
        started = None if state == "PENDING" else (_epoch(start) or (prev.start if prev else None))
        states[jid] = TaskState(jid, state, reason, requeues, started)
    return states
