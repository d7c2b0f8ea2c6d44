"""emotion2vec / emotion2vec+ as a frozen speech encoder, without fairseq or FunASR.

The checkpoints (hub: emotion2vec/emotion2vec_base, emotion2vec/emotion2vec_plus_{seed,base,
large}; ModelScope: iic/...) are FunASR folders: ``model.pt`` (a state dict, possibly under
a "model" / "state_dict" / "model_state_dict" key) and ``config.yaml`` (``model: Emotion2vec``
and its ``model_conf``). This module is a port of the inference path of FunASR's
``funasr/models/emotion2vec`` (data2vec 2.0 audio, itself from fairseq):

    waveform (16 kHz) -> layer norm over the clip's samples (``model_conf.normalize``)
    -> conv feature extractor (7 convs, 320x down: 50 frames/s) -> LayerNorm + Linear
    -> + relative positional conv stack -> prepend ``num_extra_tokens`` learned tokens
    -> context encoder ("prenet": LayerNorm, ``prenet_depth`` blocks)       = state 0
    -> ``depth`` transformer blocks (ALiBi attention bias)                   = states 1..depth

States exclude the extra tokens, so frame i of every state is audio frame i. States 1..depth
are the blocks' outputs (the ``x`` each block returns; FunASR's ``layer_results`` are
something else, the pre-residual FFN outputs used as pretraining targets). The last state
equals FunASR's ``extract_features(...)["x"]`` (a final LayerNorm is applied to it only when
``layer_norm_first``, as FunASR does; emotion2vec is post-LN and has none).

Verified against FunASR's own module (tests/test_emotion2vec.py): same state dict, same clip
-> every state identical (float32, CPU); each clip of a padded batch -> within 1e-5 of FunASR
on that clip alone (float32 kernel noise from the batch shape, ~1e-6 relative). FunASR scores
clip by clip; its batched path with a padding mask is not padding-invariant (its positional
convs read the padded frames). Here a clip's valid frames are the same alone and in a batch:
the waveform is normalised over each clip's own samples, attention never reads padded
frames, and padded frames are zeroed before each positional conv (the zero padding the clip
alone gets). Feature extractors with a group norm (``extractor_mode: default``) mix
statistics over the whole padded input: those run clip by clip.

Loading is strict about the encoder: every one of its tensors must be in model.pt with the
shape config.yaml implies, and model.pt may hold no other tensor in the encoder's namespace
(``blocks.*``, ``norm.*``, ``modality_encoders.AUDIO.*``). Tensors outside it - the pretraining
decoder, the "+" models' emotion classification head ``proj`` - are not used (``ignored_keys``).
Learned ALiBi (``learned_alibi``), which FunASR cannot run either, is refused.
"""
from __future__ import annotations

import ast
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.pt"
MODEL_CLASS = "Emotion2vec"  # FunASR's registered model class (config.yaml `model:`)
SAMPLE_RATE = 16000
# model.pt keys under these prefixes are the encoder's: each must be one of its tensors, with
# the shape config.yaml implies. Other keys (the pretraining decoder, the "+" models' emotion
# head `proj`, EMA copies, ...) are not used and are skipped (listed in `ignored_keys`).
ENCODER_KEY_PREFIXES = ("modality_encoders.AUDIO.", "blocks.", "norm.")
NOT_ENCODER_KEY_PREFIXES = ("modality_encoders.AUDIO.decoder.",)


class Emotion2VecError(ValueError):
    """An emotion2vec folder cannot be loaded or used; the message names the file."""


# --------------------------------------------------------------------------- config

def _conv_spec(text: str, where: str) -> tuple[tuple[int, int, int], ...]:
    """Parse ``feature_encoder_spec`` ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...") without
    eval: only int/list/tuple literals, + and *."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)[:60]}")
    try:
        spec = ev(ast.parse(str(text).strip(), mode="eval"))
        layers = tuple(tuple(int(v) for v in layer) for layer in spec)
        if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
            raise ValueError("expected a non-empty list of (channels, kernel, stride)")
    except (SyntaxError, ValueError, TypeError) as exc:
        raise Emotion2VecError(f"{where}: feature_encoder_spec {text!r} is not a list of "
                               f"(channels, kernel, stride) tuples: {exc}") from None
    return layers


@dataclass(frozen=True)
class Emotion2VecConfig:
    """What the encoder's structure depends on, read from config.yaml's ``model_conf``."""

    embed_dim: int
    num_heads: int
    mlp_ratio: float
    depth: int
    norm_eps: float
    norm_affine: bool
    layer_norm_first: bool
    normalize: bool
    conv_layers: tuple[tuple[int, int, int], ...]
    extractor_mode: str
    conv_pos_width: int
    conv_pos_depth: int
    conv_pos_groups: int
    conv_pos_pre_ln: bool
    prenet_depth: int
    model_depth: int
    num_extra_tokens: int
    use_alibi: bool
    num_alibi_heads: int
    alibi_scale: float
    alibi_scale_per_layer: bool
    alibi_scale_per_head: bool

    @classmethod
    def from_model_conf(cls, conf: dict, where: str = "config.yaml") -> "Emotion2VecConfig":
        if not isinstance(conf, dict):
            raise Emotion2VecError(f"{where}: model_conf is not a mapping")
        audio = ((conf.get("modalities") or {}).get("audio")) if isinstance(conf.get("modalities"), dict) else None
        if not isinstance(audio, dict):
            raise Emotion2VecError(f"{where}: model_conf.modalities.audio is missing (not an emotion2vec config)")

        def need(d, key, kind, prefix):
            if d.get(key) is None:
                raise Emotion2VecError(f"{where}: {prefix}{key} is missing")
            try:
                return kind(d[key])
            except (TypeError, ValueError):
                raise Emotion2VecError(f"{where}: {prefix}{key} = {d[key]!r} is not a {kind.__name__}") from None

        top = lambda key, kind: need(conf, key, kind, "model_conf.")  # noqa: E731
        aud = lambda key, kind: need(audio, key, kind, "model_conf.modalities.audio.")  # noqa: E731
        use_alibi = bool(audio.get("use_alibi_encoder", False))
        if use_alibi and audio.get("learned_alibi"):
            raise Emotion2VecError(f"{where}: learned_alibi is not supported (FunASR cannot run it either)")
        cfg = cls(
            embed_dim=top("embed_dim", int), num_heads=top("num_heads", int), mlp_ratio=top("mlp_ratio", float),
            depth=top("depth", int), norm_eps=top("norm_eps", float), norm_affine=top("norm_affine", bool),
            layer_norm_first=bool(conf.get("layer_norm_first", False)), normalize=bool(conf.get("normalize", False)),
            conv_layers=_conv_spec(aud("feature_encoder_spec", str), where),
            extractor_mode=str(audio.get("extractor_mode", "layer_norm")),
            conv_pos_width=aud("conv_pos_width", int), conv_pos_depth=aud("conv_pos_depth", int),
            conv_pos_groups=aud("conv_pos_groups", int), conv_pos_pre_ln=bool(audio.get("conv_pos_pre_ln", False)),
            prenet_depth=int(audio.get("prenet_depth", 0) or 0),
            model_depth=int(audio.get("model_depth", conf.get("depth")) or 0),
            num_extra_tokens=int(audio.get("num_extra_tokens", 0) or 0),
            use_alibi=use_alibi,
            num_alibi_heads=aud("num_alibi_heads", int) if use_alibi else 0,
            alibi_scale=float(audio.get("alibi_scale", 1.0)),
            alibi_scale_per_layer=bool(audio.get("learned_alibi_scale_per_layer", False)),
            alibi_scale_per_head=bool(audio.get("learned_alibi_scale_per_head", False)),
        )
        problems = []
        if cfg.extractor_mode not in ("default", "layer_norm"):
            problems.append(f"extractor_mode {cfg.extractor_mode!r} is not 'default' or 'layer_norm'")
        if cfg.embed_dim % cfg.num_heads:
            problems.append(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.embed_dim % cfg.conv_pos_groups:
            problems.append(f"embed_dim {cfg.embed_dim} is not divisible by conv_pos_groups {cfg.conv_pos_groups}")
        if cfg.use_alibi and not 0 < cfg.num_alibi_heads <= cfg.num_heads:
            problems.append(f"num_alibi_heads {cfg.num_alibi_heads} is not in 1..num_heads ({cfg.num_heads})")
        if cfg.use_alibi and cfg.alibi_scale_per_layer and cfg.model_depth != cfg.depth:
            problems.append(f"modalities.audio.model_depth {cfg.model_depth} != depth {cfg.depth}")
        if min(cfg.depth, cfg.conv_pos_depth) < 1 or cfg.prenet_depth < 0 or cfg.num_extra_tokens < 0:
            problems.append("depth and conv_pos_depth must be >= 1, prenet_depth and num_extra_tokens >= 0")
        if problems:
            raise Emotion2VecError(f"{where}: " + "; ".join(problems))
        return cfg

    @property
    def pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise Emotion2VecError(f"emotion2vec config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise Emotion2VecError(f"{path}: not readable YAML: {exc}") from None
    if not isinstance(data, dict):
        raise Emotion2VecError(f"{path}: expected a mapping with 'model' and 'model_conf', got {type(data).__name__}")
    return data


def read_emotion2vec_config(path: str | Path) -> Emotion2VecConfig:
    """Parse a FunASR emotion2vec ``config.yaml`` (the file, or its folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CONFIG_FILE
    data = _read_yaml(path)
    model = data.get("model")
    if model is not None and str(model).lower() != MODEL_CLASS.lower():
        raise Emotion2VecError(f"{path}: model is {model!r}, not {MODEL_CLASS}")
    if "model_conf" not in data:
        raise Emotion2VecError(f"{path}: no model_conf section")
    return Emotion2VecConfig.from_model_conf(data["model_conf"], str(path))


def is_emotion2vec_folder(path: str | Path) -> bool:
    """A folder with model.pt and a config.yaml naming FunASR's Emotion2vec (or holding its
    model_conf.modalities.audio). Never raises; says nothing about whether the weights load."""
    try:
        folder = Path(path).expanduser()
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            return False
        data = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return False
        if str(data.get("model", "")).lower() == MODEL_CLASS.lower():
            return True
        conf = data.get("model_conf")
        return (data.get("model") is None and isinstance(conf, dict) and isinstance(conf.get("modalities"), dict)
                and isinstance(conf["modalities"].get("audio"), dict) and "embed_dim" in conf)
    except Exception:  # noqa: BLE001 - a yes/no probe over arbitrary folders
        return False


# --------------------------------------------------------------------------- modules
# Module names and child indices mirror FunASR's, so state dict keys match one to one.

class _TransposeLast(nn.Module):
    def forward(self, x):
        return x.transpose(-2, -1)


class _SamePad(nn.Module):
    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : -self.remove] if self.remove > 0 else x


class _Fp32LayerNorm(nn.LayerNorm):
    def forward(self, x):
        out = F.layer_norm(x.float(), self.normalized_shape, None if self.weight is None else self.weight.float(),
                           None if self.bias is None else self.bias.float(), self.eps)
        return out.type_as(x)


class _Fp32GroupNorm(nn.GroupNorm):
    def forward(self, x):
        out = F.group_norm(x.float(), self.num_groups, None if self.weight is None else self.weight.float(),
                           None if self.bias is None else self.bias.float(), self.eps)
        return out.type_as(x)


class _ConvFeatureExtractor(nn.Module):
    def __init__(self, layers, mode: str):
        super().__init__()
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for i, (dim, k, stride) in enumerate(layers):
            conv = nn.Conv1d(in_dim, dim, k, stride=stride, bias=False)
            if mode == "layer_norm":
                norm = nn.Sequential(_TransposeLast(), _Fp32LayerNorm(dim, elementwise_affine=True), _TransposeLast())
                block = nn.Sequential(conv, nn.Identity(), norm, nn.GELU())
            elif i == 0:
                block = nn.Sequential(conv, nn.Identity(), _Fp32GroupNorm(dim, dim, affine=True), nn.GELU())
            else:
                block = nn.Sequential(conv, nn.Identity(), nn.GELU())
            self.conv_layers.append(block)
            in_dim = dim

    def forward(self, x):  # [B, T] -> [B, C, F]
        x = x.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, padding_mask=None, alibi_bias=None):
        """``padding_mask`` [B, N] bool (True = padded key) or None; ``alibi_bias`` [1|B, Ha, N, N]
        float32 or None, added to the first Ha heads. Same operations, in the same order, as
        FunASR's AltAttention (scores and softmax in float32 when there is an ALiBi bias)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        dtype = q.dtype
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if alibi_bias is not None:
            attn = attn.type_as(alibi_bias)
            ha = alibi_bias.size(1)
            attn = attn + alibi_bias if ha == attn.size(1) else torch.cat([attn[:, :ha] + alibi_bias, attn[:, ha:]], 1)
        if padding_mask is not None:
            attn = attn.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(dtype=dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Block(nn.Module):
    """FunASR's AltBlock at inference (dropouts and drop path are identities)."""

    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.attn = _Attention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x, padding_mask=None, alibi_bias=None):
        if self.layer_norm_first:
            x = x + self.attn(self.norm1(x), padding_mask, alibi_bias)
            # As in fairseq/FunASR: the "residual" here is the MLP output itself, so the
            # block returns 2 * mlp(norm2(x)). Kept so that the weights mean the same thing.
            r = x = self.mlp(self.norm2(x))
            return r + x
        x = x + self.attn(x, padding_mask, alibi_bias)
        r = x = self.norm1(x)
        return self.norm2(r + self.mlp(x))


class _BlockEncoder(nn.Module):
    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.prenet_depth))
        self.norm = (None if cfg.layer_norm_first
                     else nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine))


class _AudioEncoder(nn.Module):
    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        dim, k = cfg.embed_dim, cfg.pos_kernel
        self.local_encoder = _ConvFeatureExtractor(cfg.conv_layers, cfg.extractor_mode)
        feat_dim = cfg.conv_layers[-1][0]
        self.project_features = nn.Sequential(_TransposeLast(), nn.LayerNorm(feat_dim), nn.Linear(feat_dim, dim))
        pos = nn.Sequential(_TransposeLast(), *[
            nn.Sequential(nn.Conv1d(dim, dim, kernel_size=k, padding=k // 2, groups=cfg.conv_pos_groups),
                          _SamePad(k), _TransposeLast(), nn.LayerNorm(dim, elementwise_affine=False),
                          _TransposeLast(), nn.GELU())
            for _ in range(cfg.conv_pos_depth)], _TransposeLast())
        self.relative_positional_encoder = nn.Sequential(nn.LayerNorm(dim), pos) if cfg.conv_pos_pre_ln else pos
        self.context_encoder = _BlockEncoder(cfg)
        self.extra_tokens = nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, dim)) if cfg.num_extra_tokens else None
        self.alibi_scale = None
        if cfg.use_alibi:
            n_scales = cfg.prenet_depth + cfg.model_depth if cfg.alibi_scale_per_layer else 1
            n_heads = cfg.num_alibi_heads if cfg.alibi_scale_per_head else 1
            self.alibi_scale = nn.Parameter(torch.full((n_scales, 1, n_heads, 1, 1), cfg.alibi_scale))


class _Emotion2VecModel(nn.Module):
    """The encoder part of FunASR's Emotion2vec, under the same attribute names."""

    def __init__(self, cfg: Emotion2VecConfig):
        super().__init__()
        self.modality_encoders = nn.ModuleDict({"AUDIO": _AudioEncoder(cfg)})
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = (nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
                     if cfg.layer_norm_first else None)


def _alibi_slopes(n: int) -> list[float]:
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def _alibi(time_steps: int, heads: int, device) -> torch.Tensor:
    """[1, heads, T, T] float32: -slope_h * |i - j| (FunASR's get_alibi, 1-d)."""
    slopes = torch.tensor(_alibi_slopes(heads), dtype=torch.float32, device=device)
    pos = torch.arange(time_steps, device=device)
    dist = -(pos[None, :] - pos[:, None]).abs()
    return (slopes[:, None, None] * dist[None].expand(heads, -1, -1)).unsqueeze(0)


# --------------------------------------------------------------------------- weights

def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise Emotion2VecError(f"emotion2vec weights not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # A FunASR/fairseq checkpoint may also pickle its training config (omegaconf
            # objects): loaded in full as FunASR does, so only use folders you trust.
            log.warning("%s holds objects other than tensors; unpickling it in full (as FunASR does)", path)
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many kinds
        raise Emotion2VecError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model_state_dict", "model"):  # FunASR's load_pretrained_model order
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise Emotion2VecError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    state = {}
    for k, v in obj.items():
        k = str(k)
        k = k[len("module."):] if k.startswith("module.") else k
        state[k] = v
    return state


def _is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_KEY_PREFIXES) and not key.startswith(NOT_ENCODER_KEY_PREFIXES)


def _load_strict(model: nn.Module, state: dict, path: Path) -> list[str]:
    """Load ``state`` into ``model``: every encoder tensor present with its shape, no tensor
    in the encoder's namespace that the config does not imply (e.g. a 9th block for a config
    with 8); keys outside it are skipped. Returns the skipped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    ignored = [k for k in extra if not _is_encoder_key(k)]
    unknown = [k for k in extra if _is_encoder_key(k)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} encoder tensors missing (e.g. {', '.join(missing[:5])})")
    if unknown:
        problems.append(f"{len(unknown)} unexpected tensors (e.g. {', '.join(unknown[:5])})")
    fixed = {}
    for k in sorted(set(own) & set(state)):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
            continue
        if k.endswith("alibi_scale") and v.dim() == own[k].dim() - 1:
            v = v.unsqueeze(0)  # fairseq's upgrade_state_dict_named for old 4-d scales
        if tuple(v.shape) != tuple(own[k].shape):
            problems.append(f"{k} has shape {tuple(v.shape)}, config.yaml implies {tuple(own[k].shape)}")
            continue
        fixed[k] = v
    if problems:
        raise Emotion2VecError(f"{path} does not match its config.yaml: " + "; ".join(problems[:6]))
    model.load_state_dict(fixed, strict=True)
    if ignored:
        log.info("%s: %d tensors outside the encoder not used (e.g. %s)", path, len(ignored), ", ".join(ignored[:3]))
    return ignored


# --------------------------------------------------------------------------- encoder

class Emotion2VecEncoder(nn.Module):
    """A FunASR emotion2vec checkpoint folder as a frozen encoder: waveform -> every layer.

    ``forward(waves [B, T] float 16 kHz, lengths [B] long) -> (states [L, B, F, D], mask [B, F])``
    with L = depth + 1 (state 0: after the positional convs and the prenet blocks;
    state i: after transformer block i), F = the largest ``frame_lengths(lengths)`` of the
    batch (50 frames/s), padded frames zero and False in the mask.
    """

    def __init__(self, folder: str | Path):
        super().__init__()
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise Emotion2VecError(f"emotion2vec folder does not exist: {self.folder}")
        self.config = cfg = read_emotion2vec_config(self.folder / CONFIG_FILE)
        self.model = _Emotion2VecModel(cfg)
        path = self.folder / WEIGHTS_FILE
        self.ignored_keys = _load_strict(self.model, _read_weights(path), path)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sample_rate = SAMPLE_RATE
        self.width = cfg.embed_dim
        self.num_states = cfg.depth + 1
        self.normalize = cfg.normalize
        # Group-norm feature extractors normalise over the whole padded input: clip by clip.
        self.accepts_padding_mask = cfg.extractor_mode == "layer_norm"
        self.frame_rate = SAMPLE_RATE / math.prod(s for _, _, s in cfg.conv_layers)
        receptive = 1
        for _, k, s in reversed(cfg.conv_layers):
            receptive = (receptive - 1) * s + k
        self.min_samples = receptive  # shortest clip with one frame (400 samples = 25 ms)

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout)
        super().train(mode)
        self.model.eval()
        return self

    def frame_lengths(self, wave_lengths) -> torch.Tensor:
        """Frames per clip (FunASR's conv output length formula; 0 below ``min_samples``)."""
        n = torch.as_tensor(wave_lengths).long()
        for _, k, s in self.config.conv_layers:
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp_min(0)

    def _normalise(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """FunASR's ``F.layer_norm(wav, wav.shape)`` (eps 1e-5) on each clip's valid samples,
        the same call on the same samples (bit-identical to FunASR); padding -> 0."""
        out = torch.zeros_like(waves)
        for i, n in enumerate(lengths.tolist()):
            out[i, :n] = F.layer_norm(waves[i, :n], (n,)) if self.normalize else waves[i, :n]
        return out

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if waves.dim() != 2:
            raise Emotion2VecError(f"waves must be [B, T], got shape {tuple(waves.shape)}")
        lengths = torch.as_tensor(lengths, device=waves.device).long().reshape(-1)
        if lengths.numel() != waves.shape[0]:
            raise Emotion2VecError(f"{lengths.numel()} lengths for {waves.shape[0]} waves")
        if int(lengths.max()) > waves.shape[1]:
            raise Emotion2VecError(f"a length ({int(lengths.max())}) exceeds the padded width {waves.shape[1]}")
        if int(lengths.min()) < self.min_samples:
            raise Emotion2VecError(
                f"clip {int(lengths.argmin())} has {int(lengths.min())} samples; emotion2vec ({self.folder}) needs "
                f"at least {self.min_samples} ({1000 * self.min_samples / self.sample_rate:g} ms) for one frame")
        param = next(self.model.parameters())
        frames = self.frame_lengths(lengths)
        with torch.no_grad():
            waves = waves[:, : int(lengths.max())].to(device=param.device, dtype=param.dtype)
            waves = self._normalise(waves, lengths.to(param.device))
            if self.accepts_padding_mask:
                states = self._encode(waves, frames.to(param.device))
            else:
                per_clip = [self._encode(waves[i:i + 1, : int(lengths[i])], None) for i in range(waves.shape[0])]
                states = waves.new_zeros(self.num_states, waves.shape[0], int(frames.max()), self.width)
                for i, s in enumerate(per_clip):
                    states[:, i, : s.shape[2]] = s[:, 0]
            mask = torch.arange(states.shape[2], device=states.device)[None] < frames.to(states.device)[:, None]
            states = states.masked_fill(~mask[None, :, :, None], 0.0)
        return states, mask

    def _encode(self, waves: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Normalised waves [B, T] -> states [L, B, F, D]; ``frames`` None: no padding."""
        cfg = self.config
        enc = self.model.modality_encoders["AUDIO"]
        x = enc.project_features(enc.local_encoder(waves))  # [B, F, D]
        B, T, _ = x.shape
        keep = None
        if frames is not None and bool((frames < T).any()):
            keep = torch.arange(T, device=x.device)[None] < frames[:, None]
        x = x + self._positions(enc, x, keep)

        alibi, scales = None, None
        if enc.alibi_scale is not None:
            alibi = _alibi(T, cfg.num_alibi_heads, x.device)
            scale = enc.alibi_scale.clamp_min(0)
            if scale.size(0) == 1:
                alibi = alibi * scale.squeeze(0).type_as(alibi)
            else:
                scales = scale
        n_extra = cfg.num_extra_tokens
        if enc.extra_tokens is not None:
            x = torch.cat([enc.extra_tokens.expand(B, -1, -1), x], dim=1)
            if alibi is not None:
                alibi = F.pad(alibi, (n_extra, 0, n_extra, 0))
        pad = None if keep is None else F.pad(~keep, (n_extra, 0))

        def run(blocks, x, offset):
            for i, blk in enumerate(blocks):
                ab = alibi
                if ab is not None and scales is not None:
                    ab = ab * scales[offset + i].type_as(ab)
                x = blk(x, pad, ab)
            return x

        ctx = enc.context_encoder
        if ctx.norm is not None:
            x = ctx.norm(x)
        x = run(ctx.blocks, x, 0)
        states = [x[:, n_extra:]]
        for i, blk in enumerate(self.model.blocks):
            x = run([blk], x, cfg.prenet_depth + i)
            states.append(x[:, n_extra:])
        if self.model.norm is not None:
            states[-1] = self.model.norm(states[-1])
        return torch.stack(states)

    @staticmethod
    def _positions(enc: _AudioEncoder, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The relative positional conv stack, with padded frames zeroed before every conv:
        what a clip alone sees (the convs' own zero padding) past its last frame."""
        pos = enc.relative_positional_encoder
        if isinstance(pos[0], nn.LayerNorm):  # conv_pos_pre_ln
            x, pos = pos[0](x), pos[1]
        h = x.transpose(1, 2)
        for layer in list(pos)[1:-1]:
            if keep is not None:
                h = h.masked_fill(~keep[:, None, :], 0.0)
            h = layer(h)
        return h.transpose(1, 2)


# --------------------------------------------------------------------------- tiny checkpoints

def emotion2vec_config(*, embed_dim: int = 32, depth: int = 2, num_heads: int = 4, prenet_depth: int = 1,
                       conv_dim: int = 32, mlp_ratio: float = 2.0, num_extra_tokens: int = 2,
                       conv_pos_width: int = 10, conv_pos_depth: int = 2, conv_pos_groups: int = 4,
                       num_alibi_heads: int | None = None, extractor_mode: str = "layer_norm",
                       layer_norm_first: bool = False, conv_pos_pre_ln: bool = False, normalize: bool = True,
                       alibi_scale_per_layer: bool = False, use_alibi: bool = True) -> dict:
    """A config.yaml mapping in FunASR's format (keys as in the released emotion2vec_base
    config, sizes as given; the real ones: 768 wide, 12 heads, 8 blocks, 4 prenet blocks,
    512-channel convs, 10 extra tokens, positional convs 95 / 5 / 16). The conv strides are
    the real ones (16 kHz -> 50 frames/s)."""
    spec = (f"[({conv_dim}, 10, 5)] + [({conv_dim}, 3, 2)] * 4 + [({conv_dim}, 2, 2)] + [({conv_dim}, 2, 2)]")
    audio = {
        "type": "AUDIO", "prenet_depth": prenet_depth, "prenet_layerdrop": 0.05, "prenet_dropout": 0.1,
        "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "num_extra_tokens": num_extra_tokens,
        "init_extra_token_zero": True, "mask_noise_std": 0.01, "mask_prob_min": None, "inverse_mask": False,
        "mask_prob": 0.5, "mask_prob_adjust": 0.05, "keep_masked_pct": 0.0, "mask_length": 5, "add_masks": False,
        "remove_masks": False, "mask_dropout": 0.0, "encoder_zero_mask": True, "mask_channel_prob": 0.0,
        "mask_channel_length": 64, "ema_local_encoder": False, "local_grad_mult": 1.0,
        "use_alibi_encoder": use_alibi, "alibi_scale": 1.0, "learned_alibi": False, "alibi_max_pos": None,
        "learned_alibi_scale": True, "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": alibi_scale_per_layer,
        "num_alibi_heads": num_heads if num_alibi_heads is None else num_alibi_heads, "model_depth": depth,
        "decoder": None, "extractor_mode": extractor_mode, "feature_encoder_spec": spec,
        "conv_pos_width": conv_pos_width, "conv_pos_groups": conv_pos_groups, "conv_pos_depth": conv_pos_depth,
        "conv_pos_pre_ln": conv_pos_pre_ln,
    }
    model_conf = {
        "loss_beta": 0.0, "loss_scale": None, "depth": depth, "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0, "num_heads": num_heads, "norm_eps": 1e-05, "norm_affine": True,
        "encoder_dropout": 0.1, "post_mlp_drop": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
        "dropout_input": 0.0, "layerdrop": 0.05, "embed_dim": embed_dim, "mlp_ratio": mlp_ratio,
        "layer_norm_first": layer_norm_first, "average_top_k_layers": depth, "end_of_block_targets": False,
        "clone_batch": 8, "layer_norm_target_layer": False, "batch_norm_target_layer": False,
        "instance_norm_target_layer": True, "instance_norm_targets": False, "layer_norm_targets": False,
        "ema_decay": 0.999, "ema_end_decay": 0.99999, "ema_anneal_end_step": 20000, "ema_encoder_only": False,
        "max_update": 100000, "extractor_mode": extractor_mode, "shared_decoder": None, "min_target_var": 0.1,
        "min_pred_var": 0.01, "supported_modality": "AUDIO", "mae_init": False, "seed": 1, "skip_ema": False,
        "cls_loss": 1.0, "recon_loss": 0.0, "d2v_loss": 1.0, "decoder_group": False, "normalize": normalize,
        "modalities": {"image": None, "text": None, "audio": audio},
    }
    return {"model": MODEL_CLASS, "model_conf": model_conf}


def write_emotion2vec_folder(folder: str | Path, config: dict, state_dict: dict) -> Path:
    """Write ``config`` as config.yaml and ``state_dict`` as model.pt (FunASR's layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, folder / WEIGHTS_FILE)
    return folder


def save_random_emotion2vec(folder: str | Path, seed: int = 0, **sizes) -> Path:
    """A tiny random emotion2vec checkpoint folder (model.pt + config.yaml, FunASR's format)
    for tests; ``sizes``: emotion2vec_config's keywords. Norm weights, extra tokens and ALiBi
    scales are randomised too, so that no part of the model is a no-op."""
    config = emotion2vec_config(**sizes)
    torch.manual_seed(seed)
    model = _Emotion2VecModel(Emotion2VecConfig.from_model_conf(config["model_conf"]))
    perturb_(model, seed)
    return write_emotion2vec_folder(folder, config, model.state_dict())


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise what default initialisation leaves constant (norm weights and biases,
    extra tokens, ALiBi scales) in an emotion2vec module, ours or FunASR's (same names)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alibi_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("extra_tokens"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and name.endswith("weight"):  # norms
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model
