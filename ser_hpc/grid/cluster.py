"""Cluster profiles (configs/cluster/*.yaml): where and with what resources jobs run.

Keys and types are checked like a run config's; every value that reaches an sbatch script is checked
too (RULES), so a profile cannot inject lines into a job script. Values on command lines are passed as
argv items or ``shlex.quote``d.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .. import slurm
from ..config import ConfigError, copy_config, read_yaml, set_key
from ..offline import OFFLINE_HUB_ENV

Executor = Literal["slurm", "local", "debug"]
EXECUTORS = get_args(Executor)
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize
OPTION_RE = re.compile(r"^--([a-z][a-z0-9-]*)(?:=(.*))?$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9_.,-]+$")
NEWLINE_RE = re.compile(r"[\n\r\0]")  # a newline (or NUL) would add a line to a job script
SECTIONS = ("train", "aggregate", "prepare", "features")
PLACE = ("partition", "account", "qos")
COUNTS = ("nodes", "tasks_per_node", "gpus_per_task", "cpus_per_task", "time_min", "signal_delay_s")


@dataclass
class JobResources:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    signal_delay_s: int = 120        # --signal=USR2@N: warning before the time limit
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--exclusive", "--constraint=a100"]


@dataclass
class ClusterProfile:
    name: str = "local"
    executor: Executor = "local"     # a profile file that does not say is "slurm"
    train: JobResources = field(default_factory=JobResources)
    aggregate: JobResources = field(default_factory=lambda: JobResources(time_min=30))
    prepare: JobResources = field(default_factory=lambda: JobResources(cpus_per_task=8, time_min=120))
    features: JobResources = field(default_factory=JobResources)  # default: the train resources (a GPU)
    array_parallelism: int = 8       # %N: most array tasks running at once (per array job)
    max_array_size: int | None = None  # the cluster's MaxArraySize when scontrol cannot be asked (default 1001)
    setup: list[str] = field(default_factory=list)   # shell lines run before each job (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in each job (HF_HOME=...)


# What field types cannot say, by field name: (test, what the value must be).
RULES = {
    **dict.fromkeys(COUNTS, (lambda v: v >= 0, "a non-negative integer")),
    **dict.fromkeys(PLACE, (lambda v: v is None or SLURM_NAME_RE.fullmatch(v), "a Slurm name ([A-Za-z0-9_.,-])")),
    "extra_sbatch": (lambda v: all(OPTION_RE.fullmatch(o) and not NEWLINE_RE.search(o) for o in v),
                     "a list of sbatch options like --name=value"),
    "name": (lambda v: not NEWLINE_RE.search(v), "one line"),
    "setup": (lambda v: not any(map(NEWLINE_RE.search, v)), "a list of one-line shell commands"),
    "env": (lambda v: all(ENV_RE.fullmatch(k) and not NEWLINE_RE.search(x) for k, x in v.items()),
            "a mapping of variable names to one-line values"),
    "array_parallelism": (lambda v: v >= 1, "an integer >= 1"),
    "max_array_size": (lambda v: v is None or v >= 1, "an integer >= 1 (the cluster's MaxArraySize)"),
}


def load_profile(path: str | Path) -> ClusterProfile:
    path, where = Path(path), str(path)
    # A key left empty means its default; `description` is for people.
    tree = {k: v for k, v in read_yaml(path).items() if v not in (None, "") and k != "description"}
    if isinstance(tree.get("env"), dict):
        tree["env"] = {str(k): str(v) for k, v in tree["env"].items()}  # exported as text: 1, true -> "1", "True"
    profile = ClusterProfile(name=path.stem, executor="slurm")
    # Each job kind's section applies over what it inherits: aggregate runs where train does, prepare
    # where aggregate does, features with the train resources (a GPU).
    set_key(profile, "train", tree.pop("train", {}), where)
    train = profile.train
    profile.aggregate = JobResources(**{k: getattr(train, k) for k in PLACE}, cpus_per_task=1, time_min=30)
    set_key(profile, "aggregate", tree.pop("aggregate", {}), where)
    agg = profile.aggregate
    profile.prepare = JobResources(**{k: getattr(agg, k) for k in PLACE}, time_min=120,
                                   cpus_per_task=min(8, max(1, agg.cpus_per_task)))
    profile.features = copy_config(train)
    for key, value in tree.items():  # prepare and features among them
        set_key(profile, key, value, where)
    for prefix, node in [("", profile)] + [(f"{kind}.", getattr(profile, kind)) for kind in SECTIONS]:
        for key, value in vars(node).items():
            if key in RULES and not RULES[key][0](value):
                raise ConfigError(f"{where}: {prefix}{key} must be {RULES[key][1]}, got {value!r}")
    return profile


def max_array_size(profile: ClusterProfile) -> tuple[int, str]:
    """The largest array job Slurm accepts here (indices 0..N-1), and where the number came from:
    ``scontrol show config`` when it answers, else the profile's max_array_size, else Slurm's default."""
    found = slurm.max_array_size()
    if found is not None:
        return found, "scontrol show config"
    if profile.max_array_size is not None:
        return profile.max_array_size, f"profile {profile.name}"
    return DEFAULT_MAX_ARRAY_SIZE, "Slurm's default"


def job_env(profile: ClusterProfile) -> dict[str, str]:
    """The variables every job of a grid gets, before Python starts (the hub library reads
    them at import): offline hub (compute nodes have no internet), then the profile's env."""
    return {**OFFLINE_HUB_ENV, **profile.env}


def job_env_lines(profile: ClusterProfile) -> list[str]:
    """Shell lines each Slurm job starts with (submitit's setup, job_setup.sh for the sbatch
    templates): ``job_env`` and the profile's setup."""
    return [f"export {k}={shlex.quote(v)}" for k, v in job_env(profile).items()] + list(profile.setup)


def slurm_options(res: JobResources, job_name: str) -> dict[str, Any]:
    """The sbatch options of one kind of job, ``{"cpus_per_task": 8, "exclusive": True, ...}``:
    submitit writes them as ``#SBATCH --cpus-per-task=8`` (its ``slurm_additional_parameters``
    override its own defaults) and the rendered sbatch chain as ``--cpus-per-task=8``."""
    opts: dict[str, Any] = {"job_name": job_name, "time": res.time_min, "nodes": res.nodes,
                            "ntasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task,
                            "signal": f"USR2@{res.signal_delay_s}"}
    opts.update({key: getattr(res, key) for key in PLACE if getattr(res, key)})
    if res.gpus_per_task:  # every task of a node sees its GPUs and takes LOCAL_RANK's (train.distributed)
        opts["gpus_per_node"] = res.gpus_per_task * res.tasks_per_node
    if res.mem_gb:
        opts["mem"] = f"{int(res.mem_gb * 1024)}M"
    for line in res.extra_sbatch:
        key, value = OPTION_RE.match(line).groups()
        opts[key.replace("-", "_")] = True if value is None else value
    return opts


def sbatch_flags(options: dict[str, Any]) -> list[str]:
    """``slurm_options`` as command-line flags, as submitit writes them into its scripts."""
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items()]
