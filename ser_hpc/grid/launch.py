"""The launcher: expand and check a grid (``plan_launch``), report it (``describe``), then
write the plan and submit or run the packs that are not finished (``launch``, or
``emit_sbatch`` for plain sbatch), recording every launch in manifest.json."""
from __future__ import annotations

import contextlib
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import atomic_io
from ..config import parse_override
from ..data.audio import AudioError
from ..data.prepare_job import needs_preparation
from ..ensemble.report_stats import summary as ensemble_summary
from ..features.job import feature_tasks, store_limits, store_plans, whisper_costs
from ..features.store import FeatureStoreError
from ..locks import launch_lock
from ..models.encoders import BackboneError
from ..plan_file import read_plan, run_states
from ..provenance import provenance
from ..run_status import RunStatus
from ..train.packing import needs_own_forward
from . import manifest, snapshot
from .checks import check_backbones, check_cross_corpus, check_data, check_results_dir
from .cluster import DEFAULT_MAX_ARRAY_SIZE, ClusterProfile, job_env_lines, load_profile, max_array_size
from .plan import GridSpec, PlannedRun, build_plan, expand, load_grid, make_packs, write_plan
from .submit import (Chain, Submission, compress, render_sbatch, run_here, sbatch_arrays, sbatch_commands, shell_words,
                     split_by_index, submit_slurm)

log = logging.getLogger("ser_hpc.grid")
REPO = Path(__file__).resolve().parents[2]
LIST_ALL_UP_TO, LIST_ENDS = 50, 10  # a dry run lists every run up to 50, else the first and last 10


@dataclass
class LaunchPlan:
    spec: GridSpec
    profile: ClusterProfile
    runs: list[PlannedRun]
    packs: list[list[PlannedRun]]
    states: dict[str, RunStatus] = field(default_factory=dict)  # run_id -> done / failed / missing
    to_run: list[int] = field(default_factory=list)   # pack indices to (re)submit
    prepare: bool = False        # some clips still need decoding into data.prepared_dir
    features: int = 0            # features array tasks (store shards) to run before training (train.features=cached)
    feature_tasks: list[list[int]] = field(default_factory=list)  # [group, shard] of each features task
    stores: list = field(default_factory=list)         # tasks.StorePlan of every feature store the grid reads
    window_costs: list[str] = field(default_factory=list)  # what Whisper's 30 s window costs, per encoder and corpus
    problems: list[str] = field(default_factory=list)  # every failed check; nothing is submitted while any
    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE   # Slurm's MaxArraySize: larger arrays are split
    max_array_source: str = "Slurm's default"      # where that number came from
    code: snapshot.CodeVersion | None = None       # the code the jobs will run; None: --no-snapshot
    last_code: str | None = None                   # the code id the last launch's jobs ran
    audio_check: str = ""                          # what the audio check covered, in words
    results_check: str = ""                        # the results folder: writable, free space

    @property
    def skipped(self) -> list[PlannedRun]:
        return [r for r in self.runs if self.states.get(r.run_id) == RunStatus.DONE]

    def refresh(self) -> dict:
        """What has finished (again under the launch lock: a launch may have just ended).
        Returns the plan it read that from."""
        plan = build_plan(self.spec, self.runs, self.packs)
        plan["feature_tasks"] = self.feature_tasks  # the features array's task i: [group, shard]
        self.states = run_states(plan)
        self.to_run = [i for i, pack in enumerate(self.packs) if any(self.states[r.run_id] != RunStatus.DONE
                                                                    for r in pack)]
        if not self.to_run:
            self.prepare, self.features, self.feature_tasks = False, 0, []
            plan["feature_tasks"] = []
        return plan

    def chain(self, code_dir: Path | None = None) -> Chain:
        """The jobs this launch submits; ``code_dir``: where their code is (default: the
        snapshot the launch will take, or the checkout with --no-snapshot)."""
        out = self.spec.out_dir.resolve()
        if code_dir is None:
            code_dir = snapshot.snapshot_dir(out, self.code) if self.code else REPO
        return Chain(out / "plan.json", out, self.spec.name, self.profile, self.to_run, self.prepare, self.features,
                     self.max_array_size, code_dir)

    def code_line(self) -> str:
        """What the dry run says about the code the jobs will run."""
        if self.code is None:
            return (f"code: --no-snapshot: every job runs the checkout {REPO} as it is when the job starts "
                    "(an edit while jobs wait in the queue changes what they run)")
        where = snapshot.snapshot_dir(self.spec.out_dir, self.code)
        if self.last_code is None:
            since = "first launch"
        elif self.last_code == self.code.id:
            since = "unchanged since the last launch"
        else:
            since = (f"the code changed since the last launch, whose jobs run {self.last_code}: the packs "
                     "submitted now run the new code")
        return (f"code: the jobs run a snapshot taken at submission, {where} ({len(self.code.files)} files, "
                f"{self.code.bytes / 1e6:.1f} MB; {since})")


def plan_launch(grid_path: str, overrides: list[str], cluster: str | None = None, profile_path: str | None = None,
                quick_check: bool = False, code_snapshot: bool = True) -> LaunchPlan:
    """Expand and check everything; nothing is written or submitted here."""
    spec = load_grid(grid_path, dict(parse_override(o) for o in overrides))
    runs = expand(spec)
    profile_file = Path(profile_path or spec.cluster or "configs/cluster/local.yaml")
    if not profile_path and not profile_file.is_absolute() and not profile_file.exists():
        # the grid's cluster: relative to the working directory, else to the grid file, else to the repository
        profile_file = next((c for c in (Path(grid_path).parent / profile_file, REPO / profile_file) if c.exists()),
                            profile_file)
    profile = load_profile(profile_file)
    profile.executor = cluster or profile.executor
    lp = LaunchPlan(spec, profile, runs, make_packs(runs, spec.pack_size))
    if code_snapshot:
        lp.code = snapshot.code_version()
        lp.last_code = next((x["code"]["id"] for x in reversed(manifest.read(spec.out_dir)["launches"])
                             if x.get("code")), None)
    if profile.executor == "slurm":
        lp.max_array_size, lp.max_array_source = max_array_size(profile)
    else:
        lp.max_array_size, lp.max_array_source = profile.max_array_size or DEFAULT_MAX_ARRAY_SIZE, "not used (no Slurm)"
    # Every check reports its problem and goes on, so a dry run shows the whole plan and then
    # everything that needs fixing, not the first error.
    lp.results_check = check_results_dir(spec.out_dir, lp.problems)
    before = len(lp.problems)
    n_data, lp.audio_check = check_data(runs, quick=quick_check, problems=lp.problems)
    data_ok = len(lp.problems) == before
    n_models = check_backbones(runs, grid_path, lp.problems)
    check_cross_corpus(runs, spec.cross_corpus, lp.problems)
    log.info("checked %d data config(s) and %d backbone(s)", n_data, n_models)
    plan = lp.refresh()
    if lp.to_run and data_ok:  # both read the corpus, which the checks above found usable
        try:
            lp.prepare, lp.stores = needs_preparation(plan), store_plans(plan, lp.problems)
            lp.feature_tasks = feature_tasks(lp.stores)
            lp.features = len(lp.feature_tasks)
            lp.problems += store_limits(lp.stores)
            lp.window_costs = whisper_costs(runs)
        except (FeatureStoreError, AudioError, BackboneError) as exc:  # a torn store names its fix
            lp.problems.append(str(exc))
    return lp


def where(path: str | Path) -> str:
    """A results path as the absolute folder it resolves to, with a warning when a relative
    path climbs out of the current directory with '..'."""
    path = Path(path)
    resolved = path.resolve()
    if not path.is_absolute() and ".." in path.parts and not resolved.is_relative_to(Path.cwd().resolve()):
        return f"{resolved}  (WARNING: {path} climbs out of the current directory {Path.cwd()})"
    return str(resolved)


def describe(lp: LaunchPlan, verbose: bool = False) -> str:
    """The --dry-run report: runs (per backbone pair; every run with ``verbose`` or for a
    small grid, else the first and last few), packs, resources and the sbatch calls."""
    lines = [f"grid {lp.spec.name}: {len(lp.runs)} runs in {len(lp.packs)} packs -> {where(lp.spec.out_dir)}",
             f"executor {lp.profile.executor}, profile {lp.profile.name}"]
    big = len(lp.runs) > LIST_ALL_UP_TO
    if lp.spec.corpora:
        lines += ["", f"corpora ({len(lp.spec.corpora)}):"]
        for c in lp.spec.corpora:
            runs = [r for r in lp.runs if r.corpus == c.name]
            stores = [s for s in lp.stores if s.corpus == c.name]
            size = sum(s.projection.bytes for s in stores if not s.complete) / 1e9
            lines.append(f"  {c.name}: {len(runs)} run(s) in {len({r.pack for r in runs})} pack(s)"
                         + (f", folds {c.folds}" if c.folds else "")
                         + (f", {len(stores)} feature store(s), {size:.2f} GB to extract" if stores else ""))
        if lp.spec.cross_corpus:
            lines.append(f"  cross-corpus: each of {', '.join(lp.spec.cross_corpus['train'])} on "
                         f"{', '.join(lp.spec.cross_corpus['test'])} (shared classes), in the aggregation job")
    by_pair: dict[str, list[PlannedRun]] = {}
    for r in lp.runs:
        by_pair.setdefault(r.pair, []).append(r)
    if len(by_pair) > 1 or big:
        lines += ["", "backbone pairs:"]
        width, to_run = max(map(len, by_pair)), set(lp.to_run)
        for pair, runs in by_pair.items():
            packs = {r.pack for r in runs}
            done = sum(lp.states[r.run_id] == RunStatus.DONE for r in runs)
            lines.append(f"  {pair:<{width}}  {len(runs)} run(s) in {len(packs)} pack(s), {done} "
                         f"finished, {len(packs & to_run)} pack(s) to submit")
    show = lp.runs[:LIST_ENDS] + [None] + lp.runs[-LIST_ENDS:] if big and not verbose else lp.runs
    lines += ["", f"runs (the first and last {LIST_ENDS} of {len(lp.runs)}; --verbose lists every one):"
              if None in show else "runs:"]
    lines += [f"  ... {len(lp.runs) - 2 * LIST_ENDS} more run(s) ..." if r is None else
              f"  pack {r.pack:3d}  {lp.states[r.run_id]:7s}  {r.run_id}  ({r.name})" for r in show]
    count = {s: sum(v == s for v in lp.states.values()) for s in RunStatus}
    res = lp.profile.train
    gpus, hours = res.gpus_per_task * res.tasks_per_node * res.nodes, len(lp.to_run) * res.time_min / 60
    lines += ["", f"states: {count['done']} done, {count['failed']} failed, {count['missing']} not run yet",
              f"to submit: {len(lp.to_run)} pack(s) {compress(lp.to_run) or '-'}; "
              f"skipping {len(lp.skipped)} finished run(s)",
              f"estimated cost, at most: {len(lp.to_run)} task(s) x {res.time_min} min time limit = {hours:.1f} h"
              + (f", {hours * gpus:.1f} GPU-hours ({gpus} GPU(s) per task)" if gpus else " (no GPUs requested)")]
    lines += [line for line in (lp.results_check, lp.audio_check) if line]
    if lp.prepare:
        lines.append("first: a data-preparation job (decodes the audio once into data.prepared_dir)")
    if lp.features:
        lines.append(f"then: a features job, {lp.features} task(s) (each frozen backbone pair runs once over the "
                     "corpus into data.features_dir, one task per shard of data.features_shard_hours; "
                     "train.features=cached)")
    if lp.stores:
        lines.append("feature stores (projected: frames x hidden states held x width x 2 B, per view):")
        lines += [f"  {'ready' if s.complete else 'to extract'}: " + (f"[{s.corpus}] " if s.corpus else "")
                  + s.projection.describe() for s in lp.stores]
    lines += lp.window_costs
    alone: dict[str, int] = {}
    for why in filter(None, (needs_own_forward(r.config) for r in lp.runs)):
        alone[why] = alone.get(why, 0) + 1
    lines += [f"{n} run(s) cannot share a backbone forward ({why}), so each is a pack of one"
              for why, n in alone.items()]
    shared = sum(len(p) > 1 for p in lp.packs)
    if shared:
        lines.append(f"{shared} pack(s) train several heads in one process on one "
                     f"backbone forward per batch (up to pack_size={lp.spec.pack_size})")
    if lp.profile.executor != "debug":
        lines.append(lp.code_line())
    if lp.profile.executor == "slurm":
        limit = f"MaxArraySize {lp.max_array_size} ({lp.max_array_source})"
        n_arrays = len(split_by_index(lp.to_run, lp.max_array_size))
        lines.append(f"{len(lp.to_run)} packs to submit exceed {limit}: {n_arrays} training arrays, each throttled "
                     f"to %{lp.profile.array_parallelism}; aggregation waits for all of them" if n_arrays > 1
                     else f"one training array ({limit})")
        if len(split_by_index(list(range(lp.features)), lp.max_array_size)) > 1:
            lines.append(f"the features job is split too ({limit}); training waits for all of its arrays")
        lines.append("the jobs (as slurm/submit_grid.sh submits them; submitit gets the same options):")
        lines += [f"  {var}: sbatch {shell_words(args)}{note}" for var, args, note in sbatch_commands(lp.chain())]
    return "\n".join(lines)


def describe_problems(lp: LaunchPlan) -> str:
    """Every failed check, numbered; empty when there is none."""
    return "" if not lp.problems else (f"{len(lp.problems)} problem(s) to fix before this grid can be submitted:\n"
                                       + "\n".join(f"  {i}. {p}" for i, p in enumerate(lp.problems, 1)))


def write_grid_files(lp: LaunchPlan, plan: dict | None = None) -> Path:
    """grid.yaml (the resolved grid) and plan.json; a changed grid keeps the earlier pair as *.<time>.*."""
    out = lp.spec.out_dir
    for folder in (out / "runs", out / "logs"):
        folder.mkdir(parents=True, exist_ok=True)
    grid_file, new = out / "grid.yaml", lp.spec.to_dict()
    if grid_file.exists() and yaml.safe_load(grid_file.read_text(encoding="utf-8")) != new:
        stamp = time.strftime("%Y%m%d-%H%M%S")  # the earlier grid's finished runs stay in runs/
        for old in (grid_file, out / "plan.json"):
            if old.exists():
                atomic_io.write_text(out / f"{old.stem}.{stamp}{old.suffix}", old.read_text(encoding="utf-8"))
        log.warning("grid %s changed since the last launch; the previous grid and plan are kept as *.%s.*",
                    lp.spec.name, stamp)
    atomic_io.write_text(grid_file, yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
    return write_plan(plan or build_plan(lp.spec, lp.runs, lp.packs), out)


def record_launch(lp: LaunchPlan, sub: Submission, overrides: list[str], code: dict | None,
                  launch_id: str | None = None) -> None:
    """Append this launch to manifest.json: provenance, the code its jobs run, what it submitted."""
    ids = sub.job_ids
    manifest.append_launch(lp.spec.out_dir, {
        "launch_id": launch_id or manifest.new_launch_id(), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(), **provenance(), "code": code,
        "executor": sub.executor, "profile": lp.profile.name, "overrides": overrides,
        "job_ids": {"prepare": ids.get("prepare"), "features": ids.get("features"), "train_array": ids.get("train"),
                    "aggregate": ids.get("aggregate")},
        "packs": sub.packs, "skipped_runs": [r.run_id for r in lp.skipped],
        "train_arrays": sub.train_arrays, "features_arrays": sub.features_arrays, "tasks": sub.tasks})


@contextlib.contextmanager
def _undone_on_failure(lp: LaunchPlan):
    """A launch that fails (a full or read-only file system, a refused submission) removes the
    grid files and folders it created; what existed before it is left as it was."""
    out = lp.spec.out_dir
    folders = [out, *out.parents]  # the results folder and the folders above it the launch may create
    created = [p for p in (out / "grid.yaml", out / "plan.json", out / "job_setup.sh", out / "submit.sh",
                           out / "runs", out / "logs", out / "code") if not p.exists()]
    created += [p for p in folders[:next(i for i, p in enumerate(folders) if p.exists())] if p != Path(".")]
    snapshot_dir = snapshot.snapshot_dir(out, lp.code) if lp.code else None
    new_snapshot = snapshot_dir is not None and not snapshot_dir.exists()
    try:
        yield
    except BaseException:
        if new_snapshot and snapshot_dir.exists():
            shutil.rmtree(snapshot_dir, ignore_errors=True)
        for path in created:  # the results folder and those above it last, each only when empty
            with contextlib.suppress(OSError):
                if path.is_file():
                    path.unlink()
                elif path in folders:
                    path.rmdir()  # refused when not empty
                elif path.is_dir():
                    shutil.rmtree(path)
        raise


def _take_snapshot(lp: LaunchPlan) -> tuple[Path, dict | None]:
    """The code folder this launch's jobs run, and its manifest record."""
    if lp.code is None:
        return REPO, None
    folder, reused = snapshot.take(lp.spec.out_dir, lp.code)
    log.info("code snapshot %s (%s)", folder, "reused: unchanged" if reused else "new")
    return folder, {"id": lp.code.id, "dir": str(folder), "files": len(lp.code.files), "reused": reused}


def launch(lp: LaunchPlan, overrides: list[str]) -> Submission:
    """Write the grid files and submit (slurm) or run (local, debug) the unfinished packs.

    Holds the grid's launch lock (results/<grid>/.launch.lock) until the submission is done, or
    with local / debug until the packs have finished: a second launch of the same grid is
    refused (``LockHeld``) instead of submitting the same packs again.
    """
    with _undone_on_failure(lp), launch_lock(lp.spec.out_dir):
        write_grid_files(lp, lp.refresh())
        if lp.skipped:
            log.info("skipping %d finished run(s): %s", len(lp.skipped), ", ".join(r.run_id for r in lp.skipped))
        code_dir, code = _take_snapshot(lp)
        chain = lp.chain(code_dir)
        sub = submit_slurm(chain) if lp.profile.executor == "slurm" else run_here(chain)
        record_launch(lp, sub, overrides, code)
        return sub


def emit_sbatch(lp: LaunchPlan, overrides: list[str]) -> Path:
    """Like ``launch``, but the chain is written as a script of sbatch calls (results/<grid>/
    submit.sh, which slurm/submit_grid.sh runs) next to job_setup.sh, the profile's env and setup.
    The script records each job id in this launch's manifest entry as it submits."""
    with _undone_on_failure(lp), launch_lock(lp.spec.out_dir):
        write_grid_files(lp, lp.refresh())
        out = lp.spec.out_dir.resolve()
        code_dir, code = _take_snapshot(lp)
        chain, launch_id = lp.chain(code_dir), manifest.new_launch_id()
        atomic_io.write_text(out / "job_setup.sh", "# sourced by slurm/*.sbatch: the cluster profile's env and setup\n"
                             + "\n".join(job_env_lines(lp.profile)) + "\n")
        atomic_io.write_text(out / "submit.sh", render_sbatch(chain, launch_id))
        sub = Submission("sbatch", packs=lp.to_run, train_arrays=sbatch_arrays(chain, "train"),
                         features_arrays=sbatch_arrays(chain, "features"))
        record_launch(lp, sub, overrides, code, launch_id)
        return out / "submit.sh"


def summary(out_dir: Path) -> str:
    """After a local run or --wait: what finished, and the ensemble's figures."""
    states = list(run_states(read_plan(out_dir)).values())
    text = (f"{len(states)} runs: {states.count(RunStatus.DONE)} done, {states.count(RunStatus.FAILED)} failed, "
            f"{states.count(RunStatus.MISSING)} not finished")
    ens = out_dir / "ensemble" / "ensemble.json"
    if not ens.exists():
        return text
    result = atomic_io.read_json(ens)
    board = out_dir / "ensemble" / ("benchmark.md" if result.get("kind") == "benchmark" else "leaderboard.md")
    return f"{text}\n{ensemble_summary(result)}\n{board.stem}: {board}"
