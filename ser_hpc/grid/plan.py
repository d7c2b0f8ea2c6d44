"""Grid YAML -> runs with stable ids -> packs -> results/<grid>/plan.json.

The grid file's keys are described in README.md (sections "Grid YAML" and "Benchmarking
across corpora"); configs/grid/ has examples. A run id is a readable slug plus a short hash
of the resolved run config, so the same config always lands in the same folder (a relaunch
finds its finished runs) and a changed config never overwrites another's results. A pack is
the unit of one array task: runs that differ only in head settings, trained in one process
on one shared backbone forward per batch (``ser_hpc.train.packing``). plan.json holds every
run's full resolved config, so a task never re-reads the grid YAML.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic_io
from ..config import (Config, ConfigError, apply_tree, config_tree, copy_config, flatten, read_yaml, set_key,
                      valid_keys, validate)
from ..ensemble import settings
from ..train.packing import group_runs, needs_own_forward

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
GRID_KEYS = {"name", "run_config", "overrides", "backbone_pairs", "axes", "pack_size", "ensemble",
             "cluster", "results_dir", "description", "corpora", "cross_corpus"}
CORPUS_KEYS = {"name", "data", "folds"}
PAIR_KEYS = {"name", "speech", "text"}
MAPPING_KEYS = ("data.label_map.", "data.columns.")  # data.label_map.exc=happy sets one entry
NEEDS = {"speech": "audio", "text": "text"}          # encoder -> the modality it serves
OTHER = {"speech": "text", "text": "speech"}
# Run-config keys that the grid sets for each run itself.
GRID_OWNED = {"run.dir": "the grid gives every run its own folder, <results_dir>/<grid name>/runs/<run_id>; "
                         "to put the results elsewhere set results_dir in the grid file",
              "run.name": "the grid names each run after its backbone pair and axis values"}


@dataclass
class BackbonePair:
    name: str
    overrides: dict[str, Any]  # dotted run-config keys this pair sets
    encoders: tuple[str, ...] = ("speech", "text")  # the encoders the entry names


@dataclass
class CorpusEntry:
    """One corpus of a benchmark grid: its data keys (dotted, over the run config's) and the
    fold axis of this corpus alone (None: its own splits)."""
    name: str
    data: dict[str, Any]
    folds: list[int] | None = None


@dataclass
class GridSpec:
    """The grid file as read: base run config, overrides, pairs and axes (validated)."""
    name: str
    path: Path
    base: dict[str, Any]                      # the base run config tree
    overrides: dict[str, Any]                 # dotted keys applied to every run
    pairs: list[BackbonePair]
    axes: dict[str, list[Any]]
    pack_size: int = 1
    ensemble: dict[str, Any] = field(default_factory=lambda: dict(settings.DEFAULTS))
    cluster: str | None = None
    results_dir: str = "results"
    corpora: list[CorpusEntry] = field(default_factory=list)    # benchmark mode; empty: the run config's corpus
    cross_corpus: dict[str, list[str]] | None = None            # {"train": [...], "test": [...]}
    cli: dict[str, Any] = field(default_factory=dict)           # the command line's part of overrides
    run_config: str | None = None                               # as the grid file names it

    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved grid, saved as results/<name>/grid.yaml."""
        return {"name": self.name, "source": str(self.path), "base_run_config": self.base,
                "overrides": self.overrides, "backbone_pairs": [{"name": p.name, **p.overrides} for p in self.pairs],
                "axes": self.axes, "pack_size": self.pack_size, "ensemble": self.ensemble,
                "cluster": self.cluster, "results_dir": self.results_dir,
                **({"corpora": [{"name": c.name, "data": c.data, "folds": c.folds} for c in self.corpora],
                    "cross_corpus": self.cross_corpus} if self.corpora else {})}


@dataclass
class PlannedRun:
    """One run of the grid: exactly one entry of plan.json's "runs"."""
    run_id: str
    name: str
    pair: str
    pack: int
    overrides: dict[str, Any]   # the grid's choices for this run (pair keys + axis values)
    config: dict[str, Any]      # the full resolved run config
    corpus: str | None = None   # the corpus of a benchmark grid


# ------------------------------------------------------------------ the grid file

def _check_keys(keys, where: str) -> None:
    known = set(valid_keys())
    for key in keys:
        if key not in known and not key.startswith(MAPPING_KEYS):
            raise ConfigError(f"{where}: unknown run-config key '{key}'. Valid keys: {', '.join(sorted(known))}")


def _check_overrides(path: Path, yaml_over: dict, cli: dict, pairs: list[BackbonePair], axes: dict) -> None:
    """Refuse settings that expand() would silently replace."""
    for key, why in GRID_OWNED.items():
        if key in cli:
            raise ConfigError(f"{key}={cli[key]!r} cannot be given to a grid: {why}")
        if key in yaml_over or key in axes or any(key in p.overrides for p in pairs):
            raise ConfigError(f"{path}: {key} cannot be set in a grid: {why}")
    for key, value in cli.items():
        if key in axes:
            raise ConfigError(
                f"the override {key}={value!r} would be ignored: the grid's axis '{key}' ({path}) sets it for "
                f"every run, to {axes[key]!r}. Change the axis in the grid file (a one-value axis fixes it).")
        # A one-encoder entry clears the other encoder's name, which its runs never use.
        setters = [p.name for p in pairs if key in p.overrides and not (
            len(p.encoders) == 1 and key == f"model.{OTHER[p.encoders[0]]}.name")]
        if setters:
            raise ConfigError(
                f"the override {key}={value!r} would be ignored: backbone pair(s) {', '.join(setters)} in {path} "
                f"set {key}. Change it in the pair's entry in the grid file.")


def load_grid(path: str | Path, cli_overrides: dict[str, Any] | None = None) -> GridSpec:
    path, cli = Path(path), dict(cli_overrides or {})
    tree = read_yaml(path)
    unknown = set(tree) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown grid key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(GRID_KEYS))}")
    name = str(tree.get("name") or path.stem)
    if not NAME_RE.match(name):
        raise ConfigError(f"{path}: grid name {name!r} must be 1-64 letters, digits, '.', '_', '+' or '-' "
                          "(it names a folder and the Slurm jobs)")
    base = read_yaml((path.parent / tree["run_config"]).resolve()) if tree.get("run_config") else {}
    overrides = {**flatten(tree.get("overrides") or {}), **cli}
    _check_keys(overrides, f"{path}: overrides")
    pairs = []
    for i, raw in enumerate(tree.get("backbone_pairs") or []):
        where = f"{path}: backbone_pairs[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"{where}: each pair is a mapping with a 'name'")
        pair_over = flatten({k: v for k, v in raw.items() if k not in PAIR_KEYS})
        _check_keys(pair_over, where)
        for kind in ("speech", "text"):
            if raw.get(kind) is not None:
                pair_over[f"model.{kind}.name"] = str(raw[kind])
        encoders = tuple(k for k in ("speech", "text") if f"model.{k}.name" in pair_over)
        pairs.append(BackbonePair(str(raw["name"]), pair_over, encoders or ("speech", "text")))
    names = [p.name for p in pairs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: duplicate backbone pair name(s) {', '.join(sorted(dupes))}")
    pairs = pairs or [BackbonePair("base", {})]
    axes = tree.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: 'axes' must map run-config keys to lists of values")
    axes = flatten(axes) if any(isinstance(v, dict) for v in axes.values()) else dict(axes)
    _check_keys(axes, f"{path}: axes")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis '{key}' must be a non-empty list of values, got {values!r}")
    for pair in pairs:  # a one-encoder entry's runs never use the other encoder: nothing checks or hashes it
        if len(pair.encoders) == 1:
            pair.overrides[f"model.{OTHER[pair.encoders[0]]}.name"] = ""
    _check_overrides(path, flatten(tree.get("overrides") or {}), cli, pairs, axes)
    corpora = _corpora(path, tree)
    if corpora and "data.fold" in axes:
        raise ConfigError(f"{path}: with corpora, give each corpus its own folds (folds: [1, 2, 3] in its entry) "
                          "instead of the axis data.fold")
    cross = _cross_corpus(path, tree.get("cross_corpus"), corpora)
    for c in corpora:
        for key in set(c.data) & set(cli):
            raise ConfigError(f"the override {key}={cli[key]!r} would be ignored: corpus {c.name!r} in {path} sets "
                              f"{key}. Change it in the corpus's entry in the grid file.")
    pack_size = tree.get("pack_size", 1)
    if not isinstance(pack_size, int) or pack_size < 1:
        raise ConfigError(f"{path}: pack_size must be an integer >= 1, got {pack_size!r}")
    try:
        ensemble = settings.resolve(tree.get("ensemble") or {})
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return GridSpec(name, path, base, overrides, pairs, axes, pack_size, ensemble, tree.get("cluster"),
                    str(tree.get("results_dir") or "results"), corpora, cross, cli, tree.get("run_config"))


def _corpora(path: Path, tree: dict) -> list[CorpusEntry]:
    """The ``corpora:`` entries, checked: names, data keys, fold lists."""
    raw = tree.get("corpora") or []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'corpora' must be a list of {{name, data, folds}} entries")
    out: list[CorpusEntry] = []
    for i, entry in enumerate(raw):
        where = f"{path}: corpora[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: each corpus is a mapping with a 'name' (and 'data', optional 'folds')")
        unknown = set(entry) - CORPUS_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: name, data, folds")
        name = str(entry["name"])
        if not NAME_RE.match(name):
            raise ConfigError(f"{where}: corpus name {name!r} must be 1-64 letters, digits, '.', '_', '+' or '-'")
        if name in {c.name for c in out}:
            raise ConfigError(f"{path}: two corpora are named {name!r}; each corpus needs its own name")
        data = {f"data.{k}": v for k, v in flatten(entry.get("data") or {}).items()}
        _check_keys(data, f"{where} ({name}): data")
        folds = entry.get("folds")  # whether this corpus has them: the run config's validation says
        if folds is not None and (not isinstance(folds, list) or not folds or any(type(f) is not int or f < 1
                                                                                   for f in folds)):
            raise ConfigError(f"{where} ({name}): folds must be a list of fold numbers >= 1, got {folds!r}")
        out.append(CorpusEntry(name, data, folds))
    return out


def _cross_corpus(path: Path, raw: Any, corpora: list[CorpusEntry]) -> dict[str, list[str]] | None:
    if raw is None:
        return None
    names = [c.name for c in corpora]
    if not isinstance(raw, dict) or set(raw) != {"train", "test"}:
        raise ConfigError(f"{path}: cross_corpus must be {{train: [corpus, ...], test: [corpus, ...]}}, got {raw!r}")
    for side in ("train", "test"):
        if not isinstance(raw[side], list) or not raw[side]:
            raise ConfigError(f"{path}: cross_corpus.{side} must be a non-empty list of corpus names")
        unknown = [str(n) for n in raw[side] if str(n) not in names]
        if unknown:
            raise ConfigError(f"{path}: cross_corpus.{side} names {', '.join(unknown)}, which is not a corpus of this "
                              f"grid (corpora: {', '.join(names) or 'none'})")
    return {side: [str(n) for n in raw[side]] for side in ("train", "test")}


# ------------------------------------------------------------------ runs and packs

def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(config: dict[str, Any]) -> str:
    """Hash of everything that defines the run's result (not its name or folder)."""
    return hashlib.sha1(_canonical({k: v for k, v in config.items() if k != "run"}).encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")[:80] or "run"


def _fmt(value: Any) -> str:
    return _canonical(value) if isinstance(value, (list, dict)) else str(value)


def expand(spec: GridSpec) -> list[PlannedRun]:
    """Every run of the grid: its resolved, validated config and a stable id.

    The base run config is applied once, the overrides and each pair once per pair; each run
    copies only the config sections its axes set and sets its axis values (``set_key``'s
    key and type checks) before the full ``validate``. About 0.3 ms a run, where rebuilding
    every run from the YAML trees cost ~40 ms (benchmarks/plan_scale.py).
    """
    axis_keys = list(spec.axes)
    short = [k.split(".")[-1] for k in axis_keys]
    sections = [f.name for f in dataclasses.fields(Config)]
    touched = {k.split(".")[0] for k in axis_keys} | {"run"}  # run.name is set for every run
    if any(c.folds for c in spec.corpora):
        touched.add("data")  # a corpus's fold axis sets data.fold
    runs, seen = [], {}
    runs_dir = str(spec.out_dir / "runs")
    base = apply_tree(Config(), spec.base, f"{spec.path}: run_config")
    for corpus, (index, pair) in itertools.product(spec.corpora or [None], enumerate(spec.pairs)):
        pair_cfg, set_by = None, {}
        # An entry that sets an axis key pins it: the axis does not vary for that entry's runs.
        pair_axes = [[pair.overrides[k]] if k in pair.overrides else spec.axes[k] for k in axis_keys]
        if corpus is not None and corpus.folds:  # this corpus's fold axis
            pair_axes, keys, names = pair_axes + [corpus.folds], axis_keys + ["data.fold"], short + ["fold"]
        else:
            keys, names = axis_keys, short
        prefix = [corpus.name, pair.name] if corpus is not None else [pair.name]
        for values in itertools.product(*pair_axes):
            labels = [_fmt(v) for v in values]
            name = " ".join(prefix + [f"{k}={v}" for k, v in zip(names, labels)])
            where = f"{spec.path}: run '{name}'"
            if pair_cfg is None:  # errors name the pair's first run
                pair_cfg, set_by = _pair_config(spec, base, corpus, pair, where)
            cfg = object.__new__(Config)  # sections no axis sets are shared with the pair (read only)
            for section in sections:
                value = getattr(pair_cfg, section)
                object.__setattr__(cfg, section, copy_config(value) if section in touched else value)
            for key, value in zip(keys, values):
                set_key(cfg, key, value, where)
            cfg.run.name = name
            if len(pair.encoders) == 1:
                _fits_one_encoder(spec, index, pair, cfg.model.modalities, set_by["model.modalities"])
            tree = config_tree(cfg)
            try:
                validate(cfg, tree)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            digest = config_hash(tree)
            run_id = f"{_slug('.'.join(prefix + [f'{k}{v}' for k, v in zip(names, labels)]))}-{digest}"
            if digest in seen:
                raise ConfigError(f"{spec.path}: runs '{seen[digest]}' and '{name}' resolve to the same config")
            seen[digest] = name
            tree["run"]["dir"] = f"{runs_dir}{os.sep}{run_id}"  # = str(spec.out_dir / "runs" / run_id)
            runs.append(PlannedRun(run_id, name, pair.name, -1, {**pair.overrides, **dict(zip(keys, values))},
                                   tree, corpus.name if corpus is not None else None))
    return runs


def _pair_config(spec: GridSpec, base: Config, corpus: CorpusEntry | None, pair: BackbonePair,
                 where: str) -> tuple[Config, dict[str, str]]:
    """The config a pair's runs start from (before their axis values), and where each key was
    set: the layers apply lowest precedence first, so the last to set a key decides."""
    layers = [(f"run_config {spec.run_config}", flatten(spec.base)),  # applied once, as ``base``
              (f"overrides in {spec.path}", {k: v for k, v in spec.overrides.items() if k not in spec.cli}),
              ("the command-line override", spec.cli),
              (f"corpus {corpus.name} in {spec.path}" if corpus else "", corpus.data if corpus else {}),
              ("the entry itself", pair.overrides)]
    cfg, set_by = copy_config(base), {}
    for i, (source, keys) in enumerate(layers):
        for key, value in keys.items():
            if i:
                set_key(cfg, key, value, where)
            set_by[key] = source
    set_by.update({k: f"the axis {k} in {spec.path}" for k in spec.axes if k not in pair.overrides})
    if len(pair.encoders) == 1 and "model.modalities" not in set_by:  # one encoder: that modality alone
        cfg.model.modalities, set_by["model.modalities"] = NEEDS[pair.encoders[0]], "the entry's encoder"
    return cfg, set_by


def _fits_one_encoder(spec: GridSpec, index: int, pair: BackbonePair, modalities: str, source: str) -> None:
    (kind,) = pair.encoders
    other = OTHER[kind]
    if NEEDS[other] in modalities.split("+"):
        raise ConfigError(
            f"{spec.path}: backbone_pairs[{index}] '{pair.name}' names only a {kind} encoder, but model.modalities is "
            f"{modalities!r} ({source}), which needs a {other} encoder too. Give the entry a {other} encoder, or set "
            f"model.modalities: {NEEDS[kind]} in the entry.")


def make_packs(runs: list[PlannedRun], pack_size: int) -> list[list[PlannedRun]]:
    """Group runs sharing backbones and data; split groups larger than ``pack_size``. A run
    that fine-tunes backbone layers or uses DeepSpeed is a pack of its own."""
    own = [needs_own_forward(r.config) is not None for r in runs]
    shared = [r for r, o in zip(runs, own) if not o]
    groups = [[shared[i] for i in g] for g in group_runs([r.config for r in shared])]
    groups += [[r] for r, o in zip(runs, own) if o]
    order = {id(r): i for i, r in enumerate(runs)}
    groups.sort(key=lambda g: order[id(g[0])])  # plan order
    packs = [members[i:i + pack_size] for members in groups for i in range(0, len(members), pack_size)]
    for index, pack in enumerate(packs):
        for run in pack:
            run.pack = index
    return packs


# ------------------------------------------------------------------ plan.json

def build_plan(spec: GridSpec, runs: list[PlannedRun], packs: list[list[PlannedRun]]) -> dict[str, Any]:
    return {"grid_name": spec.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "launch_dir": os.getcwd(),  # run configs hold paths relative to it
            "results_dir": str(spec.out_dir), "ensemble": spec.ensemble,
            "packs": [[r.run_id for r in pack] for pack in packs],
            "runs": [{"run_id": r.run_id, "name": r.name, "pair": r.pair, "pack": r.pack,
                      "overrides": r.overrides, "config": r.config, **({"corpus": r.corpus} if r.corpus else {})}
                     for r in runs],
            **({"corpora": [c.name for c in spec.corpora], "cross_corpus": spec.cross_corpus} if spec.corpora else {})}


def write_plan(plan: dict[str, Any], out_dir: Path) -> Path:
    """One pack and one run per line: indented JSON goes through the pure-Python encoder
    (seconds for 10,000 runs); each line here is one C-encoded dump."""
    def value(key: str, obj: Any) -> str:
        if key in ("packs", "runs") and isinstance(obj, list) and obj:
            return "[\n" + ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in obj) + "\n]"
        return json.dumps(obj, ensure_ascii=False)
    path = Path(out_dir) / "plan.json"
    atomic_io.write_text(path, "{\n" + ",\n".join(f"{json.dumps(k)}: {value(k, v)}" for k, v in plan.items()) + "\n}\n")
    return path
