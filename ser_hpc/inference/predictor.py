"""Label rows with a loaded ensemble: length-sorted batches, windows for long clips, one
backbone forward per group and batch, then the ensemble's own combination rule.

Each member's probabilities for a clip are the mean over the clip's windows; members are
then combined with the method the aggregation used (mean or vote, ensemble.combine), so a
whole clip gets the same scores as the ensemble's dev_probs.csv.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ser_hpc.data.dataset import length_sorted_batches
from ser_hpc.ensemble.combine import combine
from ser_hpc.metrics import score

from .ensemble import BackboneGroup, LoadedEnsemble
from .inputs import DecodedRows, InputRow, as_list, probe_durations, silence
from .windows import DEFAULT_HOP_FRACTION, DEFAULT_WINDOW_S, window_starts


class MissingTextError(ValueError):
    """Rows without a transcription, and no audio-only member to label them."""


@dataclass
class PredictionResult:
    rows: list[InputRow]
    probs: np.ndarray          # (n, C) ensemble scores; NaN on failed rows
    pred: np.ndarray           # (n,) class ids; -1 on failed rows
    member_probs: np.ndarray   # (members, n, C); NaN where a member did not score the row
    windows: np.ndarray        # (n,) windows scored per row (0 on failed rows)
    errors: dict[int, str]     # row index -> why it was not labelled
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    audio_s: float = 0.0       # seconds of audio labelled
    labels: tuple[str, ...] = ()  # the classes, in probability-column order

    @property
    def labelled(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i not in self.errors]

    def metrics(self) -> dict | None:
        """Scores over labelled rows that carry a gold label, or None when there are none."""
        idx = [i for i in self.labelled if self.rows[i].label is not None]
        if not idx:
            return None
        return {"n": len(idx), **score([self.rows[i].label for i in idx], self.pred[idx], self.labels)}


def check_transcriptions(ens: LoadedEnsemble, rows: list[InputRow]) -> list[str]:
    """Fail before any work when rows lack text that every member needs; else return notes."""
    missing = [r for r in rows if not r.has_text]
    needing = [m for m in ens.members if m.needs_text]
    if not missing or not needing:
        return []
    shown = "; ".join(r.where() for r in missing[:10])
    if len(missing) > 10:
        shown += f"; ... {len(missing) - 10} more"
    fallback = ens.audio_only
    if not fallback:
        raise MissingTextError(
            f"{len(missing)} row(s) have no transcription ({shown}), and every member of this ensemble uses "
            f"text ({', '.join(sorted({m.modalities for m in needing}))}): give the transcriptions "
            "(CSV column 'transcription', or --text), or use an ensemble with audio-only members")
    return [f"{len(missing)} row(s) without a transcription ({shown}) labelled by the {len(fallback)} "
            f"audio-only member(s) only: {', '.join(m.run_id for m in fallback)}"]


def _segments(group: BackboneGroup, items: list[dict], rows: list[InputRow], window_s: float,
              hop_s: float) -> list[tuple[int, np.ndarray, str]]:
    """(row index, samples, text) per window; one segment per row for a text-only group."""
    segs = []
    for it in items:
        i = it["index"]
        text = rows[i].text if rows[i].has_text else ""  # ignored by the members needing text (masked)
        if group.speech is None:
            segs.append((i, silence(), text))
            continue
        wave = it["waves"][group.sample_rate]
        window = int(round(window_s * group.sample_rate))
        hop = max(1, int(round(hop_s * group.sample_rate)))
        segs += [(i, wave[s:s + window], text) for s in window_starts(len(wave), window, hop)]
    return sorted(segs, key=lambda s: len(s[1]))


@torch.inference_mode()
def _forward(ens: LoadedEnsemble, group: BackboneGroup, segs) -> dict[int, np.ndarray]:
    """One backbone forward for the batch, then every member head of the group on it."""
    lengths = torch.tensor([len(w) for _, w, _ in segs], dtype=torch.long)
    waves = torch.zeros(len(segs), int(lengths.max()), dtype=torch.float32)
    for k, (_, w, _) in enumerate(segs):
        waves[k, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    kind = ens.device.type
    # Same autocast as the training job's evaluation, so whole clips reproduce its scores.
    with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=group.bf16):
        feats = group.backbones(waves, lengths, [t for _, _, t in segs], ens.device)
    out = {}
    for mi in group.members:
        member = ens.members[mi]
        with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=member.bf16):
            logits = member.head(feats).float()
        out[mi] = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64)
    return out


def _combine_rows(ens: LoadedEnsemble, member_probs: np.ndarray, valid: np.ndarray,
                  rows_ok: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Combine, per set of members that scored a row (usually one set for all rows)."""
    n, c = member_probs.shape[1], member_probs.shape[2]
    probs, pred = np.full((n, c), np.nan), np.full(n, -1, dtype=np.int64)
    patterns: dict[tuple, list[int]] = {}
    for i in rows_ok:
        patterns.setdefault(tuple(valid[:, i]), []).append(i)
    for pattern, idx in patterns.items():
        sel = np.flatnonzero(pattern)
        scores, p = combine(member_probs[np.ix_(sel, idx)], ens.method)
        probs[idx], pred[idx] = scores, p
    return probs, pred


def predict(ens: LoadedEnsemble, rows: list[InputRow], batch_size: int = 8, window_s: float = DEFAULT_WINDOW_S,
            hop_s: float | None = None, workers: int = 0, progress: bool | None = None,
            forward=None) -> PredictionResult:
    """Label ``rows``; audio problems become per-row errors, missing text may raise MissingTextError.

    ``forward(ens, group, segments) -> {member index: probs}`` runs one group on a batch
    (default: the PyTorch backbones and heads; onnx_predictor passes its onnxruntime one)."""
    forward = forward or _forward
    start = time.monotonic()
    hop_s = window_s * DEFAULT_HOP_FRACTION if hop_s is None else hop_s
    if window_s <= 0 or hop_s <= 0:
        raise ValueError(f"window ({window_s}) and hop ({hop_s}) must be positive")
    notes = check_transcriptions(ens, rows)
    n, m, c = len(rows), len(ens.members), len(ens.labels)
    if ens.needs_audio:
        durations, errors = probe_durations(rows)
    else:  # a text-only ensemble never opens the audio
        durations, errors = {i: float(len(r.text or "")) for i, r in enumerate(rows)}, {}
    todo = sorted(durations)
    batches = [[todo[j] for j in b] for b in length_sorted_batches([durations[i] for i in todo], batch_size)]
    loader = DataLoader(DecodedRows(rows, ens.sample_rates), batch_sampler=batches, num_workers=workers,
                        collate_fn=as_list)
    sums, counts = np.zeros((m, n, c)), np.zeros((m, n))
    show = len(todo) >= 50 if progress is None else progress
    bar = tqdm(total=len(todo), unit="clip", desc="predict", disable=not show, file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for items in loader:
        good = []
        for it in items:
            if it["error"]:
                errors[it["index"]] = it["error"]
            else:
                good.append(it)
        for group in ens.groups:
            segs = _segments(group, good, rows, window_s, hop_s)
            for k in range(0, len(segs), batch_size):
                chunk = segs[k:k + batch_size]
                idx = np.array([i for i, _, _ in chunk])
                for mi, p in forward(ens, group, chunk).items():
                    np.add.at(sums[mi], idx, p)
                    np.add.at(counts[mi], idx, 1)
        bar.update(len(items))
    bar.close()

    needs_text = np.array([mem.needs_text for mem in ens.members])
    has_text = np.array([r.has_text for r in rows])
    valid = (counts > 0) & ~(needs_text[:, None] & ~has_text[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        member_probs = np.where(valid[..., None], sums / counts[..., None], np.nan)
    rows_ok = [i for i in range(n) if i not in errors]
    probs, pred = _combine_rows(ens, member_probs, valid, rows_ok)
    windows = counts.max(axis=0) if m else np.zeros(n)
    windows[list(errors)] = 0
    audio_s = float(sum(durations[i] for i in rows_ok)) if ens.needs_audio else 0.0
    return PredictionResult(rows, probs, pred, member_probs, windows.astype(int), dict(sorted(errors.items())),
                            notes, time.monotonic() - start, audio_s, ens.labels)
