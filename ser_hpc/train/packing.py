"""Which runs may train together in one process (a pack) on one shared backbone forward.

Runs that differ only in head settings see exactly the same batches and the same frozen
backbone outputs, so one forward per batch can feed all of their heads. Anything that
changes the backbone input (backbone, crop, augmentation, batch size, seed, steps) or the
backbone itself (fine-tuned layers) keeps runs apart.

On cached features the "forward" is a batch read from the feature store, so the modality
a head reads is a head setting too: a text-only and an audio-only head join the fused heads
of the same encoders (the store holds both; each head reads its own), which is what makes
the modality baselines of a grid nearly free.
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


ENCODER_KEYS = frozenset({"model.modalities", "model.speech.name", "model.text.name"})


def encoders(flat: dict[str, Any]) -> dict[str, str]:
    """{"speech": name, "text": name} of the encoders a run reads (flattened config)."""
    modalities = str(flat["model.modalities"]).split("+")
    return {kind: flat[f"model.{kind}.name"] for kind, m in (("speech", "audio"), ("text", "text")) if m in modalities}


def _cached(flat: dict[str, Any]) -> bool:
    return flat.get("train.features") == "cached"


def _shared_key(flat: dict[str, Any], ignore: frozenset[str]) -> str:
    """Everything but the ``ignore`` keys, canonically: equal for runs that can share a pack
    (on cached features the encoders are compared apart, in ``group_runs``)."""
    skip = ignore | (ENCODER_KEYS if _cached(flat) else frozenset())
    return json.dumps({k: v for k, v in flat.items() if k not in skip and not k.startswith("run.")},
                      sort_keys=True, default=str)


def group_runs(configs: list[dict[str, Any]], ignore: frozenset[str] = HEAD_KEYS) -> list[list[int]]:
    """Indices of ``configs`` that may share packs (or, with a wider ``ignore``, one feature
    store), in first-seen order. Online runs group by equal shared settings; cached runs
    also need compatible encoders, and a one-modality run joins the first group of the same
    settings that already reads its encoder (fused first)."""
    keyed = []
    for i, config in enumerate(configs):
        flat = flatten(config)
        keyed.append((i, _shared_key(flat, ignore), encoders(flat) if _cached(flat) else {}))
    by_key: dict[str, list[tuple[dict[str, str], list[int]]]] = {}
    for i, key, enc in sorted(keyed, key=lambda t: -len(t[2])):  # fused runs found the groups
        candidates = by_key.setdefault(key, [])
        host = next((g for g in candidates if all(g[0].get(k) == v for k, v in enc.items())), None)
        if host is None:
            candidates.append((dict(enc), [i]))
        else:
            host[1].append(i)
    return sorted((sorted(g[1]) for gs in by_key.values() for g in gs), key=lambda g: g[0])


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
    head_keys = HEAD_KEYS | (ENCODER_KEYS if _cached(first) else frozenset())
    names: dict[str, tuple[str, str]] = {}  # kind -> (encoder, the run that reads it)
    for cfg, tree in zip(cfgs, trees):
        for kind, name in encoders(flatten(tree)).items():
            seen = names.setdefault(kind, (name, cfg.run.name))
            if seen[0] != name:
                raise ConfigError(f"runs {seen[1]!r} and {cfg.run.name!r} cannot share a pack: they read different "
                                  f"{kind} encoders ({seen[0]!r} and {name!r})")
    for cfg, tree in zip(cfgs[1:], trees[1:]):
        flat = flatten(tree)
        differ = sorted(k for k in first if k not in head_keys and first[k] != flat.get(k))
        if differ:
            raise ConfigError(f"runs {cfgs[0].run.name!r} and {cfg.run.name!r} cannot share a pack: they differ in "
                              f"{', '.join(differ)} (only head settings may differ: {', '.join(sorted(HEAD_KEYS))})")
    dirs = [c.run.dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"two runs of one pack write to the same run.dir: {sorted(d for d in dirs if dirs.count(d) > 1)[0]}")
