"""The run configuration: one typed tree of dataclasses, loaded from YAML files plus
``key=value`` overrides.

Every key a user can set is a dataclass field, so a typo or a wrong type is caught
before anything runs, and the error lists the valid keys. The resolved config is what
gets saved with a run and hashed into its id by the grid launcher.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


# The keys with a fixed set of values: a Literal field type is checked when the key is set.
CorpusFormat = Literal["emospeech", "manifest", "emobox"]
Modalities = Literal["audio+text", "audio", "text"]
# model.<speech|text>.layers: "weighted" | "weighted_all" | "last" | "every_N", or a list of hidden-state indices
LayerChoice = str | list[int]
LAYER_MODES = ("weighted", "weighted_all", "last")
Fusion = Literal["early", "late"]
Pooling = Literal["attention", "mean", "attentive_stats"]
LrSchedule = Literal["plateau", "cosine", "linear"]
ClassWeights = Literal["inverse", "sqrt_inverse", "none"]
Strategy = Literal["single", "ddp", "deepspeed"]
CacheDtype = Literal["float32", "float16", "bfloat16"]
FeatureMode = Literal["online", "cached"]
# Values that were valid once: the error says what replaced them.
RETIRED = {("train.class_weights", "inverse_normalized"):
           "train.class_weights 'inverse_normalized' was removed: the loss is a weighted mean, so rescaling the "
           "weights changed nothing (it was identical to 'inverse'); use 'inverse', 'sqrt_inverse' or 'none'"}


@dataclass
class DataConfig:
    format: CorpusFormat = "emospeech"            # "emospeech" (train_csv/dev_csv/test_csv), "manifest" (data.manifest), "emobox" (data.root)
    labels: list[str] | None = None      # ordered class names; null = derive (emospeech: its six; emobox: label_map.json; manifest: sorted train labels)
    label_map: dict[str, str | None] | None = None  # raw label -> class name; several may map to one; null drops the clip
    manifest: str = ""                   # format=manifest: a .csv, .tsv or .jsonl file, one clip per row
    columns: dict[str, str] | None = None  # format=manifest: logical name (audio, label, text, speaker, split, id) -> column
    root: str = ""                       # format=emobox: EmoBox's data/<corpus>/ folder (<corpus>.jsonl, label_map.json, fold_K/)
    fold: int = 0                        # test fold (1..K) of EmoBox folds or of data.folds; 0 = none (emobox with one fold: that one)
    folds: int = 0                       # format=manifest: generate K folds, stratified by label and grouped by speaker
    train_csv: str = ""                  # EmoSPeech CSV: id,label,transcription
    audio_dir: str = ""                  # folder holding the audio files (EmoSPeech: named by `id`; manifest/emobox: relative paths start here)
    dev_csv: str | None = None           # explicit dev split; otherwise split from train_csv
    dev_fraction: float = 0.16           # the authors' 480 of 3000
    split_seed: int = 1234
    test_csv: str | None = None          # id,transcription (label column optional)
    test_audio_dir: str | None = None    # defaults to audio_dir
    test_labels_csv: str | None = None   # gold id,label for the test CSV, when known
    sample_rate: int = 16000             # must match the speech backbone
    crop_seconds: float = 5.5            # random training crop; shorter clips are repeat-padded; 0 = whole clips
    augment_prob: float = 0.3
    speeds: list[float] = field(default_factory=lambda: [0.9, 1.1])
    snr_db: list[float] = field(default_factory=lambda: [15.0, 25.0])
    noise_dir: str | None = None         # e.g. MUSAN noise; generated noise when unset
    rir_dir: str | None = None           # e.g. RIRS_NOISES; synthetic decaying RIR when unset
    prepared_dir: str | None = None     # 16 kHz audio decoded once (jobs/prepare_audio.py); decode on the fly if unset
    features_dir: str | None = None     # frozen-backbone feature store (jobs/extract_features.py); for train.features=cached
    cached_augment_copies: int = 0       # cached mode: augmented views per train clip, stored beside the clean one
    features_max_gb: float = 250.0       # a grid whose feature stores would take more is refused before submission (0 = no limit)
    features_shard_hours: float = 10.0   # a corpus with more audio is extracted in shards of this many hours, one array task each (0 = one shard)
    max_text_tokens: int = 128
    num_workers: int = 0
    eval_batch_size: int = 8


@dataclass
class EncoderConfig:
    name: str = ""          # hub id or local folder, loaded with AutoModel.from_pretrained
    layers: LayerChoice = "last"  # "weighted": softmax weights over the transformer layers (the authors'); "weighted_all" adds hidden_states[0]; "last"; "every_N": weights over layers N, 2N, ...; a list [6, 12, 18, 24]: weights over those (a feature store then holds only the layers its heads read)
    finetune_top_layers: int = 0  # >0 unfreezes the top N transformer layers (trained at train.backbone_lr)


@dataclass
class ModelConfig:
    modalities: Modalities = "audio+text"  # "audio+text", "audio" or "text"
    speech: EncoderConfig = field(default_factory=lambda: EncoderConfig(layers="weighted"))
    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(layers="last"))
    fusion: Fusion = "early"         # "early": one pooling over audio frames + text tokens (the paper); "late": pool each, concatenate
    pooling: Pooling = "attention"   # "attention" (the paper), "mean", "attentive_stats" (attention-weighted mean + std)
    fusion_dim: int | None = None    # common width; default: the wider encoder's
    fusion_attention_heads: int = 0  # >0 adds one multi-head self-attention layer before pooling
    head_width: int = 512
    hidden_layers: int = 2           # N extra Linear+LN+GELU+Dropout blocks in the MLP head
    dropout: float = 0.1


@dataclass
class TrainConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_accum_steps: int = 1
    epochs: int = 20
    max_steps: int = 0               # >0 overrides epochs
    eval_every: int = 100            # optimizer steps between dev evaluations
    lr_schedule: LrSchedule = "plateau"  # "plateau" (the paper: decay on no improvement), "cosine" or "linear" decay to 0
    warmup_steps: int = 0            # linear warmup from 0 over this many steps (every schedule)
    lr_decay: float = 0.9            # plateau: lr *= lr_decay after lr_patience evaluations without improvement
    lr_patience: int = 10
    early_stop_patience: int = 0     # stop after this many evaluations without improvement; 0 = never
    class_weights: ClassWeights = "inverse"  # "inverse" (the paper: N / n_c), "sqrt_inverse" (sqrt(N / n_c): milder on rare classes), "none"
    max_grad_norm: float = 0.0       # 0 = no clipping
    seed: int = 1234
    bf16: bool = False               # bf16 autocast for backbones and heads
    device: str = "auto"             # "auto", "cpu", "cuda", "cuda:1", ...
    log_every: int = 20
    strategy: Strategy = "single"    # "single", "ddp" (torchrun / srun ranks) or "deepspeed"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    backbone_lr: float = 1e-5        # learning rate of unfrozen backbone layers
    checkpoint_every: int = 0        # optimizer steps between resumable checkpoints; 0 = at each evaluation
    max_requeues: int = 3            # Slurm requeues after time-limit warnings before the run fails
    eval_cache: bool = True          # keep dev backbone outputs in memory (frozen backbones; computed once per task)
    eval_cache_dtype: CacheDtype = "float32"  # "float32" (exact), or "float16"/"bfloat16" to halve the memory
    features: FeatureMode = "online"  # "online": backbones run every step (the paper); "cached": heads train on data.features_dir


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = ""                    # the run folder; jobs/train.py and the grid launcher set it


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return config_tree(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


_SCALARS = frozenset({str, int, float, bool, type(None)})
_FIELDS: dict[type, tuple[str, ...]] = {}   # config dataclass -> its field names, in order


def _fields_of(obj: Any) -> tuple[str, ...] | None:
    """The field names when ``obj`` is a config dataclass instance, else None."""
    names = _FIELDS.get(type(obj))
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
    return names


def _rebuild(obj: Any, as_dict: bool) -> Any:
    """A config node rebuilt: containers and dataclasses new, scalars shared; dataclasses
    become dicts (``as_dict``) or copies of themselves."""
    kind = type(obj)
    if kind is list:
        return [v if type(v) in _SCALARS else _rebuild(v, as_dict) for v in obj]
    if kind is dict:
        return {k: v if type(v) in _SCALARS else _rebuild(v, as_dict) for k, v in obj.items()}
    names = None if kind in _SCALARS else _fields_of(obj)
    if names is None:
        return obj
    values = {n: v if type(v) in _SCALARS else _rebuild(v, as_dict) for n in names for v in (getattr(obj, n),)}
    if as_dict:
        return values
    new = object.__new__(kind)
    new.__dict__.update(values)  # the config dataclasses are plain (no slots, not frozen)
    return new


def config_tree(obj: Any) -> Any:
    """``dataclasses.asdict`` for a config node without its per-value deepcopy (same dict,
    several times faster: a 10,000-run grid converts every run's config)."""
    return _rebuild(obj, True)


def copy_config(obj: Any) -> Any:
    """A deep copy of a config node (dataclasses and containers copied, scalars shared)."""
    return _rebuild(obj, False)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """A config class's field types, resolved once: typing.get_type_hints evaluates every
    string annotation again on each call, and set_key runs for every key of every run."""
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _valid_keys(cls: type, prefix: str) -> tuple[str, ...]:
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _valid_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return tuple(keys)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. ``train.lr``."""
    return list(_valid_keys(cls, prefix))


def _unknown_key(key: str, where: str, cls: type = Config) -> ConfigError:
    keys = valid_keys(cls)
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' ({where}).{hint}\nValid keys: {', '.join(keys)}")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check ``value`` against a field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, str) and (key, value) in RETIRED:
            raise ConfigError(RETIRED[(key, value)])
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key '{key}' ({where}) must be one of {', '.join(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value fits; the last one's error otherwise
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        return _coerce(value, inner[-1], key, where)
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' ({where}) must be a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{key}.{k}", where) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' ({where}) must be a list, got {value!r}")
        return [_coerce(v, item, key, where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "5e-5" (no dot) as a string; that spelling is common for learning rates.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a model name that YAML read as a number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' ({where}) must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _is_mapping(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is dict for a in typing.get_args(hint))
    return typing.get_origin(hint) is dict


def set_key(cfg: Any, key: str, value: Any, where: str = "override") -> None:
    """Set a dotted key on a config tree (a Config, or another typed dataclass such as a
    cluster profile), validating key and type."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(node) or part not in _hints(type(node)):
            raise _unknown_key(key, where, type(cfg))
        hint = _hints(type(node))[part]
        if _is_mapping(hint):
            # data.label_map.exc=happy: the rest of the key (dots included) is one mapping key
            mapping = dict(getattr(node, part) or {})
            mapping[".".join(parts[i + 1:])] = value
            setattr(node, part, _coerce(mapping, hint, ".".join(parts[:i + 1]), where))
            return
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node):
        raise _unknown_key(key, where, type(cfg))
    hints = _hints(type(node))
    last = parts[-1]
    if last not in hints:
        raise _unknown_key(key, where, type(cfg))
    if dataclasses.is_dataclass(hints[last]):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' ({where}) is a section; give a mapping or set its keys")
        for sub, v in value.items():
            set_key(cfg, f"{key}.{sub}", v, where)
        return
    setattr(node, last, _coerce(value, hints[last], key, where))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", 1e-4). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has no key (key=value, e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        what = "empty" if not path.read_text(encoding="utf-8").strip() else "only comments"
        raise ConfigError(f"{path}: the file is {what}: no settings in it (a YAML mapping of keys is expected)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_tree(cfg: Config, tree: dict[str, Any], where: str) -> Config:
    for key, value in flatten(tree).items():
        set_key(cfg, key, value, where)
    return cfg


def load_config(files: list[str | Path] = (), overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- base tree <- each YAML file in order <- ``key=value`` overrides."""
    cfg = Config()
    if base:
        apply_tree(cfg, base, "base")
    for path in files:
        apply_tree(cfg, read_yaml(path), str(path))
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value, f"override '{text}'")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any], where: str = "config") -> Config:
    cfg = apply_tree(Config(), tree, where)
    validate(cfg)
    return cfg


def _validate_corpus(data: DataConfig) -> None:
    """The keys each corpus format needs; the files themselves are checked by ser_hpc.data."""
    needs = {"manifest": "manifest", "emobox": "root"}.get(data.format)
    if needs and not getattr(data, needs):
        raise ConfigError(f"data.format={data.format} needs data.{needs}")
    if data.folds == 1:
        raise ConfigError("config key 'data.folds' must be 0 (no folds) or >= 2, got 1")
    if data.folds and data.format != "manifest":
        raise ConfigError(f"data.folds generates folds for a manifest; data.format is {data.format}"
                          + (" (EmoBox publishes its own folds: choose one with data.fold)" if data.format == "emobox" else ""))
    if data.folds and data.fold > data.folds:
        raise ConfigError(f"data.fold={data.fold} but data.folds={data.folds}: folds are numbered 1..{data.folds}")
    if data.fold and data.format == "emospeech":
        raise ConfigError(f"data.fold={data.fold} but this corpus has no folds (data.format emospeech has fixed "
                          "splits); data.fold selects a test fold of an EmoBox corpus or of a manifest with data.folds")
    if data.fold and data.format == "manifest" and not data.folds:
        raise ConfigError(f"data.fold={data.fold} but this corpus has no folds (data.format manifest without "
                          "data.folds): give the manifest data.folds: K to generate K folds")
    if data.labels is not None:
        if not data.labels:
            raise ConfigError("config key 'data.labels' is an empty list; give the class names, or null to derive them")
        repeated = sorted({x for x in data.labels if data.labels.count(x) > 1})
        if repeated:
            raise ConfigError(f"config key 'data.labels' repeats {', '.join(repeated)}")
        if len(data.labels) < 2:
            raise ConfigError(f"config key 'data.labels' needs at least 2 classes, got {data.labels}")


def _validate_layers(value: Any, key: str) -> None:
    if isinstance(value, list):
        if not value or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
            raise ConfigError(f"config key '{key}' must list hidden-state indices (integers >= 0), got {value!r}")
        return
    if value in LAYER_MODES or (value.startswith("every_") and value[6:].isdigit() and int(value[6:]) >= 1):
        return
    raise ConfigError(f"config key '{key}' must be one of {', '.join(LAYER_MODES)}, every_N (N >= 1) or a list of "
                      f"layer indices like [6, 12, 18, 24], got {value!r}")


def validate(cfg: Config, tree: dict[str, Any] | None = None) -> None:
    """Value checks that types alone cannot express (``tree``: ``cfg.to_dict()`` when the
    caller already has it)."""
    flat = flatten(cfg.to_dict() if tree is None else tree)
    for key, value in flat.items():  # NaN passes every comparison below; inf passes "> 0"
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    positive = ["data.sample_rate", "data.max_text_tokens", "data.eval_batch_size",
                "model.head_width", "train.lr", "train.batch_size", "train.grad_accum_steps",
                "train.eval_every", "train.log_every"]
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    for key in ["model.hidden_layers", "model.fusion_attention_heads", "train.max_steps", "train.epochs",
                "model.speech.finetune_top_layers", "model.text.finetune_top_layers", "train.checkpoint_every",
                "train.max_requeues", "train.warmup_steps", "data.fold", "data.folds", "data.crop_seconds", "data.cached_augment_copies",
                "data.features_max_gb", "data.features_shard_hours",
                "train.weight_decay", "train.early_stop_patience", "train.max_grad_norm", "data.num_workers"]:
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {flat[key]!r}")
    for key in ["data.augment_prob", "model.dropout", "data.dev_fraction"]:
        if not 0 <= flat[key] < 1 or (key == "data.dev_fraction" and flat[key] == 0 and not cfg.data.dev_csv):
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {flat[key]!r}")
    _validate_corpus(cfg.data)
    if not 0 < cfg.train.lr_decay <= 1:
        raise ConfigError(f"config key 'train.lr_decay' must be in (0, 1], got {cfg.train.lr_decay!r}")
    if len(cfg.data.snr_db) != 2 or cfg.data.snr_db[0] > cfg.data.snr_db[1]:
        raise ConfigError(f"config key 'data.snr_db' must be [low, high], got {cfg.data.snr_db!r}")
    if any(s <= 0 for s in cfg.data.speeds):
        raise ConfigError(f"config key 'data.speeds' must hold positive factors, got {cfg.data.speeds!r}")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("set train.epochs or train.max_steps above 0")
    if cfg.model.fusion_dim is not None and cfg.model.fusion_dim <= 0:
        raise ConfigError(f"config key 'model.fusion_dim' must be > 0, got {cfg.model.fusion_dim!r}")
    if cfg.model.fusion_attention_heads and cfg.model.fusion_dim and cfg.model.fusion_dim % cfg.model.fusion_attention_heads:
        raise ConfigError("model.fusion_dim must be divisible by model.fusion_attention_heads")
    if cfg.train.features == "cached":
        if not cfg.data.features_dir:
            raise ConfigError("train.features=cached needs data.features_dir (where the feature store is written)")
        tuned = [k for k in ("speech", "text") if getattr(cfg.model, k).finetune_top_layers]
        if tuned:
            raise ConfigError(f"train.features=cached cannot fine-tune backbone layers (model.{tuned[0]}."
                              "finetune_top_layers > 0): cached features come from the frozen backbone and would "
                              "be stale after the first step; use train.features=online")
        if cfg.train.strategy == "deepspeed":
            raise ConfigError("train.features=cached trains heads only: use train.strategy single or ddp, not deepspeed")
    for kind in ("speech", "text"):
        _validate_layers(getattr(cfg.model, kind).layers, f"model.{kind}.layers")
    if "audio" in cfg.model.modalities.split("+") and not cfg.model.speech.name:
        raise ConfigError("config key 'model.speech.name' is required for the audio modality")
    if "text" in cfg.model.modalities.split("+") and not cfg.model.text.name:
        raise ConfigError("config key 'model.text.name' is required for the text modality")


def key_help() -> list[str]:
    """``key = default  # what it means`` for every key, from the comments in this file
    (``jobs/train.py --keys``): one place documents a key, beside its field."""
    import inspect
    import re
    comments: dict[str, str] = {}
    field_re = re.compile(r"^\s+(\w+):[^#]*#\s*(.*)$")

    def walk(cls: type, prefix: str) -> None:
        for line in inspect.getsource(cls).splitlines():
            m = field_re.match(line)
            if m:
                comments[prefix + m.group(1)] = m.group(2)
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")

    walk(Config, "")
    flat = flatten(Config().to_dict())
    out = []
    for key in valid_keys():
        default = json_default = flat.get(key)
        if default == "":
            json_default = '""'
        elif isinstance(default, (dict, list)) or default is None:
            json_default = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        text = f"{key} = {json_default}"
        if key in comments:
            text += f"  # {comments[key]}"
        out.append(text)
    return out
