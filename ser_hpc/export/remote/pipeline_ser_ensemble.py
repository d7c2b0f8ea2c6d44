"""pipeline("audio-classification") for an exported ser-hpc ensemble (trust_remote_code).

The stock audio-classification pipeline, plus:
- a file path is decoded with soundfile when it is installed (wav, flac, ogg, mp3; no
  ffmpeg needed), downmixed to mono and resampled like the training data;
- ``text=`` passes the clip's transcription to ensembles whose members read text:

    clf = pipeline("audio-classification", model=DEST, trust_remote_code=True)
    clf("clip.wav")                                   # audio-only ensembles
    clf("clip.wav", text="la transcripción")          # audio+text ensembles
"""
from __future__ import annotations

import numpy as np
from transformers.pipelines.audio_classification import AudioClassificationPipeline


def read_audio_file(path: str) -> dict | None:
    """{"raw": mono float32 samples, "sampling_rate": sr}, or None without soundfile."""
    try:
        import soundfile
    except ImportError:
        return None
    data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return {"raw": np.ascontiguousarray(mono, dtype=np.float32), "sampling_rate": int(sr)}


class SerAudioClassificationPipeline(AudioClassificationPipeline):
    def _sanitize_parameters(self, top_k=None, function_to_apply=None, text=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(top_k=top_k,
                                                                        function_to_apply=function_to_apply, **kwargs)
        if text is not None:
            preprocess = {**preprocess, "text": text}
        return preprocess, forward, postprocess

    def preprocess(self, inputs, text=None):
        if isinstance(inputs, str) and not inputs.startswith(("http://", "https://")):
            inputs = read_audio_file(inputs) or inputs
        processed = dict(super().preprocess(inputs))
        if text is not None:
            processed["text"] = [text]
        return processed
