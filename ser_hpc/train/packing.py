"""Which runs may train together in one process (a pack) on one shared backbone forward.

Runs that differ only in head settings see exactly the same batches and the same frozen
backbone outputs, so one forward per batch can feed all of their heads. Anything that
changes the backbone input (backbone, crop, augmentation, batch size, seed, steps) or the
backbone itself (fine-tuned layers) keeps runs apart.
"""
from __future__ import annotations

import json
from typing import Any

from ..config import Config, ConfigError, flatten

# Keys that change only the trainable head; runs differing in nothing else may share a pack.
HEAD_KEYS = frozenset({
    "model.hidden_layers", "model.head_width", "model.dropout", "model.fusion_dim",
    "model.fusion_attention_heads", "model.speech.layers", "model.text.layers", "model.fusion", "model.pooling",
    "train.lr", "train.weight_decay", "train.lr_schedule", "train.warmup_steps", "train.lr_decay", "train.lr_patience",
    "train.early_stop_patience", "train.max_grad_norm", "train.class_weights",
    "run.name", "run.dir",
})


def shared_settings(config: dict[str, Any]) -> str:
    """Everything but the head keys, canonically: equal for runs that can share a pack."""
    flat = flatten(config)
    return json.dumps({k: v for k, v in flat.items() if k not in HEAD_KEYS}, sort_keys=True, default=str)


def needs_own_forward(config: dict[str, Any]) -> str | None:
    """Why this run cannot share a backbone forward with others, or None if it can."""
    model, train = config["model"], config["train"]
    if any(model[m]["finetune_top_layers"] for m in ("speech", "text")):
        return "it fine-tunes backbone layers"
    if train["strategy"] == "deepspeed":
        return "it trains under DeepSpeed (one engine per process)"
    return None


def check_pack(cfgs: list[Config]) -> None:
    """Refuse a pack whose runs could not share batches and backbone outputs."""
    if not cfgs:
        raise ConfigError("a pack needs at least one run")
    if len(cfgs) == 1:
        return
    trees = [c.to_dict() for c in cfgs]
    for cfg, tree in zip(cfgs, trees):
        why = needs_own_forward(tree)
        if why:
            raise ConfigError(f"run {cfg.run.name!r} cannot share a pack: {why}")
    first = flatten(trees[0])
    for cfg, tree in zip(cfgs[1:], trees[1:]):
        flat = flatten(tree)
        differ = sorted(k for k in first if k not in HEAD_KEYS and first[k] != flat.get(k))
        if differ:
            raise ConfigError(f"runs {cfgs[0].run.name!r} and {cfg.run.name!r} cannot share a pack: they differ in "
                              f"{', '.join(differ)} (only head settings may differ: {', '.join(sorted(HEAD_KEYS))})")
    dirs = [c.run.dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"two runs of one pack write to the same run.dir: {sorted(d for d in dirs if dirs.count(d) > 1)[0]}")
