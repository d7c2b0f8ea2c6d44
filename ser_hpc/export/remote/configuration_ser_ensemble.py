"""Configuration of an exported ser-hpc speech emotion ensemble (Hugging Face format).

Written by ser-hpc's jobs/export.py next to config.json, model.safetensors and
modeling_ser_ensemble.py; it needs only transformers (no ser-hpc).

- ``groups``: one entry per backbone pair: ``speech`` / ``text`` (a subfolder of this
  repository holding the backbone, loaded with from_pretrained, or null), ``speech_states``
  / ``speech_width`` / ``text_states`` / ``text_width`` (hidden states and width of each),
  ``normalize`` (zero mean, unit variance per clip, as the backbone's feature extractor),
  ``accepts_padding_mask`` (false: group-norm feature encoders, run clip by clip),
  ``max_text_tokens`` and ``members`` (indices into ``members``).
- ``members``: one trained head each: ``run_id``, ``name``, ``modalities`` (audio, text or
  audio+text), ``group`` and ``head`` (its architecture: fusion, pooling, widths, layers).
- ``ensembles``: ``{"name", "method": "mean"|"vote", "members": [...]}``; one for a plain
  ensemble, one per fold for a fold ensemble. Their scores are averaged.
"""
from __future__ import annotations

try:
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class SerEnsembleConfig(_BaseConfig):
    model_type = "ser_ensemble"

    def __init__(self, groups=None, members=None, ensembles=None, sampling_rate=16000, min_seconds=0.5,
                 window_seconds=15.0, hop_seconds=7.5, segment_batch_size=8, **kwargs):
        self.groups = list(groups or [])
        self.members = list(members or [])
        self.ensembles = list(ensembles or [])
        self.sampling_rate = int(sampling_rate)
        self.min_seconds = float(min_seconds)        # shorter clips are repeat-padded to this length
        self.window_seconds = float(window_seconds)  # longer clips are scored over windows of this length
        self.hop_seconds = float(hop_seconds)
        self.segment_batch_size = int(segment_batch_size)
        super().__init__(**kwargs)
