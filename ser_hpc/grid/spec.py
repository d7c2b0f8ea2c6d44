"""The grid YAML: a base run config, backbone pairs, and axes of head hyperparameters.

```yaml
name: emospeech2024                 # results/<name>/
run_config: ../run/emospeech2024.yaml   # base run config, relative to this file
overrides: {train.epochs: 30}       # applied to every run (dotted or nested keys)
backbone_pairs:                     # one axis whose values set several keys at once
  - {name: roberta+xlsr, text: llange/xlm-roberta-large-spanish, speech: facebook/wav2vec2-xls-r-300m}
  - {name: xlsr, speech: facebook/wav2vec2-xls-r-300m, model.modalities: audio, model.fusion: late}
    # one encoder: its runs train that modality alone (model.modalities=audio is set for it
    # when nothing sets modalities; here the base run config says audio+text, so the entry says audio).
    # An entry's key beats an axis of the same key: the axis does not vary for its runs.
axes:                               # any run-config key; the grid is the cartesian product
  model.hidden_layers: [2, 3]
  train.weight_decay: [0.01, 0.1]
pack_size: 4                        # at most this many head-only variants train in one process
ensemble: {top_k: 3, method: mean}
cluster: configs/cluster/local.yaml # default cluster profile (relative to the working directory)
results_dir: results
```
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, flatten, read_yaml, valid_keys

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
GRID_KEYS = {"name", "run_config", "overrides", "backbone_pairs", "axes", "pack_size", "ensemble",
             "cluster", "results_dir", "description"}
PAIR_KEYS = {"name", "speech", "text"}
ENSEMBLE_METHODS = ("mean", "vote")


@dataclass
class BackbonePair:
    name: str
    overrides: dict[str, Any]  # dotted run-config keys this pair sets
    encoders: tuple[str, ...] = ("speech", "text")  # the encoders the entry names ("speech", "text" or both)


@dataclass
class GridSpec:
    name: str
    path: Path
    base: dict[str, Any]                      # the base run config tree (already merged)
    overrides: dict[str, Any]                 # dotted keys applied to every run
    pairs: list[BackbonePair]
    axes: dict[str, list[Any]]
    pack_size: int = 1
    ensemble: dict[str, Any] = field(default_factory=lambda: {"top_k": 3, "method": "mean"})
    cluster: str | None = None
    results_dir: str = "results"

    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved grid, saved as results/<name>/grid.yaml."""
        return {"name": self.name, "source": str(self.path), "base_run_config": self.base,
                "overrides": self.overrides,
                "backbone_pairs": [{"name": p.name, **p.overrides} for p in self.pairs],
                "axes": self.axes, "pack_size": self.pack_size, "ensemble": self.ensemble,
                "cluster": self.cluster, "results_dir": self.results_dir}


# Keys whose value is a mapping: data.label_map.exc=happy sets one entry.
MAPPING_KEYS = ("data.label_map.", "data.columns.")


def _check_keys(keys, where: str) -> None:
    known = set(valid_keys())
    for key in keys:
        if key not in known and not key.startswith(MAPPING_KEYS):
            raise ConfigError(f"{where}: unknown run-config key '{key}'. Valid keys: {', '.join(sorted(known))}")


# Run-config keys that the grid sets for each run itself.
GRID_OWNED = {"run.dir": "the grid gives every run its own folder, <results_dir>/<grid name>/runs/<run_id>; "
                         "to put the results elsewhere set results_dir in the grid file",
              "run.name": "the grid names each run after its backbone pair and axis values"}


def _check_overrides(path: Path, tree: dict[str, Any], cli: dict[str, Any], pairs: list[BackbonePair],
                     axes: dict[str, list[Any]]) -> None:
    """Refuse settings that expand() would silently replace."""
    yaml_over = flatten(tree.get("overrides") or {})
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
        setters = [p.name for p in pairs if key in p.overrides
                   and not (len(p.encoders) == 1 and key == f"model.{'text' if p.encoders[0] == 'speech' else 'speech'}.name")]
        if setters:
            raise ConfigError(
                f"the override {key}={value!r} would be ignored: backbone pair(s) {', '.join(setters)} in {path} "
                f"set {key}. Change it in the pair's entry in the grid file.")


NEEDS = {"speech": "audio", "text": "text"}   # encoder -> the modality it serves


def _one_encoder(path: Path, index: int, pair: BackbonePair, tree: dict[str, Any], base: dict[str, Any],
                 cli: dict[str, Any], axes: dict[str, list[Any]]) -> None:
    """A backbone entry naming one encoder (``{name: w2v, speech: PATH}``) trains that
    modality alone: its runs get model.modalities=audio (or text), and the other encoder's
    name is cleared so that nothing checks, fetches or hashes it. A modalities setting that
    needs the other encoder is refused, naming the entry and where the key was set (the
    entry's own keys beat the axes, which beat the overrides, which beat the base run config)."""
    (kind,) = pair.encoders
    other = "text" if kind == "speech" else "speech"
    alone = NEEDS[kind]
    key = "model.modalities"
    yaml_over = flatten(tree.get("overrides") or {})
    if key in pair.overrides:
        sources = [(pair.overrides[key], "the entry itself")]
    elif key in axes:
        sources = [(v, f"the axis {key} in {path}") for v in axes[key]]
    elif key in cli:
        sources = [(cli[key], f"the command-line override {key}={cli[key]}")]
    elif key in yaml_over:
        sources = [(yaml_over[key], f"overrides in {path}")]
    elif key in flatten(base):
        sources = [(flatten(base)[key], f"run_config {tree.get('run_config')}")]
    else:
        sources = []
    for value, where in sources:
        if NEEDS[other] in str(value).split("+"):
            raise ConfigError(
                f"{path}: backbone_pairs[{index}] '{pair.name}' names only a {kind} encoder, but {key} is "
                f"{value!r} ({where}), which needs a {other} encoder too. Give the entry a {other} encoder, or set "
                f"{key}: {alone} in the entry.")
    if not sources:
        pair.overrides[key] = alone
    pair.overrides[f"model.{other}.name"] = ""


def load_grid(path: str | Path, cli_overrides: dict[str, Any] | None = None) -> GridSpec:
    path = Path(path)
    tree = read_yaml(path)
    unknown = set(tree) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown grid key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(GRID_KEYS))}")
    name = str(tree.get("name") or path.stem)
    if not NAME_RE.match(name):
        raise ConfigError(f"{path}: grid name {name!r} must be 1-64 letters, digits, '.', '_', '+' or '-' "
                          "(it names a folder and the Slurm jobs)")
    base: dict[str, Any] = {}
    if tree.get("run_config"):
        base_path = (path.parent / tree["run_config"]).resolve()
        base = read_yaml(base_path)
    overrides = flatten(tree.get("overrides") or {})
    overrides.update(cli_overrides or {})
    _check_keys(overrides, f"{path}: overrides")

    pairs = []
    for i, raw in enumerate(tree.get("backbone_pairs") or []):
        where = f"{path}: backbone_pairs[{i}]"
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"{where}: each pair is a mapping with a 'name'")
        pair_over = {k: v for k, v in flatten({k: v for k, v in raw.items() if k not in PAIR_KEYS}).items()}
        _check_keys(pair_over, where)
        if raw.get("speech") is not None:
            pair_over["model.speech.name"] = str(raw["speech"])
        if raw.get("text") is not None:
            pair_over["model.text.name"] = str(raw["text"])
        encoders = tuple(k for k in ("speech", "text") if f"model.{k}.name" in pair_over)
        pairs.append(BackbonePair(str(raw["name"]), pair_over, encoders or ("speech", "text")))
    names = [p.name for p in pairs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: duplicate backbone pair name(s) {', '.join(sorted(dupes))}")
    if not pairs:
        pairs = [BackbonePair("base", {})]

    axes = tree.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: 'axes' must map run-config keys to lists of values")
    axes = flatten(axes) if any(isinstance(v, dict) for v in axes.values()) else dict(axes)
    _check_keys(axes, f"{path}: axes")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis '{key}' must be a non-empty list of values, got {values!r}")

    for i, pair in enumerate(pairs):
        if len(pair.encoders) == 1:
            _one_encoder(path, i, pair, tree, base, dict(cli_overrides or {}), axes)
    _check_overrides(path, tree, dict(cli_overrides or {}), pairs, axes)

    pack_size = tree.get("pack_size", 1)
    if not isinstance(pack_size, int) or pack_size < 1:
        raise ConfigError(f"{path}: pack_size must be an integer >= 1, got {pack_size!r}")
    ensemble = {"top_k": 3, "method": "mean", **(tree.get("ensemble") or {})}
    if set(ensemble) - {"top_k", "method", "selection"}:
        raise ConfigError(f"{path}: ensemble takes top_k, method and selection, got {', '.join(sorted(ensemble))}")
    if ensemble.get("selection", "topk") not in ("topk", "greedy"):
        raise ConfigError(f"{path}: ensemble.selection must be topk or greedy, got {ensemble['selection']!r}")
    if not isinstance(ensemble["top_k"], int) or ensemble["top_k"] < 1:
        raise ConfigError(f"{path}: ensemble.top_k must be an integer >= 1, got {ensemble['top_k']!r}")
    if ensemble["method"] not in ENSEMBLE_METHODS:
        raise ConfigError(f"{path}: ensemble.method must be one of {', '.join(ENSEMBLE_METHODS)}")
    return GridSpec(name=name, path=path, base=base, overrides=overrides, pairs=pairs, axes=axes,
                    pack_size=pack_size, ensemble=ensemble, cluster=tree.get("cluster"),
                    results_dir=str(tree.get("results_dir") or "results"))
