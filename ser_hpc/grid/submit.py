"""The grid's job chain, and the three ways to run it.

``chain``: [data preparation] -> [feature extraction array] -> training array (a task per
pack) -> aggregation. Each job waits for every job of the step before it: ``afterok`` with
``kill_on_invalid_dep`` (a failed preparation cancels what needs it), except the aggregation:
``afterany``, since it ranks whatever finished (``afterok`` would leave it pending forever
once one task fails). An array larger than the cluster's MaxArraySize is split; the next
step waits for all the pieces.

- ``submit_slurm``: submitit, with each job's options from ``cluster.slurm_options``;
- ``sbatch_commands`` + ``render_sbatch``: the same jobs and options as a script of plain
  sbatch calls on the templates in slurm/ (``slurm/submit_grid.sh`` runs it);
- ``run_here``: local (packs as subprocesses of jobs/train.py, array_parallelism at a
  time) or debug (everything in this process).
"""
from __future__ import annotations

import itertools
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
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(set(indices))), lambda iv: iv[1] - iv[0]):
        run = [v for _, v in run]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
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
    """The fewest arrays whose indices (item - offset) all stay < ``max_size``: an sbatch task's
    index names its item; submitit gets the same arrays, so the dry run shows what it submits.
    A relaunch leaves gaps for finished packs (``0-3,7%8``)."""
    chunks: list[ArrayChunk] = []
    for item in sorted(set(items)):
        if chunks and item - chunks[-1].offset < max_size:
            chunks[-1].items.append(item)
        else:
            chunks.append(ArrayChunk(item, [item]))
    return chunks


def dependency(kind: str, job_ids: list[str]) -> str:
    """``afterany:12:13:14``: after every one of the jobs."""
    return f"{kind}:" + ":".join(str(j) for j in job_ids)


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


def step_options(step: Step, grid_name: str, after: list[str]) -> dict:
    """The sbatch options of one job of the chain, waiting for ``after`` (job ids)."""
    opts = slurm_options(step.resources, re.sub(r"[^A-Za-z0-9._+-]", "-", f"ser-{grid_name}-{step.kind}")[:64])
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
            for chunk in split_by_index(step.items, max_array_size):
                jobs = executor.map_array(TASKS[step.kind], [str(plan_path)] * len(chunk.items), chunk.items)
                after.append(jobs[0].job_id.split("_")[0])
                sub.handles[step.kind] += jobs
                if step.kind == "train":
                    sub.train_arrays.append({"job_id": after[-1], "packs": chunk.items})
                else:
                    sub.features_arrays.append({"job_id": after[-1], "groups": chunk.items})
        sub.job_ids[step.kind] = after[0]
    return sub


# kind -> (template in slurm/, log name, what the rendered script says). A task's log is
# <array>_<i>.out, or <array>_<i>+<offset>.out after the first array of a split (status reads it).
SBATCH = {"prepare": ("prepare.sbatch", "%j_prepare.out", "data preparation"),
          "features": ("features.sbatch", "%A_%a_features", "feature extraction"),
          "train": ("train_array.sbatch", "%A_%a", "train array"),
          "aggregate": ("aggregate.sbatch", "%j_aggregate.out", "aggregation")}


def sbatch_commands(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile, grid_name: str,
                    prepare: bool, features: int, max_array_size: int) -> list[tuple[str, list[str], str]]:
    """The chain as sbatch calls: (shell variable for the job id, sbatch arguments, note).
    A dependency names the earlier jobs' variables (``afterany:$train_1:$train_2``)."""
    commands, after = [], []
    for step in chain(profile, packs, prepare, features):
        template, log_name, _ = SBATCH[step.kind]
        flags = sbatch_flags(step_options(step, grid_name, after))
        target = str(out_dir if step.kind == "aggregate" else plan_path)
        after = []
        for k, chunk in enumerate([None] if step.items is None else split_by_index(step.items, max_array_size), 1):
            array, log_file, tail, note = [], log_name, [], ""
            if chunk is not None:  # task i runs item offset + i
                parallel = profile.array_parallelism if step.kind == "train" else None
                array, tail = [f"--array={chunk.spec(parallel)}"], [str(chunk.offset)]
                log_file += (f"+{chunk.offset}" if chunk.offset else "") + ".out"
                note = f" (task i = pack {chunk.offset} + i)" if chunk.offset else ""
            var = f"{step.kind}_{k}"
            commands.append((var, [*array, *flags, f"--output={out_dir / 'logs' / log_file}", f"slurm/{template}",
                                   target, *tail], note))
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
        lines += [f"{var}=$(submit {shell_words(args)})", f'echo "{SBATCH[var.rsplit("_", 1)[0]][2]}: ${var}{note}"']
    return "\n".join(lines + [f"echo {shlex.quote(f'results: {out_dir}')}"]) + "\n"


# ------------------------------------------------------------------ local and debug

def run_here(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile, prepare: bool = False,
             features: int = 0) -> Submission:
    """The chain on this machine, waiting for each step: debug runs everything in this process,
    local runs packs as subprocesses of jobs/train.py (the entry point of the sbatch template)."""
    from ..ensemble.collect import AggregateError
    sub = Submission(profile.executor, packs=packs)
    for step in chain(profile, packs, prepare, features):
        if step.kind == "train" and profile.executor == "local":
            sub.failed_packs = _run_local(plan_path, out_dir, packs, profile)
        elif step.kind == "train":
            for pack in packs:
                try:
                    run_pack(str(plan_path), pack)
                except Exception as exc:
                    log.warning("pack %d: %s", pack, exc)
                    sub.failed_packs.append(pack)
        elif step.kind == "aggregate":
            try:  # aggregation errors (e.g. no run finished) are reported, not raised
                run_aggregation(str(out_dir))
            except AggregateError as exc:
                log.error("aggregation: %s", exc)
        else:
            TASKS[step.kind](str(plan_path))
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
            with open(log_path, "ab") as fh:  # the child keeps its own descriptor
                proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), "--plan", str(plan_path),
                                         "--pack", str(pack)], stdout=fh, stderr=subprocess.STDOUT, env=env)
            running[pack] = (proc, log_path)
            log.info("pack %d started (pid %d), log %s", pack, proc.pid, log_path)
        time.sleep(0.5)
        for pack, (proc, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[pack]
            if proc.returncode:
                failed.append(pack)
                log.warning("pack %d exited with %d (see %s)", pack, proc.returncode, log_path)
            log.info("%d/%d packs finished, %.0f s elapsed", len(packs) - len(queue) - len(running), len(packs),
                     time.monotonic() - start)
    return failed
