"""DEST/README.md: a Hugging Face model card (YAML front matter + Markdown) for an export.

Everything comes from the ensemble folder(s) and the grid around them: ensemble.json
(members, method, macro-F1 with CIs, UA, WA, ECE, chance), dev_probs.csv / test_probs.csv
(UA and WA intervals: the same stratified bootstrap, seed and resamples as macro-F1),
each member's config.yaml (corpus, splits, seeds) and, when the ensemble still sits in
results/<grid>/, the grid's grid.yaml and manifest.json (git commit). Figures the folder
cannot give (a corpus no longer on disk) are said to be unknown, never guessed.

The front matter's standard keys (language, pipeline_tag, library_name, tags, base_model,
model-index) follow the Hugging Face model-card spec; ``ser_hpc`` holds every figure in
machine-readable form (fractions, not percent).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ser_hpc.ensemble.collect import read_probs
from ser_hpc.ensemble.leaderboard import pct
from ser_hpc.ensemble.report_stats import table, with_ci
from ser_hpc.ensemble.stats import N_RESAMPLES, SEED, chance_macro_f1, percentile_ci, stratified_resamples
from ser_hpc.grid.manifest import read as read_manifest
from ser_hpc.provenance import git_state

from .build import ExportModel

SPLIT_NAMES = {"dev": "validation", "test": "test"}
LANGUAGES = {"es": "Spanish", "en": "English", "de": "German", "fr": "French", "it": "Italian", "pt": "Portuguese",
             "zh": "Chinese", "el": "Greek", "ur": "Urdu", "fa": "Persian", "ru": "Russian", "ca": "Catalan"}
EMOSPEECH_STYLE = ("natural (not acted) Spanish speech: segments of online videos (MEACorpus 2023, the EmoSPeech "
                   "2024 release)")
DEMO_STYLE = ("synthetic speech from ser-hpc's demo generator (formant voices, Spanish template sentences), "
              "neither acted nor natural; the backbones are random: the figures only show that the pipeline learns")


# ----------------------------------------------------------------------------- figures
def _ua_wa(y: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """UA (mean recall over the classes present) and WA (accuracy) of (..., n) arrays."""
    lead, n = y.shape[:-1], y.shape[-1]
    m = int(np.prod(lead)) if lead else 1
    rows = np.arange(m)[:, None]
    cm = np.bincount(((rows * n_classes + y.reshape(m, n)) * n_classes + pred.reshape(m, n)).ravel(),
                     minlength=m * n_classes * n_classes).reshape(m, n_classes, n_classes)
    support = cm.sum(axis=2)
    recall = np.divide(np.diagonal(cm, axis1=1, axis2=2), support, out=np.zeros(support.shape), where=support > 0)
    present = (support > 0).sum(axis=1)
    ua = np.divide(recall.sum(axis=1), present, out=np.zeros(m), where=present > 0)
    wa = np.trace(cm, axis1=1, axis2=2) / n
    return ua.reshape(lead), wa.reshape(lead)


def split_figures(path: Path, labels: tuple[str, ...]) -> dict[str, Any] | None:
    """n, class counts and (with gold labels) UA / WA with bootstrap CIs from a probs CSV."""
    if not path.is_file():
        return None
    table = read_probs(path)
    out: dict[str, Any] = {"n": len(table.ids), "labelled": table.has_gold}
    if not table.has_gold or not table.ids:
        return out
    y = np.asarray(table.gold, dtype=np.int64)
    pred = table.probs.argmax(axis=1)
    c = len(labels)
    ua, wa = _ua_wa(y, pred, c)
    idx = stratified_resamples(y, N_RESAMPLES, SEED)
    ua_b, wa_b = _ua_wa(y[idx], pred[idx], c)
    counts = np.bincount(y, minlength=c)
    share = counts / counts.sum()
    out.update(counts={labels[k]: int(counts[k]) for k in range(c)},
               ua=float(ua), ua_ci95=list(percentile_ci(ua_b)), wa=float(wa), wa_ci95=list(percentile_ci(wa_b)),
               chance={**chance_macro_f1(y, c), "ua_uniform": 1 / c, "ua_majority": 1 / int((counts > 0).sum()),
                       "wa_uniform": 1 / c, "wa_majority": float(share.max())})
    return out


def ensemble_figures(folder: Path, meta: dict, labels: tuple[str, ...]) -> dict[str, Any]:
    """dev and test figures of one ensemble folder (macro-F1 from ensemble.json, UA/WA CIs from the CSVs)."""
    figs: dict[str, Any] = {}
    for split, prefix in (("dev", "dev_"), ("test", "test_")):
        f = split_figures(folder / f"{split}_probs.csv", labels) or {}
        macro = meta.get(f"{prefix}macro_f1")
        if macro is None and not f:
            continue
        ua = meta.get("ua_dev" if split == "dev" else "test_ua")
        wa = meta.get("wa_dev" if split == "dev" else "test_wa")
        chance = dict(f.get("chance") or {})
        chance.update((meta.get("chance_macro_f1") or {}).get(split) or {})
        figs[split] = {"n": f.get("n"), "labelled": f.get("labelled", macro is not None), "counts": f.get("counts"),
                       "macro_f1": macro, "macro_f1_ci95": meta.get(f"{prefix}macro_f1_ci95"),
                       "ua": ua if ua is not None else f.get("ua"), "ua_ci95": f.get("ua_ci95"),
                       "wa": wa if wa is not None else f.get("wa"), "wa_ci95": f.get("wa_ci95"),
                       "ece": meta.get(f"{split}_ece"), "chance": chance or None}
        if split == "dev":
            figs[split]["macro_f1_crossfit"] = meta.get("dev_macro_f1_crossfit")
    return figs


# ----------------------------------------------------------------------------- corpus and grid
def _member_config(folder: Path, meta: dict) -> dict:
    for m in meta.get("members") or []:
        path = folder / (m.get("config") or "")
        if m.get("config") and path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {}


def split_counts(tree: dict) -> dict[str, Any] | None:
    """train / dev / test clip counts per class, read through the training code's own splitter."""
    try:
        from ser_hpc.config import config_from_dict
        from ser_hpc.data.sources import load_splits
        cfg = config_from_dict(tree, "member config.yaml")
        splits = load_splits(cfg.data, open_audio=False)
    except Exception as exc:  # noqa: BLE001 - the corpus may be gone; the card says so
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out = {}
    for name in ("train", "dev", "test"):
        items = getattr(splits, name)
        counts = {label: 0 for label in splits.labels}
        for e in items:
            if e.label is not None:
                counts[splits.labels[e.label]] += 1
        out[name] = {"n": len(items), "counts": counts if any(counts.values()) else None}
    return out


def describe_corpus(tree: dict, language: str | None, style: str | None) -> dict[str, Any]:
    data = tree.get("data") or {}
    fmt = data.get("format") or "emospeech"
    train_csv = Path(data.get("train_csv") or "")
    demo = False
    manifest = train_csv.parent / "manifest.json" if data.get("train_csv") else None
    if manifest is not None and manifest.is_file():
        try:
            demo = "generator_version" in (json.loads(manifest.read_text(encoding="utf-8")).get("params") or {})
        except (OSError, ValueError):
            demo = False
    if demo:
        name, lang, speech = "ser-hpc demo corpus (synthetic, EmoSPeech format)", "es", DEMO_STYLE
    elif fmt == "emospeech":
        name, lang, speech = "EmoSPeech 2024 (MEACorpus 2023)", "es", EMOSPEECH_STYLE
    else:
        name = f"{fmt} corpus ({data.get('root') or data.get('manifest') or data.get('train_csv') or '?'})"
        lang, speech = None, None
    return {"name": name, "format": fmt, "language": language or lang,
            "speech": style or speech or "not stated (pass --speech-style to jobs/export.py)",
            "train_csv": data.get("train_csv"), "dev_csv": data.get("dev_csv"),
            "dev_fraction": data.get("dev_fraction"), "test_csv": data.get("test_csv"),
            "sample_rate": data.get("sample_rate")}


def grid_provenance(folder: Path) -> dict[str, Any]:
    """The grid folder around an ensemble (results/<grid>/ensemble.<stamp>/[fold_K/])."""
    for grid in (folder.parent, folder.parent.parent):
        if (grid / "grid.yaml").is_file() or (grid / "manifest.json").is_file():
            break
    else:
        return {"grid_dir": None}
    out: dict[str, Any] = {"grid_dir": str(grid), "name": grid.name}
    launches = read_manifest(grid)["launches"]
    if launches:
        last = launches[-1]
        out.update(git_commit=last.get("git_commit"), git_dirty=last.get("git_dirty"),
                   launched=last.get("submitted"), versions=last.get("versions"))
    if (grid / "grid.yaml").is_file():
        out["config"] = (grid / "grid.yaml").read_text(encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- the card
def _pct(v) -> str:
    return pct(v, missing="—")


def _hub_id(name: str | None) -> bool:
    if not name or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    from ser_hpc.models.encoders import _hub_id_problem
    return _hub_id_problem(name) is None


def card_data(export: ExportModel, fmt: str, language: str | None = None, style: str | None = None) -> dict:
    """Every figure and fact the card shows, as one dict (the front matter's ``ser_hpc`` key)."""
    labels = export.labels
    top_meta = json.loads((export.top / "ensemble.json").read_text(encoding="utf-8"))
    ensembles = []
    for folder, ens in zip(export.folders, export.config.ensembles):
        meta = json.loads((folder / "ensemble.json").read_text(encoding="utf-8"))
        tree = _member_config(folder, meta)
        ensembles.append({"name": ens["name"], "fold": ens.get("fold"), "folder": str(folder),
                          "method": ens["method"], "selection": meta.get("selection"), "top_k": meta.get("top_k"),
                          "n_members": len(ens["members"]), "figures": ensemble_figures(folder, meta, labels),
                          "splits": split_counts(tree) if tree else None,
                          "configurations": [{"name": c.get("name"), "seeds": c.get("seeds")}
                                             for c in meta.get("configurations") or []]})
    tree = _member_config(export.folders[0], json.loads((export.folders[0] / "ensemble.json").read_text()))
    corpus = describe_corpus(tree, language, style)
    members = []
    for m, entry in zip(export.config.members, export.members_meta):
        g = export.config.groups[m["group"]]
        members.append({"run_id": m["run_id"], "name": m["name"], "modalities": m["modalities"],
                        "ensemble": export.config.ensembles[m["ensemble"]]["name"], "seed": m.get("seed"),
                        "speech": g["speech_source"] if "audio" in m["modalities"] else None,
                        "text": g["text_source"] if "text" in m["modalities"] else None,
                        "fine_tuned_backbone": bool(entry.get("backbone_weights")),
                        "head": m["head"], "dev_macro_f1": entry.get("dev_macro_f1"),
                        "test_macro_f1": entry.get("test_macro_f1")})
    backbones = [{"kind": b.kind, "source": b.source, "subfolder": b.subfolder, "fine_tuned_by": b.tuned_by}
                 for b in export.backbones]
    out = {"format": fmt, "classes": list(labels), "sampling_rate": export.config.sampling_rate, "corpus": corpus,
           "ensembles": ensembles,
           "method": sorted({e["method"] for e in ensembles}), "members": members, "backbones": backbones,
           "seeds": sorted({m["seed"] for m in members if m.get("seed") is not None}),
           "grid": grid_provenance(export.folders[0]),
           "export": {"ser_hpc_commit": git_state()[0], "created": _dt.datetime.now(_dt.timezone.utc).isoformat(
               timespec="seconds"), "source": str(export.top), "check_max_abs_diff": export.check_max_diff,
               "notes": export.notes}}
    if top_meta.get("kind") == "folds":
        out["folds_summary"] = {k: top_meta.get(k) for k in ("mean", "std", "dev_mean", "dev_std")}
    return out


def _front_matter(data: dict) -> dict:
    corpus = data["corpus"]
    first = data["ensembles"][0]["figures"]
    name = f"ser-hpc ensemble ({data['grid'].get('name') or Path(data['export']['source']).name})"
    results = []
    if len(data["ensembles"]) == 1:
        for split in ("test", "dev"):
            f = first.get(split)
            if not f or f.get("macro_f1") is None:
                continue
            metrics = [{"type": "f1", "name": f"{split} macro-F1", "value": round(f["macro_f1"], 4),
                        "args": {"average": "macro"}}]
            if f.get("ua") is not None:
                metrics.append({"type": "recall", "name": f"{split} UA (unweighted average recall)",
                                "value": round(f["ua"], 4), "args": {"average": "macro"}})
            if f.get("wa") is not None:
                metrics.append({"type": "accuracy", "name": f"{split} WA (accuracy)", "value": round(f["wa"], 4)})
            results.append({"task": {"type": "audio-classification", "name": "Speech emotion recognition"},
                            "dataset": {"name": corpus["name"], "type": corpus["format"],
                                        "split": SPLIT_NAMES[split]},
                            "metrics": metrics})
    front = {"library_name": "transformers" if data["format"] == "hf" else "onnx",
             "pipeline_tag": "audio-classification",
             "tags": ["speech-emotion-recognition", "audio-classification", "ensemble", "ser-hpc",
                      *(["custom_code"] if data["format"] == "hf" else ["onnx"])]}
    if corpus.get("language"):
        front["language"] = [corpus["language"]]
    hub = sorted({b["source"] for b in data["backbones"] if _hub_id(b["source"])})
    if hub:
        front["base_model"] = hub
    front["metrics"] = ["f1", "recall", "accuracy"]
    if results:
        front["model-index"] = [{"name": name, "results": results}]
    front["ser_hpc"] = _compact(data)
    return front


def _compact(data: dict) -> dict:
    """The figures for the front matter: rounded, without the head architectures and grid.yaml
    (both are in the card's body)."""
    def rnd(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rnd(x) for x in v]
        return v
    out = {k: v for k, v in data.items() if k not in ("members", "grid")}
    out["members"] = [{k: m[k] for k in ("run_id", "ensemble", "modalities", "seed", "fine_tuned_backbone",
                                         "dev_macro_f1", "test_macro_f1")} for m in data["members"]]
    out["grid"] = {k: data["grid"].get(k) for k in ("name", "grid_dir", "git_commit", "git_dirty", "launched")}
    out["ensembles"] = [{k: v for k, v in e.items() if k != "configurations"} for e in data["ensembles"]]
    return rnd(out)


def _usage(data: dict) -> list[str]:
    audio_only = all(m["modalities"] == "audio" for m in data["members"])
    needs_text = any("text" in m["modalities"] for m in data["members"])
    if data["format"] == "onnx":
        return ["```bash",
                "python jobs/predict.py --onnx THIS_FOLDER --csv clips.csv --audio-dir clips/ --out preds.csv",
                "```",
                "`jobs/predict.py` comes with ser-hpc; the graphs take raw 16 kHz waveforms (`group_<g>.json` "
                "beside each graph lists its inputs, sample rate, tokenizer and windowing; "
                "`onnx_ensemble.json` the members and how they are combined)."]
    lines = ["```python", "from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, pipeline",
             "", 'model = AutoModelForAudioClassification.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
             'fe = AutoFeatureExtractor.from_pretrained("THIS_FOLDER")',
             f'inputs = fe([waveform], sampling_rate={data["sampling_rate"]}, return_tensors="pt", padding=True)  '
             f'# mono float, {data["sampling_rate"]} Hz']
    if needs_text:
        lines.append('out = model(**inputs, text=["la transcripción del clip"])   # one transcription per clip')
    else:
        lines.append("out = model(**inputs)")
    lines += ["out.scores   # (clips, classes): the ensemble's scores; model.config.id2label names the columns", ""]
    if audio_only:
        lines += ['clf = pipeline("audio-classification", model="THIS_FOLDER", trust_remote_code=True)',
                  'clf("clip.wav", top_k=None)']
    else:
        lines += ['clf = pipeline("audio-classification", model="THIS_FOLDER", trust_remote_code=True)',
                  'clf("clip.wav", text="la transcripción del clip", top_k=None)']
    lines.append("```")
    if needs_text and not audio_only:
        has_audio_only = any(m["modalities"] == "audio" for m in data["members"])
        lines.append("Members that read text need the transcription (`text=`); without it "
                     + ("only the audio-only members score the clip." if has_audio_only
                        else "the model refuses the clip (every member reads text)."))
    return lines


def render(data: dict) -> str:
    front = yaml.safe_dump(_front_matter(data), sort_keys=False, allow_unicode=True, width=120, default_flow_style=None)
    c, ens = data["corpus"], data["ensembles"]
    title = data["grid"].get("name") or Path(data["export"]["source"]).name
    lines = [f"# Speech emotion recognition ensemble: {title}", "",
             f"An ensemble of {len(data['members'])} heads on pretrained speech / text encoders, trained with "
             f"ser-hpc (the EmoSPeech 2024 winning system: attention pooling, MLP heads, "
             f"ensemble of the best heads), exported as "
             + ("a transformers model (custom code)." if data["format"] == "hf" else "ONNX graphs for onnxruntime.")
             + (f" It is the average of {len(ens)} fold ensembles." if len(ens) > 1
                else f" It is the {ens[0]['method']} of its members."),
             "", "## How to use", "", *_usage(data), "",
             "## Classes", "", ", ".join(f"`{x}`" for x in data["classes"]) + " (the order of the score columns).",
             "", "## Training data", "",
             f"Corpus: {c['name']}; language: {_language(c.get('language'))}; speech: "
             f"{c['speech']}. Audio at {c.get('sample_rate') or 16000} Hz."]
    for e in ens:
        sp = e.get("splits") or {}
        head = f"fold {e['fold']}" if e.get("fold") is not None else e["name"]
        if sp.get("error"):
            lines += ["", f"{head}: the corpus could not be read at export time ({sp['error']}); "
                      "dev/test counts below come from the ensemble's probability files."]
            sp = {}
        rows = []
        for split in ("train", "dev", "test"):
            s = sp.get(split) or {}
            fig = e["figures"].get(split) or {}
            n = s.get("n", fig.get("n"))
            counts = s.get("counts") or fig.get("counts")
            rows.append([split, "—" if n is None else n,
                         *((counts or {}).get(k, "—") if counts else "—" for k in data["classes"])])
        lines += ["", f"Clips per split ({head}; the dev split "
                  + (f"is {c['dev_csv']}" if c.get("dev_csv") else f"is a seeded stratified {c.get('dev_fraction')} "
                     "of the training CSV") + "):", "", *table(["split", "clips", *data["classes"]], rows)]
    lines += ["", "## Backbones", "", *table(
        ["kind", "source (at training time)", "folder here", "fine-tuned layers"],
        [[b["kind"], b["source"], b["subfolder"] if data["format"] == "hf" else "inside the graphs",
          b["fine_tuned_by"] or "no (frozen)"] for b in data["backbones"]])]
    lines += ["", "## Ensemble members", "", f"Method: {', '.join(data['method'])} "
              "(mean: mean of the members' probabilities; vote: each member votes for its top class, scores are "
              "vote shares, ties go to the highest mean probability)"
              + ("; the fold ensembles' scores are averaged." if len(ens) > 1 else "."), "",
              *table(["run", "ensemble", "modalities", "seed", "pooling", "fusion", "hidden layers",
                       "dev macro-F1", "test macro-F1"],
                      [[m["run_id"], m["ensemble"], m["modalities"], m["seed"], m["head"]["pooling"],
                        m["head"]["fusion"], m["head"]["hidden_layers"], _pct(m["dev_macro_f1"]),
                        _pct(m["test_macro_f1"])] for m in data["members"]])]
    lines += ["", "## Results", "",
              "Percent; brackets: 95 % CI, stratified bootstrap over the split's clips (1000 resamples, percentile "
              "interval, the aggregation's seed). Dev is selection-biased: it chose the members and each run's "
              "checkpoint (the cross-fitted dev estimate removes the member-selection part). Chance: uniform "
              "guessing / always the majority class.", ""]
    rows = []
    for e in ens:
        for split in ("dev", "test"):
            f = e["figures"].get(split)
            if not f:
                continue
            ch = f.get("chance") or {}
            rows.append([e["name"], split, f.get("n") or "—", with_ci(f.get("macro_f1"), f.get("macro_f1_ci95")),
                         with_ci(f.get("ua"), f.get("ua_ci95")), with_ci(f.get("wa"), f.get("wa_ci95")),
                         f"{_pct(ch.get('uniform'))} / {_pct(ch.get('majority'))}",
                         f"{_pct(ch.get('ua_uniform'))} / {_pct(ch.get('ua_majority'))}",
                         f"{_pct(ch.get('wa_uniform'))} / {_pct(ch.get('wa_majority'))}", _pct(f.get("ece"))])
    lines += table(["ensemble", "split", "clips", "macro-F1", "UA", "WA", "chance macro-F1", "chance UA",
                     "chance WA", "ECE"], rows)
    if data.get("folds_summary") and (data["folds_summary"].get("mean") or {}):
        mean, std = data["folds_summary"]["mean"], data["folds_summary"].get("std") or {}
        lines += ["", "Over folds (test, mean ± std): " + ", ".join(
            f"{k} {_pct(mean.get(k))} ± {_pct(std.get(k))}" for k in ("macro_f1", "ua", "wa")
            if mean.get(k) is not None)]
    crossfit = [e["figures"].get("dev", {}).get("macro_f1_crossfit") for e in ens]
    if any(x is not None for x in crossfit):
        lines += ["", "Cross-fitted dev macro-F1: "
                  + ", ".join(f"{e['name']} {_pct(x)}" for e, x in zip(ens, crossfit))]
    lines += ["", "## Calibration", "",
              "Expected calibration error (ECE, 15 equal-width confidence bins) of the ensemble's scores: "
              + "; ".join(f"{e['name']} dev {_pct((e['figures'].get('dev') or {}).get('ece'))} %, test "
                          f"{_pct((e['figures'].get('test') or {}).get('ece'))} %" for e in ens)
              + ". The scores are not recalibrated after training."]
    cfgs = [(x["name"], x["seeds"]) for e in ens for x in e["configurations"] if any(x["seeds"] or [None])]
    lines += ["", "## Seeds", "", f"Member seeds (train.seed): {', '.join(map(str, data['seeds'])) or '—'}."
              + (" Configurations and their seeds: " + "; ".join(f"{n}: {s}" for n, s in cfgs) + "." if cfgs else "")]
    g = data["grid"]
    lines += ["", "## Provenance", ""]
    if g.get("grid_dir"):
        lines += [f"Grid `{g.get('name')}` ({g['grid_dir']}), launched {g.get('launched') or '?'} from git commit "
                  f"`{g.get('git_commit') or '?'}`" + (" (with uncommitted changes)" if g.get("git_dirty") else "")
                  + f"; exported from {data['export']['source']} with ser-hpc commit "
                  f"`{data['export']['ser_hpc_commit'] or '?'}` on {data['export']['created']}."]
        if g.get("config"):
            lines += ["", "<details><summary>grid.yaml</summary>", "", "```yaml", g["config"].rstrip(), "```", "",
                      "</details>"]
    else:
        lines += [f"Exported from {data['export']['source']} (a copy of an ensemble folder: the grid, its git "
                  "commit and config were not beside it) with ser-hpc commit "
                  f"`{data['export']['ser_hpc_commit'] or '?'}` on {data['export']['created']}."]
    lines += ["", "## Intended use and limitations", "", *_limitations(data)]
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def _language(code: str | None) -> str:
    if not code:
        return "one language (not stated: pass --language)"
    return f"{LANGUAGES[code]} ({code})" if code in LANGUAGES else code


def _limitations(data: dict) -> list[str]:
    c, ens = data["corpus"], data["ensembles"]
    test = [e["figures"].get("test") for e in ens]
    style = c["speech"].lower()
    other = ("real speech, acted or natural" if "synthetic" in style else
             "acted or read speech" if "natural" in style and "not acted" in style else
             "natural, spontaneous speech" if "acted" in style else "speech of another kind (acted or natural)")
    lines = [f"- **Intended use**: research on speech emotion recognition in {_language(c.get('language'))} speech "
             "like the training corpus. Not for decisions about individuals (hiring, health, policing): emotion "
             "labels are annotators' judgements of expressed emotion, not of what a person feels.",
             f"- **Language**: trained and evaluated on {_language(c.get('language'))} only; other languages and "
             "accents are untested.",
             f"- **Acted vs natural**: {c['speech']}. Performance on {other} is unknown."]
    for e, t in zip(ens, test):
        if not t:
            lines.append(f"- **Test set** ({e['name']}): none; only dev figures exist, and they are selection-biased.")
            continue
        counts = t.get("counts") or {}
        small = [k for k, v in counts.items() if 0 < v < 10]
        absent = [k for k, v in counts.items() if v == 0]
        lines.append(f"- **What the test set covers** ({e['name']}): {t.get('n')} clips"
                     + (f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else
                        " without gold labels (no test figures)")
                     + ", from the same corpus, recording conditions and labelling as training."
                     + (f" Classes with under 10 test clips ({', '.join(small)}) have wide per-class uncertainty."
                        if small else "") + (f" Absent from test: {', '.join(absent)}." if absent else "")
                     + " It does not cover other corpora, microphones, noise or channels, other speakers' "
                     "populations, or the class balance of a deployment.")
    lines += ["- **Long clips**: clips over 15 s are scored over 15 s windows (half-overlapping) whose probabilities "
              "are averaged; the heads never saw more than 15 s at once.",
              "- **Transcriptions**: members that read text were trained on the corpus's reference transcriptions; "
              "ASR output with errors is untested."]
    for note in data["export"].get("notes") or []:
        lines.append(f"- **Note**: {note}")
    return lines


def model_card(export: ExportModel, fmt: str, language: str | None = None, style: str | None = None) -> str:
    return render(card_data(export, fmt, language, style))
