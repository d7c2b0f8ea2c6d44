"""Grid -> runs with stable ids -> packs.

A run id is a readable slug plus a short hash of the resolved run config, so the same
config always lands in the same folder (a relaunch finds its finished runs) and a changed
config never overwrites another's results.

A pack is the unit of one array task: runs that differ only in head settings, trained in
one process on one shared backbone forward per batch (``ser_hpc.train.packing``).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, apply_tree, Config, set_key, validate
from ..train.packing import needs_own_forward, shared_settings
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


def expand(spec: GridSpec) -> list[PlannedRun]:
    axis_keys = list(spec.axes)
    runs, seen = [], {}
    for pair in spec.pairs:
        for values in itertools.product(*(spec.axes[k] for k in axis_keys)):
            choice = dict(zip(axis_keys, values))
            name = " ".join([pair.name] + [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in choice.items()])
            where = f"{spec.path}: run '{name}'"
            cfg = apply_tree(Config(), spec.base, f"{spec.path}: run_config")
            for key, value in {**spec.overrides, **pair.overrides, **choice}.items():
                set_key(cfg, key, value, where)
            cfg.run.name = name
            try:
                validate(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            tree = cfg.to_dict()
            digest = config_hash(tree)
            slug = _slug(".".join([pair.name] + [f"{k.split('.')[-1]}{_fmt(v)}" for k, v in choice.items()]))
            run_id = f"{slug}-{digest}"
            if digest in seen:
                raise ConfigError(f"{spec.path}: runs '{seen[digest]}' and '{name}' resolve to the same config")
            seen[digest] = name
            tree["run"]["dir"] = str(spec.out_dir / "runs" / run_id)
            runs.append(PlannedRun(run_id, name, pair.name, {**pair.overrides, **choice}, tree))
    return runs


def make_packs(runs: list[PlannedRun], pack_size: int) -> list[list[PlannedRun]]:
    """Group runs sharing backbones and data; split groups larger than ``pack_size``."""
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        alone = needs_own_forward(run.config)  # fine-tuned layers or DeepSpeed: a pack of one
        groups.setdefault(run.run_id if alone else shared_settings(run.config), []).append(run)
    packs = []
    for members in groups.values():
        for i in range(0, len(members), pack_size):
            packs.append(members[i:i + pack_size])
    for index, pack in enumerate(packs):
        for run in pack:
            run.pack = index
    return packs

