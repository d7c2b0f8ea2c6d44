"""Submitting a planned grid: one training array and one dependent aggregation job.

slurm: submitit, ONE job array over the packs to (re)train (throttled with %N), then the
       aggregation job with ``afterany`` on the array (it runs even when some tasks fail;
       ``afterok`` would leave it pending forever). More packs than the cluster's
       MaxArraySize are split into several arrays (``ser_hpc.grid.arrays``), each throttled
       with %N; the aggregation job depends on all of them, and so does training on every
       array of the features job.
local: the same entry point (jobs/train.py --plan --pack) as subprocesses, at most
       ``array_parallelism`` at a time, then aggregation; waits for them.
debug: everything in this process, one pack after the other (for pdb and tracebacks).
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models.encoders import OFFLINE_HUB_ENV
from .arrays import DEFAULT_MAX_ARRAY_SIZE, dependency, split_by_count
from .cluster import ClusterProfile, submitit_parameters
from .tasks import run_aggregation, run_features, run_pack, run_prepare

log = logging.getLogger("ser_hpc.grid")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Submission:
    executor: str
    prepare_job: str | None = None      # the data-preparation job (slurm), when one was needed
    features_job: str | None = None     # the feature-extraction array (slurm), when one was needed
    train_job: str | None = None        # the array's job id (slurm); the first one when split
    aggregate_job: str | None = None
    packs: list[int] = field(default_factory=list)
    train_arrays: list[dict] = field(default_factory=list)     # slurm: [{"job_id", "packs"}] per array job
    features_arrays: list[dict] = field(default_factory=list)  # slurm: [{"job_id", "groups"}] per array job
    failed_packs: list[int] = field(default_factory=list)  # local / debug only
    handles: dict = field(default_factory=dict)             # submitit job objects (slurm)


def job_name(grid_name: str, kind: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "-", f"ser-{grid_name}-{kind}")[:64]


def _array_id(jobs) -> str:
    return jobs[0].job_id.split("_")[0]


def submit_slurm(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile, grid_name: str,
                 prepare: bool = False, features: int = 0, max_array_size: int = DEFAULT_MAX_ARRAY_SIZE) -> Submission:
    import submitit

    sub = Submission("slurm", packs=packs)
    logs = out_dir / "logs"
    train_ids: list[str] = []
    train_deps: dict = {}
    if prepare and packs:
        executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")
        executor.update_parameters(**submitit_parameters(profile.prepare, profile, job_name(grid_name, "prepare")))
        job = executor.submit(run_prepare, str(plan_path))
        sub.prepare_job, sub.handles["prepare"] = job.job_id, job
        # If preparation fails the array can never run: cancel it, so aggregation (afterany) reports that.
        train_deps = {"dependency": f"afterok:{job.job_id}", "kill_on_invalid_dep": "yes"}
    if features and packs:
        # One task per feature store (backbone pair x corpus); the training array waits for all.
        executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")
        params = submitit_parameters(profile.features, profile, job_name(grid_name, "features"))
        params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"], **train_deps}
        executor.update_parameters(**params, slurm_array_parallelism=profile.array_parallelism)
        feature_ids, handles = [], []
        for chunk in split_by_count(list(range(features)), max_array_size):
            jobs = executor.map_array(run_features, [str(plan_path)] * len(chunk.items), chunk.items)
            feature_ids.append(_array_id(jobs))
            handles += jobs
            sub.features_arrays.append({"job_id": feature_ids[-1], "groups": chunk.items})
        sub.features_job, sub.handles["features"] = feature_ids[0], handles
        train_deps = {"dependency": dependency("afterok", feature_ids), "kill_on_invalid_dep": "yes"}
    if packs:
        executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")  # array tasks: logs/<A>_<a>/
        params = submitit_parameters(profile.train, profile, job_name(grid_name, "train"))
        # A task requeues itself after a time-limit warning; keep its log across restarts.
        params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"],
                                                 "requeue": True, "open_mode": "append", **train_deps}
        executor.update_parameters(**params, slurm_array_parallelism=profile.array_parallelism)
        handles = []
        for chunk in split_by_count(packs, max_array_size):  # submitit numbers each array's tasks 0..n-1
            jobs = executor.map_array(run_pack, [str(plan_path)] * len(chunk.items), chunk.items)
            train_ids.append(_array_id(jobs))
            handles += jobs
            sub.train_arrays.append({"job_id": train_ids[-1], "packs": chunk.items})
        sub.train_job, sub.handles["train"] = train_ids[0], handles
    executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")
    params = submitit_parameters(profile.aggregate, profile, job_name(grid_name, "aggregate"))
    after = train_ids or [a["job_id"] for a in sub.features_arrays] or ([sub.prepare_job] if sub.prepare_job else [])
    if after:
        params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"],
                                                 "dependency": dependency("afterany", after)}
    executor.update_parameters(**params)
    job = executor.submit(run_aggregation, str(out_dir.resolve()))
    sub.aggregate_job, sub.handles["aggregate"] = job.job_id, job
    return sub


def run_local(plan_path: Path, out_dir: Path, packs: list[int], profile: ClusterProfile) -> Submission:
    """Packs as subprocesses of the same entry point the sbatch template calls."""
    sub = Submission("local", packs=packs)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    parallel = max(1, profile.array_parallelism)
    env = {**os.environ, **OFFLINE_HUB_ENV, **profile.env}
    # Share the cores between concurrent packs instead of oversubscribing them.
    env.setdefault("SER_HPC_THREADS", str(max(1, (os.cpu_count() or 1) // min(parallel, max(1, len(packs))))))
    queue, running = list(packs), {}
    start = time.monotonic()
    while queue or running:
        while queue and len(running) < parallel:
            pack = queue.pop(0)
            log_path = logs / f"local_pack{pack}.log"
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
            done = len(packs) - len(queue) - len(running)
            if proc.returncode:
                sub.failed_packs.append(pack)
                log.warning("pack %d exited with %d (see %s)", pack, proc.returncode, log_path)
            log.info("%d/%d packs finished, %.0f s elapsed", done, len(packs), time.monotonic() - start)
    _aggregate_reporting(out_dir)
    return sub


def _aggregate_reporting(out_dir: Path) -> None:
    """Local / debug: aggregation errors (e.g. no run finished) are reported, not raised."""
    from ..ensemble.collect import AggregateError
    try:
        run_aggregation(str(out_dir))
    except AggregateError as exc:
        log.error("aggregation: %s", exc)


def run_debug(plan_path: Path, out_dir: Path, packs: list[int]) -> Submission:
    sub = Submission("debug", packs=packs)
    for pack in packs:
        try:
            run_pack(str(plan_path), pack)
        except Exception as exc:
            log.warning("pack %d: %s", pack, exc)
            sub.failed_packs.append(pack)
    _aggregate_reporting(out_dir)
    return sub
