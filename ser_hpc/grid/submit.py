"""The grid's job chain, and the three ways to run it.

The chain (``chain``): [data preparation] -> [feature extraction array] -> training array
(a task per pack) -> aggregation. Each job waits for every job of the one before it:
``afterok`` with ``kill_on_invalid_dep`` (a failed preparation cancels what needs it, and
aggregation reports that), and the aggregation ``afterany`` (it ranks whatever finished;
``afterok`` would leave it pending forever when one task fails). An array larger than the
cluster's MaxArraySize is split into several, each throttled with %N; the next job waits
for all of them.

- slurm, submitit (``submit_slurm``): each job's sbatch options are ``cluster.slurm_options``.
- slurm, plain sbatch (``render_sbatch``): the same chain and options rendered as a shell
  script of sbatch calls on the templates in slurm/ (``slurm/submit_grid.sh`` runs it).
- local / debug (``run_here``): the same chain on this machine; local runs packs as
  subprocesses of jobs/train.py (at most array_parallelism at a time), debug in this process.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models.encoders import OFFLINE_HUB_ENV
from .cluster import DEFAULT_MAX_ARRAY_SIZE, ClusterProfile, JobResources, job_env_lines, sbatch_flags, slurm_options
from .tasks import run_aggregation, run_features, run_pack, run_prepare

log = logging.getLogger("ser_hpc.grid")
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ job arrays

def compress(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (sorted, duplicates dropped)."""
    ordered, parts, i = sorted(set(indices)), [], 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def array_spec(indices: list[int], parallelism: int | None = None) -> str:
    """The value of ``sbatch --array``: ``0-319%2``; empty when there is nothing to run."""
    spec = compress(indices)
    return f"{spec}%{parallelism}" if spec and parallelism else spec


@dataclass
class ArrayChunk:
    """One array job of a split: task ``i`` runs item ``offset + i``."""
    offset: int
    items: list[int]          # the packs (or feature groups) it runs, in order

    @property
    def indices(self) -> list[int]:
        return [i - self.offset for i in self.items]

    def spec(self, parallelism: int | None = None) -> str:
        return array_spec(self.indices, parallelism)


def split_by_index(items: list[int], max_size: int) -> list[ArrayChunk]:
    """sbatch, where the task index names the item: the fewest arrays whose indices (item -
    offset) are all < ``max_size``; 2,500 packs and MaxArraySize 1001 -> offsets 0, 1001, 2002.
    On a relaunch the finished packs are gaps in the index list (``0-3,7,9-12%8``)."""
    if max_size < 1:
        raise ValueError(f"MaxArraySize must be >= 1, got {max_size}")
    chunks: list[ArrayChunk] = []
    for item in sorted(set(items)):
        if chunks and item - chunks[-1].offset < max_size:
            chunks[-1].items.append(item)
        else:
            chunks.append(ArrayChunk(item, [item]))
    return chunks


def split_by_count(items: list[int], max_size: int) -> list[ArrayChunk]:
    """submitit, which passes each task its item and numbers tasks 0..n-1 itself:
    ceil(n / max_size) arrays of consecutive items."""
    if max_size < 1:
        raise ValueError(f"MaxArraySize must be >= 1, got {max_size}")
    return [ArrayChunk(start, list(items[start:start + max_size])) for start in range(0, len(items), max_size)]


def dependency(kind: str, job_ids: list[str]) -> str:
    """``afterany:12:13:14``: after every one of the jobs (Slurm's ``:`` list means all)."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        raise ValueError("a dependency needs at least one job id")
    return f"{kind}:" + ":".join(ids)


# ------------------------------------------------------------------ the chain

@dataclass
class Step:
    kind: str                       # prepare | features | train | aggregate
    resources: JobResources
    items: list[int] | None = None  # an array over these feature groups / packs; None: one job


def chain(profile: ClusterProfile, packs: list[int], prepare: bool, features: int) -> list[Step]:
    steps = []
    if packs:  # nothing to train: only aggregate
        if prepare:
            steps.append(Step("prepare", profile.prepare))
        if features:
            steps.append(Step("features", profile.features, list(range(features))))
        steps.append(Step("train", profile.train, list(packs)))
    return steps + [Step("aggregate", profile.aggregate)]


def job_name(grid_name: str, kind: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "-", f"ser-{grid_name}-{kind}")[:64]


def step_options(step: Step, grid_name: str, after: list[str]) -> dict:
    """The sbatch options of one job of the chain, waiting for ``after`` (job ids)."""
    opts = slurm_options(step.resources, job_name(grid_name, step.kind))
    if step.kind == "train":
        opts["requeue"] = True  # a task requeues itself after a time-limit warning
    if after and step.kind == "aggregate":
        opts["dependency"] = dependency("afterany", after)
    elif after:
        opts.update(dependency=dependency("afterok", after), kill_on_invalid_dep="yes")
    return opts


@dataclass
class Submission:
    executor: str
    packs: list[int] = field(default_factory=list)
    job_ids: dict[str, str | None] = field(default_factory=dict)  # kind -> job id (slurm; an array's first)
    train_arrays: list[dict] = field(default_factory=list)     # [{"job_id", "packs"(, "offset")}] per array job
    features_arrays: list[dict] = field(default_factory=list)  # [{"job_id", "groups"}] per array job
    failed_packs: list[int] = field(default_factory=list)      # local / debug only
    handles: dict = field(default_factory=dict)                # submitit job objects (slurm)


TASKS = {"prepare": run_prepare, "features": run_features, "train": run_pack, "aggregate": run_aggregation}


def submit_slurm(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile, grid_name: str,
                 prepare: bool = False, features: int = 0, max_array_size: int = DEFAULT_MAX_ARRAY_SIZE) -> Submission:
    import submitit
    sub, after = Submission("slurm", packs=packs), []
    for step in chain(profile, packs, prepare, features):
        res = step.resources
        executor = submitit.AutoExecutor(folder=out_dir / "logs" / "%j", cluster="slurm")  # array tasks: logs/<A>_<a>/
        executor.update_parameters(timeout_min=res.time_min, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
                                   slurm_setup=job_env_lines(profile), slurm_array_parallelism=profile.array_parallelism,
                                   slurm_additional_parameters=step_options(step, grid_name, after))
        if step.items is None:
            job = executor.submit(TASKS[step.kind], str(out_dir.resolve() if step.kind == "aggregate" else plan_path))
            after, sub.handles[step.kind] = [job.job_id], job
        else:
            after, sub.handles[step.kind] = [], []
            arrays = sub.train_arrays if step.kind == "train" else sub.features_arrays
            for chunk in split_by_count(step.items, max_array_size):
                jobs = executor.map_array(TASKS[step.kind], [str(plan_path)] * len(chunk.items), chunk.items)
                after.append(jobs[0].job_id.split("_")[0])
                sub.handles[step.kind] += jobs
                arrays.append({"job_id": after[-1], "packs" if step.kind == "train" else "groups": chunk.items})
        sub.job_ids[step.kind] = after[0]
    return sub


# A task's log: <array>_<i>.out, or <array>_<i>+<offset>.out for an array after the first of a
# split (jobs/status.py reads the pack from the name).
LOGS = {"prepare": "%j_prepare.out", "features": "%A_%a_features", "train": "%A_%a", "aggregate": "%j_aggregate.out"}
TEMPLATES = {"prepare": "prepare.sbatch", "features": "features.sbatch", "train": "train_array.sbatch",
             "aggregate": "aggregate.sbatch"}
SAYS = {"prepare": "data preparation", "features": "feature extraction", "train": "train array",
        "aggregate": "aggregation"}


def sbatch_commands(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile, grid_name: str,
                    prepare: bool, features: int, max_array_size: int) -> list[tuple[str, list[str], str]]:
    """The chain as sbatch calls: (shell variable for the job id, sbatch arguments, note).
    A dependency names the earlier jobs' variables (``afterany:$train_1:$train_2``)."""
    commands, after = [], []
    for step in chain(profile, packs, prepare, features):
        opts = step_options(step, grid_name, after)
        target = out_dir if step.kind == "aggregate" else plan_path
        chunks = [None] if step.items is None else split_by_index(step.items, max_array_size)
        after = []
        for k, chunk in enumerate(chunks, 1):
            var, log_name, tail, note = f"{step.kind}_{k}", LOGS[step.kind], [], ""
            flags = sbatch_flags(opts)
            if chunk is not None:
                parallel = profile.array_parallelism if step.kind == "train" else None
                flags.insert(0, f"--array={chunk.spec(parallel)}")
                log_name += (f"+{chunk.offset}" if chunk.offset else "") + ".out"
                tail, note = [str(chunk.offset)], f" (task i = pack {chunk.offset} + i)" if chunk.offset else ""
            flags.append(f"--output={out_dir / 'logs' / log_name}")
            commands.append((var, flags + [f"slurm/{TEMPLATES[step.kind]}", str(target)] + tail, note))
            after.append(f"${var}")
    return commands


def shell_words(args: list[str]) -> str:
    """Arguments for a shell line; a dependency names earlier jobs' variables, which must expand."""
    return " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in args)


def render_sbatch(commands: list[tuple[str, list[str], str]], out_dir: Path, profile: ClusterProfile) -> str:
    """The chain as a script for slurm/submit_grid.sh (run from the repository root)."""
    lines = ["#!/bin/bash", f"# The job chain of {out_dir.name}, rendered by jobs/launch_grid.py --emit-sbatch "
             f"from plan.json and the cluster profile {profile.name}.", "set -euo pipefail",
             f"export SER_HPC_JOB_SETUP={shlex.quote(str(out_dir / 'job_setup.sh'))}",
             'submit() { local id; id=$(sbatch --parsable "$@"); echo "${id%%;*}"; }']
    if not any(var.startswith("train_") for var, _, _ in commands):
        lines.append('echo "every run is finished: only aggregating"')
    for var, args, note in commands:
        lines += [f"{var}=$(submit {shell_words(args)})",
                  f'echo "{SAYS[var.rsplit("_", 1)[0]]}: ${var}{note}"']
    return "\n".join(lines + [f"echo {shlex.quote(f'results: {out_dir}')}"]) + "\n"


# ------------------------------------------------------------------ local and debug

def run_here(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile, prepare: bool = False,
             features: int = 0) -> Submission:
    """The chain on this machine: everything in this process (debug) or packs as subprocesses
    of the entry point the sbatch template calls (local). Waits for the end."""
    sub = Submission(profile.executor, packs=packs)
    for step in chain(profile, packs, prepare, features):
        if step.kind == "prepare":
            run_prepare(str(plan_path))
        elif step.kind == "features":
            run_features(str(plan_path))
        elif step.kind == "train" and profile.executor == "debug":
            for pack in packs:
                try:
                    run_pack(str(plan_path), pack)
                except Exception as exc:
                    log.warning("pack %d: %s", pack, exc)
                    sub.failed_packs.append(pack)
        elif step.kind == "train":
            sub.failed_packs = _run_local(plan_path, out_dir, packs, profile)
        else:  # aggregation errors (e.g. no run finished) are reported, not raised
            from ..ensemble.collect import AggregateError
            try:
                run_aggregation(str(out_dir))
            except AggregateError as exc:
                log.error("aggregation: %s", exc)
    return sub


def _run_local(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile) -> list[int]:
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    parallel, failed = max(1, profile.array_parallelism), []
    env = {**os.environ, **OFFLINE_HUB_ENV, **profile.env}
    # Share the cores between concurrent packs instead of oversubscribing them.
    env.setdefault("SER_HPC_THREADS", str(max(1, (os.cpu_count() or 1) // min(parallel, max(1, len(packs))))))
    queue, running, start = list(packs), {}, time.monotonic()
    while queue or running:
        while queue and len(running) < parallel:
            pack = queue.pop(0)
            log_path = out_dir / "logs" / f"local_pack{pack}.log"
            fh = open(log_path, "ab")
            proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), "--plan", str(plan_path),
                                     "--pack", str(pack)], stdout=fh, stderr=subprocess.STDOUT, env=env)
            running[pack] = (proc, fh, log_path)
            log.info("pack %d started (pid %d), log %s", pack, proc.pid, log_path)
        time.sleep(0.5)
        for pack, (proc, fh, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            del running[pack]
            if proc.returncode:
                failed.append(pack)
                log.warning("pack %d exited with %d (see %s)", pack, proc.returncode, log_path)
            log.info("%d/%d packs finished, %.0f s elapsed", len(packs) - len(queue) - len(running), len(packs),
                     time.monotonic() - start)
    return failed
