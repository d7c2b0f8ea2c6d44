"""Grid -> runs with stable ids -> packs.

A run id is a readable slug plus a short hash of the resolved run config, so the same
config always lands in the same folder (a relaunch finds its finished runs) and a changed
config never overwrites another's results.

A pack is the unit of one array task: runs that differ only in head settings, trained in
one process on one shared backbone forward per batch (``ser_hpc.train.packing``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from ..config import Config, ConfigError, apply_tree, set_key, validate
from ..train.packing import group_runs, needs_own_forward
from .spec import GridSpec


@dataclass
class PlannedRun:
    run_id: str
    name: str
    pair: str
    overrides: dict[str, Any]   # the grid's choices for this run (pair keys + axis values)
    config: dict[str, Any]      # the full resolved run config
    pack: int = -1


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(config: dict[str, Any]) -> str:
    """Hash of everything that defines the run's result (not its name or folder)."""
    body = {k: v for k, v in config.items() if k != "run"}
    return hashlib.sha1(_canonical(body).encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")[:80] or "run"


def _fmt(value: Any) -> str:
    return _canonical(value) if isinstance(value, (list, dict)) else str(value)


_FIELDS: dict[type, tuple[str, ...]] = {}   # config dataclass -> its field names, in order


def _fields_of(obj: Any) -> tuple[str, ...] | None:
    """The field names when ``obj`` is a config dataclass instance, else None."""
    names = _FIELDS.get(type(obj))
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
    return names


def _as_tree(obj: Any) -> Any:
    """``dataclasses.asdict`` for the config tree (dataclasses, lists, dicts and scalars),
    without its per-value deepcopy: the same dict, several times faster."""
    kind = type(obj)
    if kind is list:
        return [v if type(v) in _SCALARS else _as_tree(v) for v in obj]
    if kind is dict:
        return {k: v if type(v) in _SCALARS else _as_tree(v) for k, v in obj.items()}
    names = None if kind in _SCALARS else _fields_of(obj)
    if names is None:
        return obj
    out = {}
    for name in names:
        v = getattr(obj, name)
        out[name] = v if type(v) in _SCALARS else _as_tree(v)
    return out


def _copy(obj: Any) -> Any:
    """A deep copy of a config node (dataclasses and containers copied, scalars shared)."""
    kind = type(obj)
    if kind is list:
        return [v if type(v) in _SCALARS else _copy(v) for v in obj]
    if kind is dict:
        return {k: v if type(v) in _SCALARS else _copy(v) for k, v in obj.items()}
    names = None if kind in _SCALARS else _fields_of(obj)
    if names is None:
        return obj
    new = object.__new__(kind)
    for name in names:
        v = getattr(obj, name)
        object.__setattr__(new, name, v if type(v) in _SCALARS else _copy(v))
    return new


_SCALARS = frozenset({str, int, float, bool, type(None)})


class _RunConfig(Config):
    """A Config whose ``to_dict`` (which ``validate`` calls) returns the tree ``expand``
    has just made of it, instead of a second ``dataclasses.asdict``."""

    _tree: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return self._tree if self._tree is not None else _as_tree(self)


def expand(spec: GridSpec) -> list[PlannedRun]:
    """Every run of the grid: its resolved, validated config and a stable id.

    The base run config is applied once, the overrides and each backbone pair once per
    pair, and each run copies the sections of its pair's config that its axes set, and sets
    only its axis values (with the same key and type checks, through ``set_key``) before
    the full ``validate`` of the whole config. Rebuilding every run from the YAML trees
    cost ~40 ms a run (benchmarks/plan_scale.py); this costs about 0.3 ms.
    """
    axis_keys = list(spec.axes)
    short = [k.split(".")[-1] for k in axis_keys]
    sections = [f.name for f in dataclasses.fields(Config)]
    touched = {k.split(".")[0] for k in axis_keys} | {"run"}  # run.name is set for every run
    runs, seen = [], {}
    runs_dir = str(spec.out_dir / "runs")
    base = _RunConfig()
    apply_tree(base, spec.base, f"{spec.path}: run_config")
    for pair in spec.pairs:
        pair_cfg = None
        # An entry that sets an axis key pins it: the axis does not vary for that entry's runs
        # (a text-only entry has no use for a fusion axis).
        pair_axes = [[pair.overrides[k]] if k in pair.overrides else spec.axes[k] for k in axis_keys]
        for values in itertools.product(*pair_axes):
            labels = [_fmt(v) for v in values]
            name = " ".join([pair.name] + [f"{k}={v}" for k, v in zip(short, labels)])
            where = f"{spec.path}: run '{name}'"
            if pair_cfg is None:  # errors name the pair's first run, as when every run was rebuilt
                pair_cfg = _copy(base)
                for key, value in {**spec.overrides, **pair.overrides}.items():
                    set_key(pair_cfg, key, value, where)
            # A fresh copy of each section an axis sets; the other sections are only read
            # (by validate and _as_tree), so the run shares its pair's.
            cfg = object.__new__(_RunConfig)
            for section in sections:
                value = getattr(pair_cfg, section)
                object.__setattr__(cfg, section, _copy(value) if section in touched else value)
            for key, value in zip(axis_keys, values):
                set_key(cfg, key, value, where)
            cfg.run.name = name
            tree = cfg._tree = _as_tree(cfg)
            try:
                validate(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            digest = config_hash(tree)
            slug = _slug(".".join([pair.name] + [f"{k}{v}" for k, v in zip(short, labels)]))
            run_id = f"{slug}-{digest}"
            if digest in seen:
                raise ConfigError(f"{spec.path}: runs '{seen[digest]}' and '{name}' resolve to the same config")
            seen[digest] = name
            tree["run"]["dir"] = f"{runs_dir}{os.sep}{run_id}"  # = str(spec.out_dir / "runs" / run_id)
            runs.append(PlannedRun(run_id, name, pair.name, {**pair.overrides, **dict(zip(axis_keys, values))}, tree))
    return runs


def make_packs(runs: list[PlannedRun], pack_size: int) -> list[list[PlannedRun]]:
    """Group runs sharing backbones and data; split groups larger than ``pack_size``."""
    own = [needs_own_forward(r.config) is not None for r in runs]  # fine-tuned layers or DeepSpeed
    alone = [r for r, o in zip(runs, own) if o]                     # a pack of one each
    shared = [r for r, o in zip(runs, own) if not o]
    groups = [[shared[i] for i in g] for g in group_runs([r.config for r in shared])] + [[r] for r in alone]
    order = {id(r): i for i, r in enumerate(runs)}
    groups.sort(key=lambda g: order[id(g[0])])  # plan order, as before
    packs = []
    for members in groups:
        for i in range(0, len(members), pack_size):
            packs.append(members[i:i + pack_size])
    for index, pack in enumerate(packs):
        for run in pack:
            run.pack = index
    return packs

