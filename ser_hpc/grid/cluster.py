"""Cluster profiles (configs/cluster/*.yaml): where and with what resources jobs run.

Every value that reaches an sbatch script is checked here: option names must look like
sbatch options and no value may hold a newline, so a profile cannot inject lines into a
job script. Values on command lines are passed as argv items or ``shlex.quote``d.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_yaml
from ..models.encoders import OFFLINE_HUB_ENV

EXECUTORS = ("slurm", "local", "debug")
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize
OPTION_RE = re.compile(r"^--([a-z][a-z0-9-]*)(?:=(.*))?$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    executor: str = "local"
    train: JobResources = field(default_factory=JobResources)
    aggregate: JobResources = field(default_factory=lambda: JobResources(time_min=30))
    prepare: JobResources = field(default_factory=lambda: JobResources(cpus_per_task=8, time_min=120))
    features: JobResources = field(default_factory=JobResources)  # default: the train resources (a GPU)
    array_parallelism: int = 8       # %N: most array tasks running at once (per array job)
    max_array_size: int | None = None  # the cluster's MaxArraySize when scontrol cannot be asked (default 1001)
    setup: list[str] = field(default_factory=list)   # shell lines run before each job (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in each job (HF_HOME=...)


def _no_newline(value: Any, where: str) -> None:
    if isinstance(value, str) and ("\n" in value or "\r" in value or "\0" in value):
        raise ConfigError(f"{where}: value {value!r} contains a newline or NUL")


def _resources(tree: dict[str, Any], where: str, base: JobResources | None = None) -> JobResources:
    res = JobResources(**vars(base)) if base else JobResources()
    names = {f.name: f for f in fields(JobResources)}
    for key, value in (tree or {}).items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'; valid: {', '.join(names)}")
        _no_newline(value, f"{where}.{key}")
        setattr(res, key, value)
    for key in ("nodes", "tasks_per_node", "gpus_per_task", "cpus_per_task", "time_min", "signal_delay_s"):
        if not isinstance(getattr(res, key), int) or getattr(res, key) < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative integer, got {getattr(res, key)!r}")
    for key in ("partition", "account", "qos"):
        value = getattr(res, key)
        if value is not None and not re.match(r"^[A-Za-z0-9_.,-]+$", str(value)):
            raise ConfigError(f"{where}.{key}: {value!r} is not a valid Slurm name")
    if not isinstance(res.extra_sbatch, list):
        raise ConfigError(f"{where}.extra_sbatch must be a list of --option[=value] strings")
    for line in res.extra_sbatch:
        _no_newline(line, f"{where}.extra_sbatch")
        if not isinstance(line, str) or not OPTION_RE.match(line):
            raise ConfigError(f"{where}.extra_sbatch: {line!r} is not an sbatch option like --name=value")
    return res


def load_profile(path: str | Path) -> ClusterProfile:
    path = Path(path)
    tree = read_yaml(path)
    allowed = {"name", "executor", "train", "aggregate", "prepare", "features", "array_parallelism", "max_array_size",
               "setup", "env", "description"}
    unknown = set(tree) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(allowed))}")
    executor = tree.get("executor", "slurm")
    if executor not in EXECUTORS:
        raise ConfigError(f"{path}: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    train = _resources(tree.get("train") or {}, f"{path}: train")
    aggregate = _resources(tree.get("aggregate") or {}, f"{path}: aggregate",
                           JobResources(partition=train.partition, account=train.account, qos=train.qos,
                                        cpus_per_task=1, time_min=30))
    prepare = _resources(tree.get("prepare") or {}, f"{path}: prepare",
                         JobResources(partition=aggregate.partition, account=aggregate.account, qos=aggregate.qos,
                                      cpus_per_task=min(8, max(1, aggregate.cpus_per_task)), time_min=120))
    features = _resources(tree.get("features") or {}, f"{path}: features", train)
    setup = tree.get("setup") or []
    if not isinstance(setup, list):
        raise ConfigError(f"{path}: setup must be a list of shell lines")
    for line in setup:
        _no_newline(line, f"{path}: setup")
    env = {str(k): str(v) for k, v in (tree.get("env") or {}).items()}
    for key, value in env.items():
        if not ENV_RE.match(key):
            raise ConfigError(f"{path}: env name {key!r} is not a valid variable name")
        _no_newline(value, f"{path}: env.{key}")
    parallel = tree.get("array_parallelism", 8)
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"{path}: array_parallelism must be an integer >= 1, got {parallel!r}")
    max_size = tree.get("max_array_size")
    if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1):
        raise ConfigError(f"{path}: max_array_size must be an integer >= 1 (the cluster's MaxArraySize), "
                          f"got {max_size!r}")
    return ClusterProfile(name=str(tree.get("name") or path.stem), executor=executor, train=train,
                          aggregate=aggregate, prepare=prepare, features=features, array_parallelism=parallel,
                          max_array_size=max_size, setup=list(setup), env=env)


MAX_ARRAY_RE = re.compile(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", re.MULTILINE)


def scontrol_max_array_size(timeout_s: float = 10) -> int | None:
    """MaxArraySize from ``scontrol show config``, or None when scontrol is missing, fails
    (no controller reachable from here) or does not say."""
    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = MAX_ARRAY_RE.search(res.stdout) if res.returncode == 0 else None
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


def max_array_size(profile: ClusterProfile) -> tuple[int, str]:
    """The largest array job Slurm accepts here (indices 0..N-1), and where the number came
    from: ``scontrol show config`` when it answers, else the profile's max_array_size, else
    Slurm's default 1001."""
    found = scontrol_max_array_size()
    if found is not None:
        return found, "scontrol show config"
    if profile.max_array_size is not None:
        return profile.max_array_size, f"profile {profile.name}"
    return DEFAULT_MAX_ARRAY_SIZE, "Slurm's default"


def job_env_lines(profile: ClusterProfile) -> list[str]:
    """Shell lines each job starts with: offline hub, the profile's env and setup."""
    lines = [f"export {k}={shlex.quote(v)}" for k, v in {**OFFLINE_HUB_ENV, **profile.env}.items()]
    return lines + list(profile.setup)


def slurm_options(res: JobResources, job_name: str) -> dict[str, Any]:
    """The sbatch options of one kind of job, ``{"cpus_per_task": 8, "exclusive": True, ...}``:
    submitit writes them as ``#SBATCH --cpus-per-task=8`` (its ``slurm_additional_parameters``
    override its own defaults) and the rendered sbatch chain as ``--cpus-per-task=8``."""
    opts: dict[str, Any] = {"job_name": job_name, "time": res.time_min, "nodes": res.nodes,
                            "ntasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task,
                            "signal": f"USR2@{res.signal_delay_s}"}
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            opts[key] = getattr(res, key)
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
