"""One ONNX graph per backbone pair, with the heads of every member that reads it.

    DEST/group_<g>.onnx      inputs  input_values [batch, samples] float32 (raw mono waveform,
                                     zero-padded), wave_lengths [batch] int64 (real samples),
                                     input_ids [batch, tokens] int64, text_attention_mask
                                     [batch, tokens] int64 (only the inputs its backbones read)
                             output  member_probs [batch, members, classes] float32
                             Batch, samples and tokens are dynamic axes. The per-clip
                             normalisation (zero mean, unit variance) is inside the graph.
    DEST/group_<g>.json      its preprocessing: sample rate, whether padded batches are
                             exact (group-norm encoders: feed one clip at a time), the
                             tokenizer folder and token limit, minimum clip length
                             (repeat-padded), windows for long clips, members in output order
    DEST/tokenizers/<name>/  the text backbones' tokenizers
    DEST/onnx_ensemble.json  classes, members, ensembles (method; one per fold) and graphs:
                             what ser_hpc.inference.onnx_predictor (jobs/predict.py --onnx) reads

The graphs come from the TorchScript exporter (``torch.onnx.export(dynamo=False)``, opset
17): on torch 2.9.1 with transformers 5 the dynamo exporter refuses a dynamic batch axis
(a batch != 1 guard inside the speech encoder). Each graph is run with onnxruntime on two
test batches right after export and must match the PyTorch forward within 1e-4.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ser_hpc.atomic_io import write_json

from . import ExportError
from .build import CHECK_TEXT, ExportModel, _check_input

OPSET = 17
GRAPH_TOLERANCE = 1e-4
SPEECH_INPUTS = ("input_values", "wave_lengths")
TEXT_INPUTS = ("input_ids", "text_attention_mask")
MANIFEST = "onnx_ensemble.json"
FORMAT = "ser-hpc-onnx"
DYNAMIC_AXES = {"input_values": {0: "batch", 1: "samples"}, "wave_lengths": {0: "batch"},
                "input_ids": {0: "batch", 1: "tokens"}, "text_attention_mask": {0: "batch", 1: "tokens"},
                "member_probs": {0: "batch"}}


class _Graph(nn.Module):
    """A group's forward with positional tensor inputs (what the exporter traces)."""

    def __init__(self, group, names: tuple[str, ...]):
        super().__init__()
        self.group, self.names = group, names

    def forward(self, *tensors):
        return self.group(**dict(zip(self.names, tensors)))


def _inputs(export: ExportModel, g: int, n: int) -> dict[str, torch.Tensor]:
    """A batch of ``n`` clips of different lengths (and transcriptions) for group ``g``."""
    group, spec = export.model.groups[g], export.config.groups[g]
    out = {}
    if group.has_speech:
        wave = torch.from_numpy(_check_input(spec["sample_rate"]))
        lengths = [wave.shape[0] - k * wave.shape[0] // 4 for k in range(n)]
        waves = torch.zeros(n, lengths[0])
        for k, length in enumerate(lengths):
            waves[k, :length] = wave[:length] * (1 + 0.5 * k)
        out.update(input_values=waves, wave_lengths=torch.tensor(lengths, dtype=torch.long))
    if group.has_text:
        texts = [CHECK_TEXT, "muy bien", "no sé qué decir de todo esto, la verdad"][:n]
        enc = group.tokenizer(texts, padding=True, truncation=True, max_length=spec["max_text_tokens"],
                              return_tensors="pt")
        out.update(input_ids=enc["input_ids"].long(), text_attention_mask=enc["attention_mask"].long())
    return out


def _check_graph(path: Path, module: nn.Module, batches: list[dict]) -> float:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds in batches:
        with torch.inference_mode():
            want = module(*feeds.values()).numpy()
        got = session.run(["member_probs"], {k: v.numpy() for k, v in feeds.items()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= GRAPH_TOLERANCE:
        raise ExportError(f"{path.name}: onnxruntime gives member probabilities {worst:.2e} away from PyTorch's "
                          f"(tolerance {GRAPH_TOLERANCE:g}); this backbone does not export faithfully to ONNX")
    return worst


def export_graph(export: ExportModel, g: int, path: Path) -> float:
    group = export.model.groups[g]
    names = (SPEECH_INPUTS if group.has_speech else ()) + (TEXT_INPUTS if group.has_text else ())
    per_clip, group.per_clip = group.per_clip, False  # the graph is the batched forward
    try:
        module = _Graph(group, names).eval()
        example = _inputs(export, g, 2)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; the graph is checked below
            torch.onnx.export(module, tuple(example.values()), str(path), input_names=list(names),
                              output_names=["member_probs"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={k: v for k, v in DYNAMIC_AXES.items() if k in names or k == "member_probs"})
        # Unpadded single clips (how group-norm encoders are fed) and a padded batch of 3.
        return _check_graph(path, module, [_inputs(export, g, 1), _inputs(export, g, 3)])
    finally:
        group.per_clip = per_clip


def write_onnx(export: ExportModel, out: Path) -> list[float]:
    """Every group's graph, its sidecar JSON, the tokenizers and the manifest; returns each
    graph's largest deviation from PyTorch on the check batches."""
    out = Path(out)
    cfg = export.config
    diffs, graphs, tokenizers = [], [], {}
    for g, group in enumerate(export.model.groups):
        spec = cfg.groups[g]
        name = f"group_{g}"
        diffs.append(export_graph(export, g, out / f"{name}.onnx"))
        tok_dir = None
        if group.has_text:
            tok_dir = tokenizers.get(spec["text"])
            if tok_dir is None:
                tok_dir = "tokenizers/" + Path(spec["text"]).name
                group.tokenizer.save_pretrained(out / tok_dir)
                tokenizers[spec["text"]] = tok_dir
        sidecar = {
            "graph": f"{name}.onnx", "opset": OPSET,
            "inputs": {k: v for k, v in {
                "input_values": "float32 [batch, samples]: raw mono waveform at sample_rate, -1..1, zero-padded",
                "wave_lengths": "int64 [batch]: real samples per clip",
                "input_ids": "int64 [batch, tokens]: the tokenizer's ids (padding=True, truncation at max_text_tokens)",
                "text_attention_mask": "int64 [batch, tokens]: the tokenizer's attention mask"}.items()
                if (k in SPEECH_INPUTS and group.has_speech) or (k in TEXT_INPUTS and group.has_text)},
            "output": "member_probs float32 [batch, members, classes]: each member's softmax probabilities",
            "labels": list(export.labels),
            "members": [cfg.members[i]["run_id"] for i in spec["members"]],
            "speech": None if not group.has_speech else {
                "backbone": spec["speech_source"], "sample_rate": spec["sample_rate"],
                "normalize": spec["normalize"], "normalize_in_graph": True,
                "padded_batches": spec["accepts_padding_mask"],
                "min_seconds": cfg.min_seconds, "window_seconds": cfg.window_seconds, "hop_seconds": cfg.hop_seconds},
            "text": None if not group.has_text else {
                "backbone": spec["text_source"], "tokenizer": tok_dir, "max_text_tokens": spec["max_text_tokens"],
                "missing_text": "members reading text are left out for clips without a transcription"},
        }
        write_json(out / f"{name}.json", sidecar)
        graphs.append({"name": name, "graph": f"{name}.onnx", "preprocessing": f"{name}.json",
                       "members": list(spec["members"]), "tokenizer": tok_dir,
                       "sample_rate": spec["sample_rate"] if group.has_speech else None,
                       "padded_batches": spec["accepts_padding_mask"], "max_text_tokens": spec["max_text_tokens"]})
    write_json(out / MANIFEST, {
        "format": FORMAT, "version": 1, "labels": list(export.labels),
        "members": [{k: m[k] for k in ("run_id", "name", "modalities", "group", "seed")} for m in cfg.members],
        "ensembles": cfg.ensembles, "graphs": graphs,
        "min_seconds": cfg.min_seconds, "window_seconds": cfg.window_seconds, "hop_seconds": cfg.hop_seconds})
    return diffs
