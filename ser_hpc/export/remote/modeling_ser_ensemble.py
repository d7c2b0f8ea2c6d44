"""An exported ser-hpc speech emotion ensemble as a transformers model (trust_remote_code).

Written by ser-hpc's jobs/export.py; it needs torch and transformers only (no ser-hpc).
The repository holds the backbones in subfolders (loaded with from_pretrained by relative
path, ``subfolder=``), every member's trained head in model.safetensors, and the ensemble
method in config.json.

    model = AutoModelForAudioClassification.from_pretrained(DEST, trust_remote_code=True)
    out = model(input_values, attention_mask=mask, text=["la transcripción", ...])
    out.scores      # (batch, classes): the ensemble's scores (mean probabilities, or vote shares)
    out.logits      # log(scores): softmax(logits) == scores, for pipeline("audio-classification")

``input_values``: raw mono waveforms at ``config.sampling_rate`` (float, -1..1), right-padded,
with ``attention_mask`` marking the real samples (the repository's feature extractor gives
both). The model normalises each clip itself (zero mean, unit variance, as each backbone's
feature extractor does), repeat-pads clips shorter than ``config.min_seconds`` and scores
clips longer than ``config.window_seconds`` over windows ``config.hop_seconds`` apart,
averaging each member's probabilities over the windows, exactly as ser-hpc's predict.py.
``text``: the transcriptions (a list, one per clip, or one string for one clip); members
that read text need it, and rows without one are scored by the audio-only members alone.

The head below is a copy of ser_hpc.models.head / pooling with the same parameter names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

try:
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover
    from transformers.file_utils import ModelOutput

from .configuration_ser_ensemble import SerEnsembleConfig

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")


# ----------------------------------------------------------------------------- the heads
def layers_used(mode, num_states: int) -> list[int]:
    """Hidden-state indices a layer choice reads (0 = CNN / embedding output): last, weighted,
    weighted_all, every_N, or a list of indices (as ser_hpc.models.head.layers_used)."""
    if isinstance(mode, list):
        return sorted(set(mode))
    if mode.startswith("every_"):
        step = int(mode[len("every_"):])
        return list(range(step, num_states, step)) or [num_states - 1]
    if mode == "last":
        return [num_states - 1]
    if mode == "weighted_all" or num_states == 1:
        return list(range(num_states))
    return list(range(1, num_states))


class LayerMix(nn.Module):
    def __init__(self, num_states: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.logits, dim=0)
        return torch.einsum("l,lbtd->btd", w.to(states.dtype), states)


class ModalityInput(nn.Module):
    def __init__(self, num_states: int, width: int, common: int, layers):
        super().__init__()
        self.used = layers_used(layers, num_states)
        self.mix = LayerMix(len(self.used)) if layers != "last" else None
        self.proj = nn.Linear(width, common) if width != common else nn.Identity()
        self.norm = nn.LayerNorm(common)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` [L, B, T, D]: every hidden state of the backbone."""
        if self.mix is None:
            h = states[self.used[-1]]
        else:
            h = self.mix(states[self.used[0]: self.used[-1] + 1] if self.used == list(range(self.used[0], self.used[-1] + 1))
                         else states[self.used])
        return self.norm(self.proj(h))


class AttentionPooling(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(width))
        self.scale = 1.0 / math.sqrt(width)
        self.out_width = width

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (h @ self.u.to(h.dtype)) * self.scale
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(h, mask).to(h.dtype)
        return torch.einsum("bt,bte->be", w, h)


class MeanPooling(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.out_width = width

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(h.dtype)
        total = torch.where(mask[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(1)
        return total / m.sum(1, keepdim=True).clamp_min(1)


class AttentiveStatsPooling(AttentionPooling):
    def __init__(self, width: int):
        super().__init__(width)
        self.out_width = 2 * width

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(h, mask).to(h.dtype)
        h = torch.where(mask[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        mean = torch.einsum("bt,bte->be", w, h)
        var = torch.einsum("bt,bte->be", w, h * h) - mean * mean
        return torch.cat([mean, torch.sqrt(var.clamp_min(1e-6))], dim=-1)


POOLINGS = {"attention": AttentionPooling, "mean": MeanPooling, "attentive_stats": AttentiveStatsPooling}


def mlp(width_in: int, width: int, hidden_layers: int, dropout: float, num_classes: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(hidden_layers + 1):
        blocks += [nn.Linear(width_in if i == 0 else width, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
    blocks.append(nn.Linear(width, num_classes))
    return nn.Sequential(*blocks)


class EmotionHead(nn.Module):
    """Layer mix, fusion (early: one joint sequence; late: one per modality), pooling, MLP."""

    def __init__(self, spec: dict, speech_shape, text_shape, num_classes: int):
        super().__init__()
        used = [s for s in (speech_shape, text_shape) if s is not None]
        self.fusion = spec["fusion"]
        common = spec.get("fusion_dim") or max(width for _, width in used)
        self.speech = ModalityInput(*speech_shape, common, spec["speech_layers"]) if speech_shape else None
        self.text = ModalityInput(*text_shape, common, spec["text_layers"]) if text_shape else None
        n_seq = 1 if self.fusion == "early" else len(used)
        heads = spec.get("fusion_attention_heads") or 0
        self.attention = (nn.ModuleList(nn.MultiheadAttention(common, heads, dropout=spec["dropout"], batch_first=True)
                                        for _ in range(n_seq)) if heads else None)
        self.pools = nn.ModuleList(POOLINGS[spec["pooling"]](common) for _ in range(n_seq))
        self.input_dropout = nn.Dropout(spec["dropout"])
        self.classifier = mlp(sum(p.out_width for p in self.pools), spec["head_width"], spec["hidden_layers"],
                              spec["dropout"], num_classes)

    def forward(self, speech, speech_mask, text, text_mask) -> torch.Tensor:
        parts = []
        if self.speech is not None:
            parts.append((self.speech(speech), speech_mask))
        if self.text is not None:
            parts.append((self.text(text), text_mask))
        if self.fusion == "early":
            parts = [(torch.cat([h for h, _ in parts], dim=1), torch.cat([m for _, m in parts], dim=1))]
        pooled = []
        for k, (h, mask) in enumerate(parts):
            if self.attention is not None:
                attended, _ = self.attention[k](h, h, h, key_padding_mask=~mask, need_weights=False)
                h = h + attended
            pooled.append(self.pools[k](h, mask))
        return self.classifier(self.input_dropout(torch.cat(pooled, dim=-1)))


# ----------------------------------------------------------------------------- one backbone pair
class BackboneGroup(nn.Module):
    """One backbone pair and the heads of every member that reads it.

    forward(input_values, wave_lengths, input_ids, text_attention_mask) -> the members'
    probabilities [B, members, classes]; the ONNX export is this forward, one graph per group.
    """

    def __init__(self, spec: dict, members: list[dict], num_classes: int):
        super().__init__()
        self.spec = spec
        self.has_speech, self.has_text = bool(spec.get("speech")), bool(spec.get("text"))
        self.per_clip = not spec.get("accepts_padding_mask", True)  # group-norm encoders: clip by clip
        self.heads = nn.ModuleList()
        for m in members:
            mods = m["modalities"].split("+")
            speech = (spec["speech_states"], spec["speech_width"]) if "audio" in mods else None
            text = (spec["text_states"], spec["text_width"]) if "text" in mods else None
            self.heads.append(EmotionHead(m["head"], speech, text, num_classes))
        self.speech_model = None  # attached by SerEnsembleForAudioClassification.load_backbones
        self.text_model = None
        self.tokenizer = None

    def _normalise(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.spec.get("normalize", True):
            return waves
        mask = (torch.arange(waves.shape[1], device=waves.device)[None] < lengths[:, None]).to(waves.dtype)
        n = lengths.to(waves.dtype)[:, None]
        mean = (waves * mask).sum(1, keepdim=True) / n
        var = (((waves - mean) * mask) ** 2).sum(1, keepdim=True) / n
        return (waves - mean) / torch.sqrt(var + 1e-7) * mask

    def encode_speech(self, waves: torch.Tensor, lengths: torch.Tensor):
        model = self.speech_model
        waves = self._normalise(waves, lengths)
        frames = model._get_feat_extract_output_lengths(lengths).long()
        if not self.per_clip:
            mask = torch.arange(waves.shape[1], device=waves.device)[None] < lengths[:, None]
            out = model(waves, attention_mask=mask.long(), output_hidden_states=True)
            states = torch.stack(out.hidden_states)
        else:
            per_clip = [torch.stack(model(waves[i:i + 1, : int(lengths[i])], output_hidden_states=True).hidden_states)
                        for i in range(waves.shape[0])]
            states = waves.new_zeros(len(per_clip[0]), waves.shape[0], int(frames.max()), per_clip[0].shape[-1],
                                     dtype=per_clip[0].dtype)
            for i, s in enumerate(per_clip):
                states[:, i, : s.shape[2]] = s[:, 0]
        frame_mask = torch.arange(states.shape[2], device=states.device)[None] < frames[:, None]
        return states, frame_mask

    def forward(self, input_values=None, wave_lengths=None, input_ids=None, text_attention_mask=None):
        speech = speech_mask = text = text_mask = None
        if self.has_speech:
            speech, speech_mask = self.encode_speech(input_values, wave_lengths)
        if self.has_text:
            out = self.text_model(input_ids=input_ids, attention_mask=text_attention_mask, output_hidden_states=True)
            text, text_mask = torch.stack(out.hidden_states), text_attention_mask.bool()
        logits = [head(speech, speech_mask, text, text_mask).float() for head in self.heads]
        return torch.softmax(torch.stack(logits, dim=1), dim=-1)


# ----------------------------------------------------------------------------- the ensemble
@dataclass
class SerEnsembleOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None        # log(scores)
    scores: torch.Tensor | None = None        # the ensemble's scores, rows sum to 1
    member_probs: torch.Tensor | None = None  # [B, members, classes], NaN where a member did not score the row


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Start samples of the windows covering ``n`` samples (as ser-hpc's predict.py): [0] when the clip fits."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window, hop))
    starts.append(n - window)
    return starts


class SerEnsemblePreTrainedModel(PreTrainedModel):
    config_class = SerEnsembleConfig
    base_model_prefix = "ser_ensemble"
    main_input_name = "input_values"

    def _init_weights(self, module):  # the weights all come from model.safetensors and the backbones
        pass


class SerEnsembleForAudioClassification(SerEnsemblePreTrainedModel):
    def __init__(self, config: SerEnsembleConfig):
        super().__init__(config)
        self.groups = nn.ModuleList(
            BackboneGroup(spec, [config.members[i] for i in spec["members"]], config.num_labels)
            for spec in config.groups)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Heads from model.safetensors, then the backbones from their subfolders."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.load_backbones(pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
        return loaded

    def load_backbones(self, root, **hub_kwargs) -> None:
        """Load every group's backbones (and tokenizer) from ``root``/<subfolder>; a subfolder
        shared by several groups is loaded once."""
        root = str(root)
        cache: dict = {}
        ref = next(self.parameters())

        def load(loader, sub):
            key = (loader.__name__, sub)
            if key not in cache:
                obj = loader.from_pretrained(root, subfolder=sub, **hub_kwargs)
                if isinstance(obj, nn.Module):
                    if getattr(obj.config, "mask_time_prob", 0):
                        obj.config.mask_time_prob = 0.0  # SpecAugment is for pretraining only
                    obj = obj.to(device=ref.device, dtype=ref.dtype).eval()
                    for p in obj.parameters():
                        p.requires_grad_(False)
                cache[key] = obj
            return cache[key]

        for group in self.groups:
            if group.has_speech:
                group.speech_model = load(AutoModel, group.spec["speech"])
            if group.has_text:
                group.text_model = load(AutoModel, group.spec["text"])
                group.tokenizer = load(AutoTokenizer, group.spec["text"])

    # ---- inputs
    def _texts(self, text, batch: int) -> list[str | None]:
        if text is None:
            return [None] * batch
        if isinstance(text, str):
            text = [text]
        text = list(text)
        if len(text) != batch:
            raise ValueError(f"text: {len(text)} transcription(s) for {batch} clip(s)")
        return text

    def _segments(self, input_values, attention_mask, batch: int):
        """(row, waveform) per window, after repeat-padding short clips."""
        if input_values is None:
            return [(b, None) for b in range(batch)]
        waves = input_values.float()
        if waves.dim() == 1:
            waves = waves[None]
        lengths = (attention_mask.sum(-1).long() if attention_mask is not None
                   else torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long))
        sr = self.config.sampling_rate
        minimum = int(self.config.min_seconds * sr)
        window = int(round(self.config.window_seconds * sr))
        hop = max(1, int(round(self.config.hop_seconds * sr)))
        segs = []
        for b in range(waves.shape[0]):
            wave = waves[b, : int(lengths[b])]
            if wave.shape[0] == 0:
                raise ValueError(f"clip {b} is empty (0 samples)")
            if wave.shape[0] < minimum:  # repeat-pad, as training evaluated short clips
                wave = wave.repeat(-(-minimum // wave.shape[0]))[:minimum]
            segs += [(b, wave[s:s + window]) for s in window_starts(wave.shape[0], window, hop)]
        return sorted(segs, key=lambda s: s[1].shape[0])

    def _tokens(self, group: BackboneGroup, texts: list[str]):
        enc = group.tokenizer(texts, padding=True, truncation=True, max_length=group.spec["max_text_tokens"],
                              return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ---- forward
    def member_probabilities(self, input_values=None, attention_mask=None, text=None):
        """[B, members, classes] probabilities of every member (mean over windows), and has_text [B]."""
        batch = (1 if input_values.dim() == 1 else input_values.shape[0]) if input_values is not None else \
            (1 if isinstance(text, str) else len(text or []))
        texts = self._texts(text, batch)
        has_text = torch.tensor([bool(t and t.strip()) for t in texts], dtype=torch.bool)
        filled = [t if t and t.strip() else "" for t in texts]
        n_members, n_classes = len(self.config.members), self.config.num_labels
        sums = torch.zeros(batch, n_members, n_classes, dtype=torch.float64)
        counts = torch.zeros(batch, n_members, dtype=torch.float64)
        segs = self._segments(input_values, attention_mask, batch)
        step = max(1, self.config.segment_batch_size)
        for group in self.groups:
            if group.has_speech and input_values is None:
                raise ValueError("this ensemble reads audio: give input_values (and attention_mask)")
            members = torch.tensor(group.spec["members"])
            todo = segs if group.has_speech else [(b, None) for b in range(batch)]
            for k in range(0, len(todo), step):
                chunk = todo[k:k + step]
                rows = torch.tensor([b for b, _ in chunk])
                args = {}
                if group.has_speech:
                    lengths = torch.tensor([w.shape[0] for _, w in chunk], dtype=torch.long)
                    waves = torch.zeros(len(chunk), int(lengths.max()), dtype=self.dtype)
                    for j, (_, w) in enumerate(chunk):
                        waves[j, : w.shape[0]] = w
                    args.update(input_values=waves.to(self.device), wave_lengths=lengths.to(self.device))
                if group.has_text:
                    ids, mask = self._tokens(group, [filled[b] for b, _ in chunk])
                    args.update(input_ids=ids, text_attention_mask=mask)
                probs = group(**args).double().cpu()  # [chunk, group members, classes]
                for j, b in enumerate(rows.tolist()):
                    sums[b, members] += probs[j]
                    counts[b, members] += 1
        member_probs = sums / counts[..., None]
        needs_text = torch.tensor(["text" in m["modalities"].split("+") for m in self.config.members])
        valid = ~(needs_text[None, :] & ~has_text[:, None])
        return member_probs.masked_fill(~valid[..., None], float("nan")), valid

    def combine(self, member_probs: torch.Tensor, valid: torch.Tensor):
        """The ensembles' scores (mean, or vote shares with ties broken by the mean), averaged
        over the ensembles (folds) -> (scores [B, C], predicted class [B])."""
        scores, preds = [], []
        n_classes = member_probs.shape[-1]
        for ens in self.config.ensembles:
            idx = torch.tensor(ens["members"])
            p, v = member_probs[:, idx].nan_to_num(0.0), valid[:, idx]
            n = v.sum(1)
            if bool((n == 0).any()):
                rows = (n == 0).nonzero().flatten().tolist()
                raise ValueError(f"clip(s) {rows} have no transcription and every member of ensemble "
                                 f"{ens.get('name', '')!r} reads text: pass text=[...]")
            mean = (p * v[..., None]).sum(1) / n[:, None]
            if ens.get("method", "mean") == "mean":
                scores.append(mean)
                preds.append(mean.argmax(-1))
                continue
            votes = (nn.functional.one_hot(p.argmax(-1), n_classes) * v[..., None]).sum(1).double()
            tied = votes == votes.max(-1, keepdim=True).values
            preds.append(torch.where(tied, mean, torch.full_like(mean, float("-inf"))).argmax(-1))
            scores.append(votes / n[:, None])
        if len(scores) == 1:
            return scores[0], preds[0]
        mean_scores = torch.stack(scores).mean(0)
        return mean_scores, mean_scores.argmax(-1)

    def forward(self, input_values=None, attention_mask=None, text=None, labels=None, return_dict=None, **kwargs):
        with torch.no_grad():
            member_probs, valid = self.member_probabilities(input_values, attention_mask, text)
            scores, pred = self.combine(member_probs, valid)
        # softmax(logits) gives the scores back; the predicted class (argmax) gets a tiny edge
        # so that a vote tie resolves as the ensemble resolves it.
        edge = nn.functional.one_hot(pred, scores.shape[-1]).double() * 1e-9
        logits = torch.log((scores + edge).clamp_min(1e-30)).to(self.dtype).to(self.device)
        loss = nn.functional.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return SerEnsembleOutput(loss=loss, logits=logits, scores=scores.float().to(self.device),
                                 member_probs=member_probs.float().to(self.device))
