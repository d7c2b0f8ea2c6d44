"""A training array task: one pack of a launched grid's plan, trained in this process, and
what happens when Slurm warns of its time limit (a requeue within the budget, else the
unfinished runs fail with the reason). Backs submitit jobs, slurm/train_array.sbatch (via
jobs/train.py --plan --pack) and the local / debug executors."""
from __future__ import annotations

import logging
import time

from .. import slurm
from ..config import config_from_dict
from ..plan_file import job_start, run_folder
from ..run_status import RunStatus
from .loop import train_pack
from .preemption import Preempted, PreemptionFlag

log = logging.getLogger("ser_hpc.train")


def run_pack(plan_path: str, pack_index: int, wait: bool | float = False) -> dict[str, str]:
    """Train every run of one pack in this process, on one shared backbone forward.

    Returns run_id -> status. A run that diverges fails alone. Raises at the end if any
    run failed, so the scheduler records the task as failed too (the aggregation job
    depends on the array with ``afterany`` and still runs).
    """
    plan = job_start(plan_path)
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


def handle_preemption(exc: Preempted, cfg, plan: dict, runs: list[dict]) -> None:
    """After a checkpoint on a signal: requeue this task on Slurm, within the requeue budget.

    A requeued task starts the same pack again; finished runs are skipped and the others
    resume from their checkpoints. A pack that keeps being stopped ends with its unfinished
    runs failed (the rest of the grid goes on).
    """
    restarts, job = slurm.restart_count(), slurm.job_id()
    if exc.wants_requeue and job and restarts < cfg.train.max_requeues:
        log.warning("pack of %d run(s): %s; requeueing Slurm job %s (restart %d of at most %d)", len(runs), exc, job,
                    restarts + 1, cfg.train.max_requeues)
        slurm.requeue(job)
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
