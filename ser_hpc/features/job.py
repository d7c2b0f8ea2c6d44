"""The features job of a grid: which feature stores the plan's cached runs read (one per
corpus, encoders and augmentation views), what each will take on disk, and the array that
extracts them, one task per shard of each store not yet complete."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ..config import config_from_dict
from ..plan_file import job_start
from .extract import Projection

log = logging.getLogger("ser_hpc.features")


def feature_groups(plan: dict) -> list[list[dict]]:
    """The plan's cached-feature runs grouped by the feature store they read: same corpus,
    backbones, modalities and augmentation views (head, seed and schedule do not matter).
    The features job extracts one store per group, holding the layers of all its heads."""
    from ..train.packing import HEAD_KEYS, group_runs
    ignore = HEAD_KEYS | {"train.seed", "train.lr", "train.max_steps", "train.epochs", "train.eval_every",
                          "train.batch_size", "data.crop_seconds", "data.augment_prob", "data.split_seed",
                          "data.dev_fraction", "train.log_every", "train.checkpoint_every",
                          "data.fold"}  # a store holds every clip of the corpus, whatever the test fold
    cached = [run for run in plan["runs"] if run["config"]["train"]["features"] == "cached"]
    # A one-modality run joins the fused group of its encoder: it reads the fused store
    # (find_store), so the features job extracts that encoder once.
    return [[cached[i] for i in g] for g in group_runs([run["config"] for run in cached], ignore)]


@dataclass
class StorePlan:
    """One feature store a grid reads: whether it is complete, what it will take (its shards too)."""
    group: int
    complete: bool
    projection: "Projection"
    corpus: str | None = None


def _group_configs(group: list[dict]) -> list:
    """The store depends on the group's shared settings and the layers each head reads:
    one Config per distinct layer choice, not one per run."""
    distinct = {json.dumps([run["config"]["model"]["speech"]["layers"], run["config"]["model"]["text"]["layers"]]): run
                for run in group}
    return [config_from_dict(group[0]["config"])] + [config_from_dict(run["config"]) for run in distinct.values()]


def store_plans(plan: dict, problems: list[str] | None = None) -> list[StorePlan]:
    """Every feature store of the plan's cached runs, with its projected size (configs, no
    weights). A store that cannot be projected (its encoder's config unreadable) goes to
    ``problems`` (raised without it)."""
    from ..features.extract import find_store, project, read_all_clips, store_spec
    from ..features.store import FeatureStoreError
    from ..models.encoders import BackboneError
    out, folders = [], set()
    for k, group in enumerate(feature_groups(plan)):
        cfgs = _group_configs(group)
        try:
            corpus = read_all_clips(cfgs[0])
            projection = project(cfgs, corpus)
            if projection.folder in folders:  # stores are keyed by checkpoint content: one checkpoint, two names
                continue
            folders.add(projection.folder)
            complete = find_store(cfgs[0], store_spec(cfgs, corpus)) is not None
            out.append(StorePlan(k, complete, projection, group[0].get("corpus")))
        except (BackboneError, FeatureStoreError, OSError) as exc:
            if problems is None:
                raise
            if str(exc) not in problems:
                problems.append(str(exc))
    return out


def feature_tasks(stores: list[StorePlan]) -> list[list[int]]:
    """The features array: one task per shard of every store not yet complete, as [group, shard]."""
    return [[s.group, k] for s in stores if not s.complete for k in range(s.projection.shards)]


def run_features(plan_path: str, task: int | None = None) -> list[str]:
    """The features job (before the training array): each frozen backbone pair runs once over
    the corpus into data.features_dir. ``task``: one array task (one shard of one store, from
    plan.json's feature_tasks), None: every store in turn."""
    from ..features.extract import extract
    plan = job_start(plan_path)
    groups = feature_groups(plan)
    tasks = plan.get("feature_tasks") or [[g, None] for g in range(len(groups))]
    folders = []
    for group, shard in tasks if task is None else [tasks[task]]:
        cfgs = [config_from_dict(run["config"], f"plan run {run['run_id']}") for run in groups[group]]
        store = extract(cfgs, shard=shard)
        where = "complete" if store is not None else "shard written; other shards pending"
        log.info("feature group %d%s (%d run(s)): %s", group, "" if shard is None else f" shard {shard}", len(cfgs),
                 where if store is None else store.folder)
        folders.append(str(store.folder) if store is not None else where)
    return folders


def store_limits(stores: list) -> list[str]:
    """Refuse feature stores over data.features_max_gb, or over the free space where they go."""
    problems, need_by_fs = [], {}
    shrink = ("store fewer layers (model.speech.layers: [6, 12, 18, 24] or every_2; model.text.layers: last), "
              "fewer augmented views (data.cached_augment_copies), or point data.features_dir at a larger file system")
    for s in (s for s in stores if not s.complete):
        p = s.projection
        if p.limit_gb and p.bytes > p.limit_gb * 1e9:
            problems.append(f"feature store {p.folder} would take {p.bytes / 1e9:.1f} GB, over data.features_max_gb="
                            f"{p.limit_gb:g}: {shrink} (or raise data.features_max_gb)")
        device = p.folder.parent
        while not device.exists():
            device = device.parent
        key = device.stat().st_dev
        need, free, where = need_by_fs.get(key, (0, p.free_bytes, device))
        need_by_fs[key] = (need + p.bytes, free, where)
    for need, free, where in need_by_fs.values():
        if need > 0.95 * free:
            problems.append(f"the feature stores to extract need {need / 1e9:.1f} GB but {where} has "
                            f"{free / 1e9:.1f} GB free: {shrink}")
    return problems


def whisper_costs(runs: list) -> list[str]:
    """For every Whisper speech encoder and corpus of the grid: what its 30 s window costs."""
    from ..config import config_from_dict
    from ..features.extract import read_all_clips, window_cost
    from ..data.sources import clips_key
    from ..models.speech_families import speech_spec
    seen, lines = set(), []
    for run in runs:
        model = run.config["model"]
        name = model["speech"]["name"]
        key = (name, clips_key(run.config["data"]))  # one line per encoder and corpus, not per fold
        if "audio" not in model["modalities"] or key in seen:
            continue
        seen.add(key)
        if speech_spec(name).family == "whisper":
            line = window_cost(read_all_clips(config_from_dict(run.config)), name)
            lines.append(line if run.corpus is None else f"{run.corpus}: {line}")
    return lines
