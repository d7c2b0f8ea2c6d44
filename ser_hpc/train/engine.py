"""How gradients are applied: one process, DDP, or DeepSpeed ZeRO (``train.strategy``).

The trainer talks to an engine only through forward / backward / step / save / load, so
the loop, the data order and the checkpoints are the same in every mode.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError
from ..models.backbones import FrozenBackbones
from . import distributed as D

log = logging.getLogger("ser_hpc.train")


class SERModel(nn.Module):
    """Backbones + head as one module, so DDP / DeepSpeed see every trainable parameter
    (head, and unfrozen backbone layers when fine-tuning). The heads of a pack each have a
    SERModel around the same backbones and are given the shared backbone output (``feats``)."""

    def __init__(self, backbones: FrozenBackbones, head: nn.Module, device: torch.device):
        super().__init__()
        self.backbones, self.head, self.device = backbones, head, device

    def forward(self, waves, wave_lengths, texts, feats=None):
        if feats is None:
            feats = self.backbones(waves, wave_lengths, texts, self.device)
        return self.head(feats)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: SERModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the head (``train.lr``) and any unfrozen backbone layers (``train.backbone_lr``);
    each group's lr is its base lr x the schedule's factor (``Engine.set_lr_factor``)."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    tuned = [p for p in model.backbones.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": cfg.train.lr, "name": "head"}]
    if tuned:
        groups.append({"params": tuned, "lr": cfg.train.backbone_lr, "name": "backbone"})
    # foreach: one fused call per step instead of a Python loop over tensors (CPU defaults to the loop)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)


class Engine:
    """Single process and DDP: a torch optimizer over the trainable parameters."""

    can_shard_eval = True

    def __init__(self, cfg: Config, model: SERModel, env: D.DistEnv, device: torch.device):
        self.model, self.env = model, env
        self.optimizer = build_optimizer(model, cfg)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.wrapped: nn.Module = model
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # Frozen backbone tensors are identical on every rank (loaded from the same files):
            # DDP must not broadcast them at start-up or sync their buffers at each forward.
            trainable = set(trainable_names(model))
            frozen = [n for n, _ in model.named_parameters() if n not in trainable]
            frozen += [n for n, _ in model.named_buffers() if n.startswith("backbones.")]
            DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DDP(model, device_ids=ids)

    def forward(self, waves, lengths, texts, feats=None) -> torch.Tensor:
        return self.wrapped(waves, lengths, texts, feats=feats)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> None:
        if max_grad_norm:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """lr of each parameter group = its base lr x factor (the schedule, ``schedule.py``)."""
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = set(trainable_names(self.model))
        return {k: v for k, v in self.model.state_dict().items() if k in names}

    def save(self, folder: Path) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, folder: Path, weights: dict[str, torch.Tensor] | None, trainer_state: dict | None) -> None:
        self.assign(weights or {})
        self.optimizer.load_state_dict(trainer_state["optimizer"])

    def assign(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = set(trainable_names(self.model)) - set(weights)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def load_best(self, folder) -> None:
        self.assign(folder.load_best())


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1-3 from a JSON config; batch sizes, lr and clipping come from ours.

    Checkpoints use DeepSpeed's own format (its shards inside our checkpoint folder), so a
    ZeRO-partitioned optimizer state is saved and restored by every rank.
    """

    def __init__(self, cfg: Config, model: SERModel, env: D.DistEnv, device: torch.device):
        import deepspeed

        path = Path(cfg.train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: file not found: {path}")
        try:
            ds_config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        t = cfg.train
        ds_config.update(train_batch_size=t.batch_size * t.grad_accum_steps,
                         train_micro_batch_size_per_gpu=t.batch_size // env.world,
                         gradient_accumulation_steps=t.grad_accum_steps,
                         gradient_clipping=t.max_grad_norm or 0.0)
        if t.bf16:
            ds_config["bf16"] = {"enabled": True}
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.can_shard_eval = self.stage < 3  # ZeRO-3 forwards are collective: every rank scores everything
        if not env.enabled:  # one process: DeepSpeed still wants a process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.model, self.env = model, env
        optimizer = build_optimizer(model, cfg)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.wrapped = self.ds
        log.info("DeepSpeed ZeRO stage %d, micro batch %d, bf16 %s", self.stage,
                 ds_config["train_micro_batch_size_per_gpu"], bool(t.bf16))

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already normalised for accumulation; DeepSpeed would divide again.
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> None:
        self.ds.step()

    def _gathered(self, params, modifier_rank=None):
        import contextlib
        import deepspeed
        if self.stage < 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with self._gathered([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}

    def save(self, folder: Path) -> dict[str, Any]:
        self.ds.save_checkpoint(str(folder), tag="deepspeed")
        return {}

    def load(self, folder: Path, weights, trainer_state) -> None:
        verify_deepspeed_checkpoint(folder / "deepspeed")
        self.ds.load_checkpoint(str(folder), tag="deepspeed")

    def assign(self, weights: dict[str, torch.Tensor]) -> None:
        named = [(n, p) for n, p in self.model.named_parameters() if n in weights]
        with self._gathered([p for _, p in named], modifier_rank=0), torch.no_grad():
            for name, p in named:
                p.copy_(weights[name].to(p.device, p.dtype))


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its ZeRO checkpoints legitimately hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_deepspeed_checkpoint(folder: Path) -> None:
    """DeepSpeed loads its files with full unpickling; first prove each holds nothing but
    tensors, plain containers and the allow-listed DeepSpeed classes (weights_only)."""
    allowed = _deepspeed_safe_globals()
    for path in sorted(folder.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"refusing to load DeepSpeed checkpoint file {path}: it holds objects outside the "
                             f"allowed set ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None


def make_engine(cfg: Config, model: nn.Module, env: D.DistEnv, device: torch.device) -> Engine:
    if cfg.train.strategy == "deepspeed":
        return DeepSpeedEngine(cfg, model, env, device)
    if cfg.train.strategy == "ddp" and not env.enabled:
        log.warning("train.strategy is ddp but only one process was started: training on one rank")
    return Engine(cfg, model, env, device)
