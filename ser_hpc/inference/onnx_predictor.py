"""Label recordings with an ONNX export (jobs/export.py --format onnx) and onnxruntime.

The folder's onnx_ensemble.json lists the graphs (one per backbone pair, its members'
heads inside), the members and the ensembles (one per fold for a fold ensemble). Rows are
decoded, repeat-padded, windowed and batched by the very code predict.py uses
(predictor.predict), only each group's forward is an onnxruntime session; members are
then combined per ensemble with its method and the ensembles averaged, as
combine_fold_results does, so the output CSV is predict.py's.

Encoders with group-norm feature extractors (``padded_batches`` false) are fed one clip
at a time, as ser_hpc runs them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .ensemble import EnsembleError, combine_fold_results
from .inputs import InputRow
from .predictor import PredictionResult, _combine_rows, check_transcriptions, predict
from .windows import DEFAULT_WINDOW_S

MANIFEST = "onnx_ensemble.json"
FORMAT = "ser-hpc-onnx"


@dataclass
class OnnxMember:
    run_id: str
    name: str
    modalities: str

    @property
    def needs_audio(self) -> bool:
        return "audio" in self.modalities.split("+")

    @property
    def needs_text(self) -> bool:
        return "text" in self.modalities.split("+")


@dataclass
class OnnxGroup:
    name: str
    session: object
    members: list[int]              # indices into OnnxEnsemble.members, in graph output order
    speech: str | None              # the graph's speech backbone (None: text only)
    text: str | None
    sample_rate: int
    padded_batches: bool
    max_text_tokens: int | None
    tokenizer: object = None
    inputs: tuple[str, ...] = ()


@dataclass
class OnnxEnsemble:
    path: Path
    members: list[OnnxMember]
    groups: list[OnnxGroup]
    labels: tuple[str, ...]
    ensembles: list[dict]           # {"name", "fold", "method", "members"}
    method: str = "mean"            # for predict()'s own (discarded) combination of all members
    device: str = "cpu"
    window_s: float = DEFAULT_WINDOW_S
    notes: list[str] = field(default_factory=list)

    @property
    def needs_audio(self) -> bool:
        return any(m.needs_audio for m in self.members)

    @property
    def audio_only(self) -> list[OnnxMember]:
        return [m for m in self.members if not m.needs_text]

    @property
    def sample_rates(self) -> list[int]:
        return sorted({g.sample_rate for g in self.groups if g.speech is not None})

    def view(self, ensemble: dict) -> SimpleNamespace:
        """One ensemble (fold) as predictor.check_transcriptions / _combine_rows see it."""
        members = [self.members[i] for i in ensemble["members"]]
        return SimpleNamespace(members=members, method=ensemble["method"],
                               audio_only=[m for m in members if not m.needs_text])


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder).expanduser().resolve()
    path = folder / MANIFEST
    if not path.is_file():
        raise EnsembleError(f"{path} not found: give the folder written by jobs/export.py --format onnx")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EnsembleError(f"{path}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise EnsembleError(f"{path}: 'format' is {meta.get('format')!r}, not {FORMAT!r}")
    for key in ("labels", "members", "ensembles", "graphs"):
        if not meta.get(key):
            raise EnsembleError(f"{path}: no {key!r}")
    return meta


def onnx_labels(folder: str | Path) -> tuple[str, ...]:
    return tuple(read_manifest(folder)["labels"])


def _providers(device: str) -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx_ensemble(folder: str | Path, fold: int | None = None, device: str = "cpu") -> OnnxEnsemble:
    """Open every graph of the export (onnxruntime sessions) and its tokenizers."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser().resolve()
    meta = read_manifest(folder)
    ensembles = meta["ensembles"]
    if fold is not None:
        chosen = [e for e in ensembles if e.get("fold") == fold]
        if not chosen:
            folds = [e.get("fold") for e in ensembles if e.get("fold") is not None]
            raise EnsembleError(f"{folder / MANIFEST}: no ensemble for fold {fold}"
                                + (f"; folds: {', '.join(map(str, folds))}" if folds else " (not a fold ensemble)"))
        ensembles = chosen
    members = [OnnxMember(m["run_id"], m.get("name") or m["run_id"], m["modalities"]) for m in meta["members"]]
    needed = {i for e in ensembles for i in e["members"]}
    groups = []
    for spec in meta["graphs"]:
        if not needed & set(spec["members"]):
            continue  # a graph serving only folds left out by --fold
        graph = folder / spec["graph"]
        if not graph.is_file():
            raise EnsembleError(f"{graph} not found (listed in {folder / MANIFEST})")
        try:
            session = ort.InferenceSession(str(graph), providers=_providers(device))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EnsembleError(f"{graph}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
        inputs = tuple(i.name for i in session.get_inputs())
        tokenizer = None
        if spec.get("tokenizer"):
            tok_dir = folder / spec["tokenizer"]
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            except (OSError, ValueError) as exc:
                raise EnsembleError(f"{tok_dir}: cannot load the tokenizer ({exc})") from None
        groups.append(OnnxGroup(spec["name"], session, list(spec["members"]),
                                "speech" if "input_values" in inputs else None,
                                "text" if "input_ids" in inputs else None,
                                int(spec.get("sample_rate") or 16000), bool(spec.get("padded_batches", True)),
                                spec.get("max_text_tokens"), tokenizer, inputs))
    return OnnxEnsemble(folder, members, groups, tuple(meta["labels"]), ensembles,
                        window_s=float(meta.get("window_seconds") or DEFAULT_WINDOW_S))


def onnx_forward(ens: OnnxEnsemble, group: OnnxGroup, segs) -> dict[int, np.ndarray]:
    """predictor._forward's contract on onnxruntime: {member index: probs (len(segs), C)}."""
    batches = [segs] if group.padded_batches or group.speech is None else [[s] for s in segs]
    outs = []
    for batch in batches:
        feeds = {}
        if group.speech is not None:
            lengths = np.array([len(w) for _, w, _ in batch], dtype=np.int64)
            waves = np.zeros((len(batch), int(lengths.max())), dtype=np.float32)
            for k, (_, w, _) in enumerate(batch):
                waves[k, : len(w)] = w
            feeds.update(input_values=waves, wave_lengths=lengths)
        if group.text is not None:
            enc = group.tokenizer([t for _, _, t in batch], padding=True, truncation=True,
                                  max_length=group.max_text_tokens, return_tensors="np")
            feeds.update(input_ids=enc["input_ids"].astype(np.int64),
                         text_attention_mask=enc["attention_mask"].astype(np.int64))
        outs.append(group.session.run(["member_probs"], feeds)[0])
    probs = np.concatenate(outs).astype(np.float64)  # (segments, group members, C)
    return {mi: probs[:, k] for k, mi in enumerate(group.members)}


def predict_onnx(ens: OnnxEnsemble, rows: list[InputRow], batch_size: int = 8, window_s: float = DEFAULT_WINDOW_S,
                 hop_s: float | None = None, workers: int = 0, progress: bool | None = None) -> PredictionResult:
    """Every member once (predictor.predict with onnxruntime), then each ensemble's own
    combination, then the mean over the ensembles (folds) as predict.py does."""
    views = [ens.view(e) for e in ens.ensembles]
    notes = [note for v in views for note in check_transcriptions(v, rows)]  # MissingTextError per fold
    union = predict(ens, rows, batch_size, window_s, hop_s, workers, progress, forward=onnx_forward)
    valid = ~np.isnan(union.member_probs[..., 0])
    rows_ok = union.labelled
    results = []
    for e, view in zip(ens.ensembles, views):
        idx = e["members"]
        probs, pred = _combine_rows(view, union.member_probs[idx], valid[idx], rows_ok)
        results.append(dataclasses.replace(union, probs=probs, pred=pred, member_probs=union.member_probs[idx],
                                           notes=list(dict.fromkeys(notes))))
    return dataclasses.replace(combine_fold_results(results), elapsed_s=union.elapsed_s)
