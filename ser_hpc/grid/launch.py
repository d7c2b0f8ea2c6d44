"""The launcher's logic: expand, check, plan, skip finished work, submit, record."""
from __future__ import annotations

import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .. import atomic_io
from ..config import parse_override
from ..locks import launch_lock
from ..run_status import RunStatus
from ..train.packing import needs_own_forward
from .checks import check_backbones, check_data
from .cluster import DEFAULT_MAX_ARRAY_SIZE, ClusterProfile, job_env_lines, load_profile, max_array_size
from .plan import GridSpec, PlannedRun, build_plan, expand, load_grid, make_packs, read_plan, run_states, write_plan
from .submit import (Submission, compress, render_sbatch, run_here, sbatch_commands, shell_words, split_by_index,
                     submit_slurm)
from .tasks import feature_groups, needs_features, needs_preparation

log = logging.getLogger("ser_hpc.grid")
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "torchaudio", "transformers", "submitit", "deepspeed", "scikit-learn", "numpy", "soundfile")


@dataclass
class LaunchPlan:
    spec: GridSpec
    profile: ClusterProfile
    runs: list[PlannedRun]
    packs: list[list[PlannedRun]]
    states: dict[str, RunStatus]  # run_id -> done / failed / missing, before this launch
    to_run: list[int]            # pack indices to (re)submit
    prepare: bool = False        # some clips still need decoding into data.prepared_dir
    features: int = 0            # feature-store groups to extract before training (train.features=cached)
    problems: list[str] = field(default_factory=list)  # every failed check; nothing is submitted while any
    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE   # Slurm's MaxArraySize: larger arrays are split
    max_array_source: str = "Slurm's default"      # where that number came from

    @property
    def skipped(self) -> list[PlannedRun]:
        return [r for r in self.runs if self.states.get(r.run_id) == RunStatus.DONE]

    def sbatch_commands(self, plan_path: Path | None = None) -> list[tuple[str, list[str], str]]:
        """The job chain as sbatch calls (``submit.sbatch_commands``)."""
        out = self.spec.out_dir.resolve()
        return sbatch_commands(plan_path or out / "plan.json", out, self.to_run, self.profile, self.spec.name,
                               self.prepare, self.features, self.max_array_size)


def plan_launch(grid_path: str, overrides: list[str], cluster: str | None = None, profile_path: str | None = None,
            quick_check: bool = False) -> LaunchPlan:
    """Expand and check everything; nothing is written or submitted here."""
    cli = dict(parse_override(o) for o in overrides)
    spec = load_grid(grid_path, cli)
    runs = expand(spec)
    packs = make_packs(runs, spec.pack_size)
    profile_file = Path(profile_path or spec.cluster or "configs/cluster/local.yaml")
    if not profile_path and not profile_file.is_absolute() and not profile_file.exists():
        # the grid's cluster: relative to the working directory, else to the grid file, else to the repository
        profile_file = next((c for c in (Path(grid_path).parent / profile_file, REPO / profile_file) if c.exists()),
                            profile_file)
    profile = load_profile(profile_file)
    if cluster:
        profile.executor = cluster
    limit, limit_source = (max_array_size(profile) if profile.executor == "slurm"
                           else (profile.max_array_size or DEFAULT_MAX_ARRAY_SIZE, "not used (no Slurm)"))
    # The plan exists from here on: every check below reports its problem and goes on, so a
    # dry run shows the whole plan and then everything that needs fixing, not the first error.
    problems: list[str] = []
    n_data = check_data(runs, quick=quick_check, problems=problems)
    n_models = check_backbones(runs, grid_path, problems)
    log.info("checked %d data config(s) and %d backbone(s)", n_data, n_models)
    plan = build_plan(spec, runs, packs)
    states = run_states(plan)
    to_run = [i for i, pack in enumerate(packs) if any(states[r.run_id] != RunStatus.DONE for r in pack)]
    lp = LaunchPlan(spec, profile, runs, packs, states, to_run, problems=problems, max_array_size=limit,
                    max_array_source=limit_source)
    if to_run and not problems:  # both read the corpus, which the checks above found usable
        lp.prepare = needs_preparation(plan)
        groups = feature_groups(plan)
        lp.features = len(groups) if needs_features(plan, groups) else 0
    return lp


def where(path: str | Path) -> str:
    """A results path as the absolute folder it resolves to, with a warning when a relative
    path climbs out of the current directory with '..'."""
    path = Path(path)
    resolved = path.resolve()
    text = str(resolved)
    if not path.is_absolute() and ".." in path.parts:
        try:
            resolved.relative_to(Path.cwd().resolve())
        except ValueError:
            text += f"  (WARNING: {path} climbs out of the current directory {Path.cwd()})"
    return text


LIST_ALL_UP_TO = 50   # a dry run lists every run of a grid this small; larger: the first and last few
LIST_ENDS = 10


def describe(lp: LaunchPlan, verbose: bool = False) -> str:
    """The --dry-run report: runs (per backbone pair; every run with ``verbose`` or for a
    small grid, else the first and last few), packs, resources and the sbatch parameters."""
    lines = [f"grid {lp.spec.name}: {len(lp.runs)} runs in {len(lp.packs)} packs -> {where(lp.spec.out_dir)}",
             f"executor {lp.profile.executor}, profile {lp.profile.name}"]
    to_run = set(lp.to_run)
    per_pair: dict[str, list] = {}
    for r in lp.runs:
        entry = per_pair.setdefault(r.pair, [0, set(), 0])
        entry[0] += 1
        entry[1].add(r.pack)
        entry[2] += lp.states[r.run_id] == RunStatus.DONE
    if len(per_pair) > 1 or len(lp.runs) > LIST_ALL_UP_TO:
        lines += ["", "backbone pairs:"]
        width = max(len(p) for p in per_pair)
        for pair, (n, packs, done) in per_pair.items():
            lines.append(f"  {pair:<{width}}  {n} run(s) in {len(packs)} pack(s), {done} finished, "
                         f"{len(packs & to_run)} pack(s) to submit")
    counts = {s: sum(v == s for v in lp.states.values()) for s in (RunStatus.DONE, RunStatus.FAILED, RunStatus.MISSING)}
    show = lp.runs
    if not verbose and len(lp.runs) > LIST_ALL_UP_TO:
        show = lp.runs[:LIST_ENDS] + [None] + lp.runs[-LIST_ENDS:]
        lines += ["", f"runs (the first and last {LIST_ENDS} of {len(lp.runs)}; --verbose lists every one):"]
    else:
        lines += ["", "runs:"]
    for r in show:
        if r is None:
            lines.append(f"  ... {len(lp.runs) - 2 * LIST_ENDS} more run(s) ...")
        else:
            lines.append(f"  pack {r.pack:3d}  {lp.states[r.run_id]:7s}  {r.run_id}  ({r.name})")
    lines.append("")
    lines.append(f"states: {counts['done']} done, {counts['failed']} failed, {counts['missing']} not run yet")
    lines.append(f"to submit: {len(lp.to_run)} pack(s) {compress(lp.to_run) or '-'}; "
                 f"skipping {len(lp.skipped)} finished run(s)")
    res = lp.profile.train
    gpus = res.gpus_per_task * res.tasks_per_node * res.nodes
    hours = len(lp.to_run) * res.time_min / 60
    lines.append(f"estimated cost, at most: {len(lp.to_run)} task(s) x {res.time_min} min time limit = {hours:.1f} h"
                 + (f", {hours * gpus:.1f} GPU-hours ({gpus} GPU(s) per task)" if gpus else " (no GPUs requested)"))
    if lp.prepare:
        lines.append("first: a data-preparation job (decodes the audio once into data.prepared_dir)")
    if lp.features:
        lines.append(f"then: a features job, {lp.features} task(s) (each frozen backbone pair runs once over the "
                     "corpus into data.features_dir; train.features=cached)")
    alone = {}
    for r in lp.runs:
        why = needs_own_forward(r.config)
        if why:
            alone.setdefault(why, []).append(r.run_id)
    for why, ids in alone.items():
        lines.append(f"{len(ids)} run(s) cannot share a backbone forward ({why}), so each is a pack of one")
    shared = [p for p in lp.packs if len(p) > 1]
    if shared:
        lines.append(f"{len(shared)} pack(s) train several heads in one process on one backbone forward per batch "
                     f"(up to pack_size={lp.spec.pack_size})")
    if lp.profile.executor == "slurm":
        arrays = split_by_index(lp.to_run, lp.max_array_size)
        limit = f"MaxArraySize {lp.max_array_size} ({lp.max_array_source})"
        if len(arrays) > 1:
            lines.append(f"{len(lp.to_run)} packs to submit exceed {limit}: {len(arrays)} training arrays, each "
                         f"throttled to %{lp.profile.array_parallelism}; aggregation waits for all of them")
        else:
            lines.append(f"one training array ({limit})")
        if len(split_by_index(list(range(lp.features)), lp.max_array_size)) > 1:
            lines.append(f"the features job is split too ({limit}); training waits for all of its arrays")
        lines.append("the jobs (as slurm/submit_grid.sh submits them; submitit gets the same options):")
        lines += [f"  {var}: sbatch {shell_words(args)}{note}"
                  for var, args, note in lp.sbatch_commands()]
    return "\n".join(lines)


def describe_problems(lp: LaunchPlan) -> str:
    """Every failed check, numbered; empty when there is none."""
    if not lp.problems:
        return ""
    return (f"{len(lp.problems)} problem(s) to fix before this grid can be submitted:\n"
            + "\n".join(f"  {i}. {p}" for i, p in enumerate(lp.problems, 1)))


def write_grid_files(lp: LaunchPlan) -> Path:
    out = lp.spec.out_dir
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    grid_file = out / "grid.yaml"
    new = lp.spec.to_dict()
    if grid_file.exists():
        old = yaml.safe_load(grid_file.read_text(encoding="utf-8"))
        if old != new:
            # Keep the earlier grid next to the new one: its finished runs stay in runs/.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            atomic_io.write_text(out / f"grid.{stamp}.yaml", grid_file.read_text(encoding="utf-8"))
            plan_file = out / "plan.json"
            if plan_file.exists():
                atomic_io.write_text(out / f"plan.{stamp}.json", plan_file.read_text(encoding="utf-8"))
            log.warning("grid %s changed since the last launch; the previous grid and plan are kept as *.%s.*",
                        lp.spec.name, stamp)
    atomic_io.write_text(grid_file, yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
    return write_plan(build_plan(lp.spec, lp.runs, lp.packs), out)


def _git_commit() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def record_launch(lp: LaunchPlan, sub: Submission, overrides: list[str]) -> None:
    """Append this launch to manifest.json (every relaunch is kept)."""
    path = lp.spec.out_dir / "manifest.json"
    manifest = atomic_io.read_json(path) if path.exists() else {"grid_name": lp.spec.name, "launches": []}
    manifest["launches"].append({
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
        **_git_commit(), "versions": _versions(), "executor": sub.executor, "profile": lp.profile.name,
        "overrides": overrides, "job_ids": {"prepare": sub.job_ids.get("prepare"), "features": sub.job_ids.get("features"),
                                            "train_array": sub.job_ids.get("train"),
                                            "aggregate": sub.job_ids.get("aggregate")},
        "packs": sub.packs, "skipped_runs": [r.run_id for r in lp.skipped],
        "train_arrays": sub.train_arrays, "features_arrays": sub.features_arrays,
    })
    atomic_io.write_json(path, manifest)


def _refresh_states(lp: LaunchPlan) -> None:
    """Under the launch lock: what finished since plan_launch() looked (e.g. a launch that just ended)."""
    lp.states = run_states(build_plan(lp.spec, lp.runs, lp.packs))
    lp.to_run = [i for i, pack in enumerate(lp.packs) if any(lp.states[r.run_id] != RunStatus.DONE for r in pack)]
    lp.prepare = lp.prepare and bool(lp.to_run)
    lp.features = lp.features if lp.to_run else 0


def launch(lp: LaunchPlan, overrides: list[str]) -> Submission:
    """Write the grid files and submit (slurm) or run (local, debug) the packs.

    Holds the grid's launch lock (results/<grid>/.launch.lock, ``ser_hpc.locks``) until the
    submission is done, or with local / debug until the packs have finished: a second
    launch of the same grid meanwhile is refused (``LockHeld``) instead of submitting the
    same packs again. The packs' own processes take run-folder locks, which are other files.
    """
    with launch_lock(lp.spec.out_dir):
        _refresh_states(lp)
        return _launch(lp, overrides)


def _launch(lp: LaunchPlan, overrides: list[str]) -> Submission:
    plan_path = write_grid_files(lp).resolve()
    if lp.skipped:
        log.info("skipping %d finished run(s): %s", len(lp.skipped), ", ".join(r.run_id for r in lp.skipped))
    if lp.profile.executor == "slurm":
        sub = submit_slurm(plan_path, lp.spec.out_dir, lp.to_run, lp.profile, lp.spec.name, lp.prepare, lp.features,
                           lp.max_array_size)
    else:
        sub = run_here(plan_path, lp.spec.out_dir, lp.to_run, lp.profile, lp.prepare, lp.features)
    record_launch(lp, sub, overrides)
    return sub


def emit_sbatch(lp: LaunchPlan, overrides: list[str]) -> Path:
    """Write the plan and the job chain as a script of sbatch calls (results/<grid>/submit.sh,
    run by slurm/submit_grid.sh), under the grid's launch lock like ``launch``."""
    with launch_lock(lp.spec.out_dir):
        _refresh_states(lp)
        plan_path = write_grid_files(lp).resolve()
        out = lp.spec.out_dir.resolve()
        atomic_io.write_text(out / "job_setup.sh", "# sourced by slurm/*.sbatch: the cluster profile's env and setup\n"
                             + "\n".join(job_env_lines(lp.profile)) + "\n")
        script = out / "submit.sh"
        atomic_io.write_text(script, render_sbatch(lp.sbatch_commands(plan_path), out, lp.profile))
        arrays = split_by_index(lp.to_run, lp.max_array_size)
        record_launch(lp, Submission("sbatch", packs=lp.to_run, train_arrays=[
            {"job_id": None, "offset": c.offset, "packs": c.items} for c in arrays]), overrides)
        return script


def summary(out_dir: Path) -> str:
    plan = read_plan(out_dir)
    states = run_states(plan)
    counts = {s: sum(v == s for v in states.values()) for s in (RunStatus.DONE, RunStatus.FAILED, RunStatus.MISSING)}
    text = f"{len(states)} runs: {counts['done']} done, {counts['failed']} failed, {counts['missing']} not finished"
    ens = out_dir / "ensemble" / "ensemble.json"
    if ens.exists():
        e = atomic_io.read_json(ens)
        if e.get("kind") == "folds":  # one ensemble per fold: the figures are means over folds
            mean, std = e.get("mean") or {}, e.get("std") or {}
            test = " ".join(f"{k} {mean[k]:.4f} ± {std.get(k) or 0:.4f}" for k in ("macro_f1", "ua", "wa")
                            if mean.get(k) is not None)
            dev = (e.get("dev_mean") or {}).get("macro_f1")
            text += (f"\nensembles of {len(e['folds'])} folds ({e['method']})"
                     + (f": dev macro-F1 {dev:.4f} ± {(e.get('dev_std') or {}).get('macro_f1') or 0:.4f}"
                        if dev is not None else "")
                     + (f", test {test} (mean ± std over folds)" if test else ""))
        else:
            text += (f"\nensemble of {len(e['members'])} ({e['method']}): dev macro-F1 {e['dev_macro_f1']:.4f}"
                     + (f", test macro-F1 {e['test_macro_f1']:.4f}" if e.get("test_macro_f1") is not None else ""))
        text += f"\nleaderboard: {out_dir / 'ensemble' / 'leaderboard.md'}"
    return text
