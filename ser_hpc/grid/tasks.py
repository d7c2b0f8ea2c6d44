"""What each job of the chain runs, on a compute node or locally, and whether a plan needs
its preparation and features jobs.

The same functions back submitit jobs, the sbatch templates (via jobs/train.py --pack)
and the local / debug executors.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import config_from_dict
from ..logs import setup_logging
from ..run_status import RunStatus
from ..train.preemption import Preempted, PreemptionFlag
from ..train.loop import train_pack
from .plan import read_plan, run_folder

log = logging.getLogger("ser_hpc.grid")


def _job_start(plan_path: str) -> dict:
    """Every job's first lines: logging, threads, the plan, its launch directory (run configs
    hold paths relative to it). The offline-hub variables come with the job's environment
    (``cluster.job_env``): the hub library reads them when it is imported, before this runs."""
    setup_logging()
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SER_HPC_THREADS")
    if cpus:
        torch.set_num_threads(int(cpus))
    plan = read_plan(plan_path)
    os.chdir(plan["launch_dir"])
    return plan


def run_pack(plan_path: str, pack_index: int, wait: bool | float = False) -> dict[str, str]:
    """Train every run of one pack in this process, on one shared backbone forward.

    Returns run_id -> status. A run that diverges fails alone. Raises at the end if any
    run failed, so the scheduler records the task as failed too (the aggregation job
    depends on the array with ``afterany`` and still runs).
    """
    plan = _job_start(plan_path)
    if not 0 <= pack_index < len(plan["packs"]):
        raise IndexError(f"pack {pack_index} out of range: the plan has {len(plan['packs'])} packs")
    by_id = {r["run_id"]: r for r in plan["runs"]}
    runs = [by_id[run_id] for run_id in plan["packs"][pack_index]]
    cfgs = [config_from_dict(run["config"], f"plan run {run['run_id']}") for run in runs]
    log.info("pack %d: %d run(s): %s", pack_index, len(runs), ", ".join(r["run_id"] for r in runs))
    # Our handler replaces submitit's: it only sets a flag; the loop checkpoints at the next step.
    with PreemptionFlag() as flag:
        try:
            finals = train_pack(cfgs, flag, wait=wait)
        except Preempted as exc:
            handle_preemption(exc, cfgs[0], plan, runs)  # requeues (and waits to be stopped) or fails the runs
            raise RuntimeError(f"pack {pack_index}: stopped at step {exc.step}") from None
        except Exception as exc:  # recorded in every unfinished run's final.json by train_pack
            log.error("pack %d failed: %s", pack_index, exc)
            raise
    statuses = {run["run_id"]: final["status"] for run, final in zip(runs, finals)}
    failed = [r for r, s in statuses.items() if s != RunStatus.DONE]
    if failed:
        raise RuntimeError(f"pack {pack_index}: {len(failed)} of {len(statuses)} run(s) failed: {', '.join(failed)}")
    return statuses


def prepared_data_configs(plan: dict) -> list:
    """The distinct data configs of a plan that read prepared audio."""
    seen, out = set(), []
    for run in plan["runs"]:
        if not run["config"]["data"].get("prepared_dir"):
            continue
        # every clip of the corpus is prepared, whatever the test fold
        key = json.dumps({**run["config"]["data"], "fold": 0}, sort_keys=True, default=str)
        if key not in seen:  # a Config only for each distinct data section
            seen.add(key)
            out.append(config_from_dict(run["config"]).data)
    return out


def feature_groups(plan: dict) -> list[list[dict]]:
    """The plan's cached-feature runs grouped by the feature store they read: same corpus,
    backbones, modalities and augmentation views (head, seed and schedule do not matter).
    The features job extracts one store per group, holding the layers of all its heads."""
    from ..train.packing import HEAD_KEYS, group_runs
    ignore = HEAD_KEYS | {"train.seed", "train.lr", "train.max_steps", "train.epochs", "train.eval_every",
                          "train.batch_size", "data.crop_seconds", "data.augment_prob", "data.split_seed",
                          "data.dev_fraction", "train.log_every", "train.checkpoint_every",
                          "data.fold"}  # a store holds every clip of the corpus, whatever the test fold
    cached = [run for run in plan["runs"] if run["config"]["train"]["features"] == "cached"]
    # A one-modality run joins the fused group of its encoder: it reads the fused store
    # (find_store), so the features job extracts that encoder once.
    return [[cached[i] for i in g] for g in group_runs([run["config"] for run in cached], ignore)]


@dataclass
class StorePlan:
    """One feature store a grid reads: whether it is complete, what it will take, its shards."""
    group: int
    complete: bool
    projection: "Projection"
    shards: int
    corpus: str | None = None


def _group_configs(group: list[dict]) -> list:
    """The store depends on the group's shared settings and the layers each head reads:
    one Config per distinct layer choice, not one per run."""
    distinct = {json.dumps([run["config"]["model"]["speech"]["layers"], run["config"]["model"]["text"]["layers"]]): run
                for run in group}
    return [config_from_dict(group[0]["config"])] + [config_from_dict(run["config"]) for run in distinct.values()]


def store_plans(plan: dict, problems: list[str] | None = None) -> list[StorePlan]:
    """Every feature store of the plan's cached runs, with its projected size (configs, no
    weights). A store that cannot be projected (its encoder's config unreadable) goes to
    ``problems`` (raised without it)."""
    from ..features.extract import find_store, project, read_all_clips, shard_plan, store_spec
    from ..features.store import FeatureStoreError
    from ..models.encoders import BackboneError
    out = []
    for k, group in enumerate(feature_groups(plan)):
        cfgs = _group_configs(group)
        try:
            corpus = read_all_clips(cfgs[0])
            complete = find_store(cfgs[0], store_spec(cfgs, corpus)) is not None
            out.append(StorePlan(k, complete, project(cfgs, corpus),
                                 len(shard_plan(corpus, cfgs[0].data.features_shard_hours)), group[0].get("corpus")))
        except (BackboneError, FeatureStoreError, OSError) as exc:
            if problems is None:
                raise
            if str(exc) not in problems:
                problems.append(str(exc))
    return out


def feature_tasks(stores: list[StorePlan]) -> list[list[int]]:
    """The features array: one task per shard of every store not yet complete, as [group, shard]."""
    return [[s.group, k] for s in stores if not s.complete for k in range(s.shards)]


def needs_preparation(plan: dict) -> bool:
    """True when a data config reads prepared audio that is not all there yet."""
    from ..data.prepared import PreparedAudio
    from ..data.prepared_format import PreparedAudioError
    from ..data.sources import load_splits
    for data in prepared_data_configs(plan):
        splits = load_splits(data)
        try:
            PreparedAudio(data.prepared_dir, data.sample_rate).check(splits.train + splits.dev + splits.test)
        except PreparedAudioError:
            return True
    return False


def run_features(plan_path: str, task: int | None = None) -> list[str]:
    """The features job (before the training array): each frozen backbone pair runs once over
    the corpus into data.features_dir. ``task``: one array task (one shard of one store, from
    plan.json's feature_tasks), None: every store in turn."""
    from ..features.extract import extract
    plan = _job_start(plan_path)
    groups = feature_groups(plan)
    tasks = plan.get("feature_tasks") or [[g, None] for g in range(len(groups))]
    folders = []
    for group, shard in tasks if task is None else [tasks[task]]:
        cfgs = [config_from_dict(run["config"], f"plan run {run['run_id']}") for run in groups[group]]
        store = extract(cfgs, shard=shard)
        where = "complete" if store is not None else "shard written; other shards pending"
        log.info("feature group %d%s (%d run(s)): %s", group, "" if shard is None else f" shard {shard}", len(cfgs),
                 where if store is None else store.folder)
        folders.append(str(store.folder) if store is not None else where)
    return folders


def run_prepare(plan_path: str) -> list[dict]:
    """The grid's first job: decode every clip once into data.prepared_dir (idempotent)."""
    from ..data.prepare import prepare_for_data_config
    plan = _job_start(plan_path)
    workers = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
    summaries = []
    for data in prepared_data_configs(plan):
        summary = prepare_for_data_config(data, workers=min(workers, 8))
        log.info("prepared audio for %s in %s: %s", data.train_csv or data.manifest or data.root, data.prepared_dir,
                 summary.as_dict())
        summaries.append(summary.as_dict())
    return summaries


def slurm_job_id() -> str | None:
    """This task's id as scontrol knows it (``A_a`` for an array task)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def handle_preemption(exc: Preempted, cfg, plan: dict, runs: list[dict]) -> None:
    """After a checkpoint on a signal: requeue this task on Slurm, within the requeue budget.

    A requeued task starts the same pack again; finished runs are skipped and the others
    resume from their checkpoints. A pack that keeps being stopped ends with its unfinished
    runs failed (the rest of the grid goes on).
    """
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    job = slurm_job_id()
    if exc.wants_requeue and job and restarts < cfg.train.max_requeues:
        log.warning("pack of %d run(s): %s; requeueing Slurm job %s (restart %d of at most %d)", len(runs), exc, job,
                    restarts + 1, cfg.train.max_requeues)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        time.sleep(600)  # Slurm stops this instance now; never fall through to other work
        raise SystemExit(1)
    if exc.wants_requeue and job:
        reason = (f"time limit reached {restarts + 1} time(s); requeue budget "
                  f"(train.max_requeues={cfg.train.max_requeues}) used up")
    else:
        reason = f"interrupted: {exc}; relaunch to resume from the checkpoint"
    for run in runs:
        folder = run_folder(plan, run)
        if exc.unfinished is not None and folder.path.name not in exc.unfinished:
            continue  # finished, or diverged in this attempt: its record stands
        if exc.unfinished is None and folder.is_done():
            continue
        folder.write_failure(run["name"], reason, checkpoint_step=exc.step)
        log.error("run %s: %s", run["run_id"], reason)


def run_aggregation(results_dir: str) -> dict:
    """The dependent job: leaderboard and ensemble of whatever finished."""
    setup_logging()
    from ..ensemble.aggregate import aggregate  # matplotlib only where it is needed
    return aggregate(Path(results_dir).resolve())
