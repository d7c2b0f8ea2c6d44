"""Slurm's view of a grid's jobs: one squeue and one sacct call for all job ids.

squeue knows live jobs (pending, running, requeued), sacct finished ones and the history
of requeues (``-D``: one record per attempt). Either may be missing (no Slurm on this
machine, no slurmdbd, a login node that cannot reach the controller): then this returns
what it could get, or None, and the caller falls back to the results tree alone.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from datetime import datetime

ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                    "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"})
TIMEOUT_S = 10


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
