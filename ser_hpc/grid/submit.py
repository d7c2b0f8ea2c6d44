"""The grid's job chain, and the three ways to run it.

``Chain.steps``: [data preparation] -> [feature extraction array] -> training array (a task
per pack) -> aggregation. Each job waits for every job of the step before it: ``afterok``
with ``kill_on_invalid_dep`` (a failed preparation cancels what needs it), except the
aggregation: ``afterany``, since it ranks whatever finished (``afterok`` would leave it
pending forever once one task fails). An array larger than the cluster's MaxArraySize is
split; the next step waits for all the pieces.

- ``submit_slurm``: submitit, with each job's options from ``cluster.slurm_options``;
- ``sbatch_commands`` + ``render_sbatch``: the same jobs and options as a script of plain
  sbatch calls on the templates in slurm/ (``slurm/submit_grid.sh`` runs it);
- ``run_here``: local (packs as subprocesses of jobs/train.py, array_parallelism at a
  time) or debug (everything in this process).

Every job of a launch runs the code snapshot taken at submission (``snapshot.py``).
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

# The job bodies submitit pickles by reference; each lives beside what it runs.
from ..data.prepare_job import run_prepare
from ..ensemble.aggregate import run_aggregation
from ..features.job import run_features
from ..train.pack_task import run_pack
from . import snapshot
from .cluster import ClusterProfile, JobResources, job_env, job_env_lines, sbatch_flags, slurm_options

log = logging.getLogger("ser_hpc.grid")


# ------------------------------------------------------------------ job arrays

def compress(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (sorted, duplicates dropped)."""
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(set(indices))), lambda iv: iv[1] - iv[0]):
        run = [v for _, v in run]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


@dataclass
class ArrayChunk:
    """One array job of a split: task ``i`` runs item ``offset + i``."""
    offset: int
    items: list[int]          # the packs (or feature groups) it runs, in order

    @property
    def indices(self) -> list[int]:
        return [i - self.offset for i in self.items]

    def spec(self, parallelism: int | None = None) -> str:
        """The value of ``sbatch --array``: ``0-319%2``, ``0-3,7%8`` on a relaunch with gaps."""
        spec = compress(self.indices)
        return f"{spec}%{parallelism}" if parallelism else spec


def split_by_index(items: list[int], max_size: int) -> list[ArrayChunk]:
    """The fewest arrays whose indices (item - offset) all stay < ``max_size``: an sbatch task's
    index names its item; submitit gets the same arrays, so the dry run shows what it submits."""
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


@dataclass
class Chain:
    """What one launch runs: the plan's unfinished packs and the jobs they need first."""
    plan_path: Path                 # absolute
    out_dir: Path                   # absolute
    grid_name: str
    profile: ClusterProfile
    packs: list[int]                # pack indices to (re)submit
    prepare: bool                   # some clips still need decoding
    features: int                   # feature stores to extract first
    max_array_size: int
    code_dir: Path                  # the code the jobs run (a snapshot, or the checkout)

    def steps(self) -> list[Step]:
        profile, steps = self.profile, []
        if self.packs:  # nothing to train: only aggregate
            if self.prepare:
                steps.append(Step("prepare", profile.prepare))
            if self.features:
                steps.append(Step("features", profile.features, list(range(self.features))))
            steps.append(Step("train", profile.train, list(self.packs)))
        return steps + [Step("aggregate", profile.aggregate)]

    def options(self, step: Step, after: list[str]) -> dict:
        """The sbatch options of one job of the chain, waiting for ``after`` (job ids)."""
        name = re.sub(r"[^A-Za-z0-9._+-]", "-", f"ser-{self.grid_name}-{step.kind}")[:64]
        opts = slurm_options(step.resources, name)
        if step.kind == "train":
            opts["requeue"] = True  # a task requeues itself after a time-limit warning
        if after and step.kind == "aggregate":
            opts["dependency"] = dependency("afterany", after)
        elif after:
            opts.update(dependency=dependency("afterok", after), kill_on_invalid_dep="yes")
        return opts

    def target(self, step: Step) -> str:
        """What a job of this step is given: the results folder (aggregation) or the plan."""
        return str(self.out_dir if step.kind == "aggregate" else self.plan_path)


@dataclass
class Submission:
    executor: str
    packs: list[int] = field(default_factory=list)
    job_ids: dict[str, str | None] = field(default_factory=dict)  # kind -> job id (slurm; an array's first)
    train_arrays: list[dict] = field(default_factory=list)     # [{"job_id", "offset", "items"(, "log")}] per array
    features_arrays: list[dict] = field(default_factory=list)  # the same for the features job
    tasks: dict[str, dict] = field(default_factory=dict)       # pack -> {"task_id", "log"}
    failed_packs: list[int] = field(default_factory=list)      # local / debug only
    handles: dict = field(default_factory=dict)                # submitit job objects (slurm)


TASKS = {"prepare": run_prepare, "features": run_features, "train": run_pack, "aggregate": run_aggregation}


def submit_slurm(chain: Chain) -> Submission:
    """Submit the chain; a submission refused half-way cancels the jobs it had submitted."""
    sub = Submission("slurm", packs=chain.packs)
    try:
        return _submit_chain(chain, sub)
    except BaseException:
        for job in (j for h in sub.handles.values() for j in (h if isinstance(h, list) else [h])):
            try:
                job.cancel(check=False)
            except Exception as exc:  # the error that stopped the submission matters more
                log.warning("could not cancel job %s: %s", job.job_id, exc)
        raise


def _submit_chain(chain: Chain, sub: Submission) -> Submission:
    import submitit
    after: list[str] = []
    # Python starts in the launch's code snapshot, so it imports that package (the job then
    # changes to the launch directory, where run configs' relative paths start).
    setup = job_env_lines(chain.profile) + [f"cd {shlex.quote(str(chain.code_dir))}"]
    for step in chain.steps():
        res = step.resources
        executor = submitit.AutoExecutor(folder=chain.out_dir / "logs" / "%j", cluster="slurm")  # tasks: logs/<A>_<a>/
        executor.update_parameters(timeout_min=res.time_min, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
                                   slurm_setup=setup, slurm_array_parallelism=chain.profile.array_parallelism,
                                   slurm_additional_parameters=chain.options(step, after))
        if step.items is None:
            job = executor.submit(TASKS[step.kind], chain.target(step))
            after, sub.handles[step.kind] = [job.job_id], job
        else:
            after, sub.handles[step.kind] = [], []
            for chunk in split_by_index(step.items, chain.max_array_size):
                jobs = executor.map_array(TASKS[step.kind], [chain.target(step)] * len(chunk.items), chunk.items)
                after.append(jobs[0].job_id.split("_")[0])  # a one-task array is a plain job
                sub.handles[step.kind] += jobs
                getattr(sub, f"{step.kind}_arrays").append({"job_id": after[-1], "offset": chunk.offset,
                                                            "items": chunk.items})
                if step.kind == "train":  # submitit's own ids: "12_3", or "12" for a lone task
                    sub.tasks.update({str(p): {"task_id": j.job_id, "log": str(j.paths.stderr)}
                                      for p, j in zip(chunk.items, jobs)})
        sub.job_ids[step.kind] = after[0]
    return sub


# kind -> (template in slurm/, log name, what the rendered script says). A task's log is
# <array>_<i>.out, or <array>_<i>+<offset>.out after the first array of a split.
SBATCH = {"prepare": ("prepare.sbatch", "%j_prepare.out", "data preparation"),
          "features": ("features.sbatch", "%A_%a_features", "feature extraction"),
          "train": ("train_array.sbatch", "%A_%a", "train array"),
          "aggregate": ("aggregate.sbatch", "%j_aggregate.out", "aggregation")}


def sbatch_commands(chain: Chain) -> list[tuple[str, list[str], str]]:
    """The chain as sbatch calls: (shell variable for the job id, sbatch arguments, note).
    A dependency names the earlier jobs' variables (``afterany:$train_1:$train_2``)."""
    commands, after = [], []
    for step in chain.steps():
        template, log_name, _ = SBATCH[step.kind]
        flags = sbatch_flags(chain.options(step, after))
        after = []
        for k, chunk in enumerate([None] if step.items is None else split_by_index(step.items, chain.max_array_size), 1):
            array, log_file, tail, note = [], log_name, [], ""
            if chunk is not None:  # task i runs item offset + i
                parallel = chain.profile.array_parallelism if step.kind == "train" else None
                array, tail = [f"--array={chunk.spec(parallel)}"], [str(chunk.offset)]
                log_file += (f"+{chunk.offset}" if chunk.offset else "") + ".out"
                note = f" (task i = pack {chunk.offset} + i)" if chunk.offset else ""
            var = f"{step.kind}_{k}"
            commands.append((var, [*array, *flags, f"--output={chain.out_dir / 'logs' / log_file}",
                                   str(chain.code_dir / "slurm" / template), chain.target(step), *tail], note))
            after.append(f"${var}")
    return commands


def sbatch_arrays(chain: Chain, kind: str) -> list[dict]:
    """The arrays of one step as submit.sh submits them (job ids filled in by it)."""
    step = next((s for s in chain.steps() if s.kind == kind), None)
    log_name = SBATCH[kind][1]
    return [{"job_id": None, "offset": c.offset, "items": c.items,
             "log": str(chain.out_dir / "logs" / (log_name + (f"+{c.offset}" if c.offset else "") + ".out"))}
            for c in (split_by_index(step.items, chain.max_array_size) if step else [])]


def shell_words(args: list[str]) -> str:
    """Arguments for a shell line; a dependency names earlier jobs' variables, which must expand."""
    return " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in args)


def render_sbatch(chain: Chain, launch_id: str) -> str:
    """The chain as a script for slurm/submit_grid.sh: each sbatch call, then the job id into
    manifest.json (the launch ``launch_id``), as the submitit path records it."""
    out = chain.out_dir
    lines = ["#!/bin/bash", f"# The job chain of {out.name}, rendered by jobs/launch_grid.py --emit-sbatch "
             f"from plan.json and the cluster profile {chain.profile.name}.", "set -euo pipefail",
             f"export SER_HPC_JOB_SETUP={shlex.quote(str(out / 'job_setup.sh'))}",
             "# every job of this launch runs this code (sbatch passes the variable on)",
             f"export {snapshot.ENV}={shlex.quote(str(chain.code_dir))}",
             'submit() { local id; id=$(sbatch --parsable "$@"); echo "${id%%;*}"; }',
             f'record() {{ PYTHONPATH="${snapshot.ENV}" "${{SER_HPC_PYTHON:-python3}}" -m ser_hpc.grid.manifest '
             f'{shlex.quote(str(out))} {launch_id} "$1" "$2"; }}']
    commands = sbatch_commands(chain)
    if not any(var.startswith("train_") for var, _, _ in commands):
        lines.append('echo "every run is finished: only aggregating"')
    for var, args, note in commands:
        lines += [f"{var}=$(submit {shell_words(args)})", f'record {var} "${var}"',
                  f'echo "{SBATCH[var.rsplit("_", 1)[0]][2]}: ${var}{note}"']
    return "\n".join(lines + [f"echo {shlex.quote(f'results: {out}')}"]) + "\n"


# ------------------------------------------------------------------ local and debug

def run_here(chain: Chain) -> Submission:
    """The chain on this machine, waiting for each step: debug runs everything in this process,
    local runs packs as subprocesses of jobs/train.py (the entry point of the sbatch template)."""
    from ..ensemble.collect import AggregateError
    executor = chain.profile.executor
    sub = Submission(executor, packs=chain.packs)
    for step in chain.steps():
        if step.kind == "train" and executor == "local":
            sub.failed_packs = _run_local(chain, sub)
        elif step.kind == "train":
            for pack in chain.packs:
                try:
                    run_pack(str(chain.plan_path), pack)
                except Exception as exc:
                    log.warning("pack %d: %s", pack, exc)
                    sub.failed_packs.append(pack)
        elif step.kind == "aggregate":
            try:  # aggregation errors (e.g. no run finished) are reported, not raised
                run_aggregation(str(chain.out_dir))
            except AggregateError as exc:
                log.error("aggregation: %s", exc)
        else:
            TASKS[step.kind](str(chain.plan_path))
    return sub


def _run_local(chain: Chain, sub: Submission) -> list[int]:
    """Each pack as a subprocess of the snapshot's jobs/train.py, array_parallelism at a time."""
    (chain.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    packs, parallel = chain.packs, max(1, chain.profile.array_parallelism)
    env = {**os.environ, **job_env(chain.profile)}
    # Share the cores between concurrent packs instead of oversubscribing them.
    env.setdefault("SER_HPC_THREADS", str(max(1, (os.cpu_count() or 1) // min(parallel, max(1, len(packs))))))
    logs = {p: chain.out_dir / "logs" / f"local_pack{p}.log" for p in packs}
    sub.tasks.update({str(p): {"task_id": None, "log": str(path)} for p, path in logs.items()})
    train = chain.code_dir / "jobs" / "train.py"

    def run(pack: int) -> int:
        with open(logs[pack], "ab") as fh:
            return subprocess.run([sys.executable, str(train), "--plan", str(chain.plan_path), "--pack", str(pack)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env).returncode

    failed, start = [], time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(run, p): p for p in packs}
        log.info("%d pack(s), %d at a time; logs in %s", len(packs), parallel, chain.out_dir / "logs")
        for n, future in enumerate(as_completed(futures), 1):
            pack, code = futures[future], future.result()
            if code:
                failed.append(pack)
                log.warning("pack %d exited with %d (see %s)", pack, code, logs[pack])
            log.info("%d/%d packs finished, %.0f s elapsed", n, len(packs), time.monotonic() - start)
    return sorted(failed)
