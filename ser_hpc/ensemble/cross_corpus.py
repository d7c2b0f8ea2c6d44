"""Cross-corpus evaluation: the ensemble trained on corpus A labels corpus B's test clips.

EmoBox's cross-corpus track trains on one corpus and tests on another over the classes
both have. Here, with ``cross_corpus: {train: [A, ...], test: [B, ...]}`` in a benchmark
grid, the aggregation job (the same job chain, no retraining) runs A's published ensemble
(the mean of its fold ensembles when A has folds) on B's test split (every clip of B when B
has folds: the union of its test folds):

- classes are matched by name (case aside) after each corpus's label map; the ensemble's
  scores are restricted to the shared classes and renormalised, its label is the best of
  them; B's clips of other classes are dropped and counted, A's other classes named;
- each member reads B's cached features when a store of B holds its encoders and layers,
  else runs its backbones on B's audio;
- macro-F1, UA and WA over the shared classes, with a 95 % stratified-bootstrap CI.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from ser_hpc.ensemble.collect import AggregateError
from ser_hpc.ensemble.combine import combine
from ser_hpc.ensemble.stats import bootstrap_ci
from ser_hpc.metrics import score


def _corpus_data(plan: dict, corpus: str) -> list[dict]:
    """The distinct data sections of a corpus's runs (one per fold)."""
    seen, out = set(), []
    for run in plan.get("runs", []):
        if run.get("corpus") != corpus:
            continue
        key = yaml.safe_dump(run["config"]["data"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(run["config"])
    return out


def test_clips(plan: dict, corpus: str):
    """(examples with their class names, the corpus's classes, whether it has transcriptions) of
    a corpus's test split; with folds, the union of its test folds."""
    from ser_hpc.config import config_from_dict
    from ser_hpc.data.sources import load_splits
    examples, labels, has_text = {}, None, True
    for tree in _corpus_data(plan, corpus):
        splits = load_splits(config_from_dict(tree).data, open_audio=False)
        labels, has_text = labels or list(splits.labels), has_text and splits.has_text
        for e in splits.test:
            if e.label is not None:
                examples.setdefault(e.id, SimpleNamespace(example=e, label=splits.labels[e.label]))
    return list(examples.values()), labels or [], has_text


def shared_classes(train: list[str], test: list[str]) -> list[str]:
    """The train corpus's classes the test corpus has too (names compared without case)."""
    test_lower = {c.lower() for c in test}
    return [c for c in train if c.lower() in test_lower]


class _Features:
    """Backbone outputs of one corpus's test clips for a member: its cached store, else its backbones."""

    def __init__(self, tree: dict):
        self.tree, self.backbones = tree, {}

    def batches(self, cfg, examples):
        from ser_hpc.data.dataset import WholeClips, collate, length_sorted_batches
        from ser_hpc.data.prepared import audio_loader_for
        from ser_hpc.features.dataset import CachedClips, FeatureCollate
        from ser_hpc.features.extract import find_store, read_all_clips, store_spec
        from ser_hpc.models.backbones import FrozenBackbones
        store = None
        if cfg.data.features_dir:
            try:
                store = find_store(cfg, store_spec([cfg], read_all_clips(cfg)))
            except Exception:  # no readable store for these encoders and layers: run the backbones
                store = None
        batches = length_sorted_batches([0.0] * len(examples), cfg.data.eval_batch_size)
        if store is not None:
            dataset, collate_fn = CachedClips(examples, store), FeatureCollate(store)
            shapes = SimpleNamespace(speech=SimpleNamespace(**store.meta["speech"]) if store.meta.get("speech")
                                     else None, text=SimpleNamespace(**store.meta["text"]) if store.meta.get("text")
                                     else None)
            for idx in batches:
                yield shapes, collate_fn([dataset[i] for i in idx])
            return
        m = cfg.model
        modalities = m.modalities.split("+")
        key = (m.speech.name if "audio" in modalities else None, m.text.name if "text" in modalities else None)
        if key not in self.backbones:
            self.backbones[key] = FrozenBackbones(*key, cfg.data.max_text_tokens).eval()
        bb = self.backbones[key]
        dataset = WholeClips(examples, cfg.data.sample_rate, bb.speech is not None, audio_loader_for(cfg.data))
        for idx in batches:
            batch = collate([dataset[i] for i in idx])
            with torch.no_grad():
                yield bb, SimpleNamespace(ids=batch.ids, feats=bb(batch.waves, batch.wave_lengths, batch.texts,
                                                                   torch.device("cpu")))


def _member_probs(folder: Path, entry: dict, test_tree: dict, examples, features: dict) -> np.ndarray:
    """One member's class probabilities on the examples (rows in the examples' order)."""
    from ser_hpc.config import config_from_dict
    from ser_hpc.models.head import build_head
    tree = yaml.safe_load((folder / entry["config"]).read_text(encoding="utf-8"))
    tree["data"] = {**test_tree["data"], "labels": None, "label_map": test_tree["data"].get("label_map")}
    cfg = config_from_dict(tree, f"{folder / entry['config']} on another corpus")
    labels = yaml.safe_load((folder / entry["config"]).read_text(encoding="utf-8"))["data"]["labels"]
    source = features.setdefault(yaml.safe_dump(test_tree["data"], sort_keys=True), _Features(test_tree))
    order = {e.id: i for i, e in enumerate(examples)}
    probs = np.zeros((len(examples), len(labels)))
    head = None
    for shapes, batch in source.batches(cfg, examples):
        if head is None:
            head = build_head(cfg.model, shapes, len(labels))
            head.load_state_dict(load_file(str(folder / entry["head"])))
            head.eval()
        feats = batch.feats
        with torch.no_grad():
            logits = head(SimpleNamespace(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                                             for k, v in vars(feats).items()}))
        rows = [order[i] for i in batch.ids]
        probs[rows] = torch.softmax(logits, dim=1).numpy()
    return probs


def evaluate_pair(ensemble_dir: Path, plan: dict, train: str, test: str, cache: dict) -> dict[str, Any]:
    import json
    from ser_hpc.inference.ensemble import fold_ensemble_dirs
    clips, test_labels, has_text = test_clips(plan, test)
    dirs = fold_ensemble_dirs(ensemble_dir)
    meta = json.loads((dirs[0] / "ensemble.json").read_text(encoding="utf-8"))
    train_labels = list(meta["labels"])
    if not has_text and any("text" in (m.get("modalities") or "") for m in meta["members"]):
        raise AggregateError(f"cross-corpus {train} -> {test}: {train}'s ensemble reads transcriptions, "
                             f"{test} has none")
    shared = shared_classes(train_labels, test_labels)
    if not shared:
        raise AggregateError(f"cross-corpus {train} -> {test}: no class in common ({', '.join(train_labels)} vs "
                             f"{', '.join(test_labels)})")
    test_tree = _corpus_data(plan, test)[0]
    examples = [c.example for c in clips]
    scores = []
    for d in dirs:  # a fold ensemble: the mean of its folds' scores, as jobs/predict.py
        m = json.loads((d / "ensemble.json").read_text(encoding="utf-8"))
        member = np.stack([_member_probs(d, e, test_tree, examples, cache) for e in m["members"]])
        scores.append(combine(member, m.get("method", "mean"))[0])
    probs = np.mean(scores, axis=0)
    cols = [train_labels.index(c) for c in shared]
    keep = [i for i, c in enumerate(clips) if c.label.lower() in {s.lower() for s in shared}]
    dropped = Counter(c.label for c in clips if c.label.lower() not in {s.lower() for s in shared})
    restricted = probs[keep][:, cols]
    restricted = restricted / np.maximum(restricted.sum(axis=1, keepdims=True), 1e-12)
    lower = [s.lower() for s in shared]
    y = np.array([lower.index(clips[i].label.lower()) for i in keep])
    pred = restricted.argmax(axis=1)
    figs = score(y, pred, shared)
    return {"train": train, "test": test, "classes": shared, "macro_f1": figs["macro_f1"], "ua": figs["ua"],
            "wa": figs["wa"], "macro_f1_ci95": list(bootstrap_ci(y, pred, len(shared))), "n_clips": len(keep),
            "dropped_test_clips": dict(dropped), "train_classes_not_in_test": [c for c in train_labels
                                                                              if c not in shared]}


def evaluate_cross(stage: Path, plan: dict, built: list[str], notes: list[str]) -> list[dict]:
    spec = plan["cross_corpus"]
    cache: dict = {}
    out = []
    for train in spec["train"]:
        if train not in built:
            notes.append(f"cross-corpus: {train} has no ensemble: not evaluated")
            continue
        for test in spec["test"]:
            if test == train:
                continue
            try:
                out.append(evaluate_pair(stage / train, plan, train, test, cache))
            except AggregateError as exc:
                notes.append(str(exc))
    return out


def _axes(cross: list[dict], order: list[str]) -> tuple[list[str], list[str]]:
    """Train and test corpora in the grid's corpus order."""
    return ([c for c in order if any(x["train"] == c for x in cross)],
            [c for c in order if any(x["test"] == c for x in cross)])


def render_md(cross: list[dict], order: list[str]) -> list[str]:
    trains, tests = _axes(cross, order)
    by = {(c["train"], c["test"]): c for c in cross}
    lines = ["## Cross-corpus (rows: the ensemble trained on; columns: the test split scored)", "",
             "Macro-F1 in % over the classes both corpora share [95 % CI], n clips scored; UA / WA below.", "",
             "| train \\ test | " + " | ".join(tests) + " |", "|---|" + "---:|" * len(tests)]
    for t in trains:
        cells = []
        for s in tests:
            c = by.get((t, s))
            cells.append("—" if c is None else f"{100 * c['macro_f1']:.2f} [{100 * c['macro_f1_ci95'][0]:.2f}, "
                         f"{100 * c['macro_f1_ci95'][1]:.2f}] (n={c['n_clips']}; UA {100 * c['ua']:.2f}, "
                         f"WA {100 * c['wa']:.2f})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {c['train']} -> {c['test']}: classes {', '.join(c['classes'])}; dropped test clips "
                     f"{sum(c['dropped_test_clips'].values())} ("
                     + (", ".join(f"{k} {v}" for k, v in c["dropped_test_clips"].items()) or "none")
                     + "); train classes not in the test corpus: "
                     + (", ".join(c["train_classes_not_in_test"]) or "none") for c in cross]
    return lines


def plot(cross: list[dict], order: list[str], path: Path, grid: str) -> None:
    from ser_hpc.ensemble.plots import plot_heatmap
    trains, tests = _axes(cross, order)
    by = {(c["train"], c["test"]): c["macro_f1"] for c in cross}
    matrix = np.array([[by.get((t, s), np.nan) for s in tests] for t in trains], dtype=float)
    plot_heatmap(matrix, trains, tests, path, f"{grid}: cross-corpus macro-F1 (shared classes)", "test corpus")
