"""Write the standalone model as a self-contained Hugging Face folder.

    DEST/config.json                 SerEnsembleConfig: id2label/label2id, groups, members,
                                     ensembles (method), auto_map and custom_pipelines
    DEST/model.safetensors           every member's head (groups.<g>.heads.<j>.*), nothing else
    DEST/preprocessor_config.json    Wav2Vec2FeatureExtractor: the sample rate, attention
                                     mask on, do_normalize off (the model normalises each
                                     clip per backbone, as ser_hpc does)
    DEST/backbones/<name>/           each backbone (config, weights, tokenizer or feature
                                     extractor), loaded by the model code with
                                     from_pretrained(DEST, subfolder="backbones/<name>")
    DEST/configuration_ser_ensemble.py, modeling_ser_ensemble.py, pipeline_ser_ensemble.py
                                     copied verbatim from ser_hpc/export/remote/
    DEST/README.md                   the model card
"""
from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file
from transformers import Wav2Vec2FeatureExtractor

from .build import ExportModel

REMOTE = Path(__file__).resolve().parent / "remote"
CODE_FILES = ("configuration_ser_ensemble.py", "modeling_ser_ensemble.py", "pipeline_ser_ensemble.py")


def head_state(export: ExportModel) -> dict:
    """The heads' weights under the model's own names (the backbones are saved apart)."""
    return {k: v.detach().contiguous().cpu() for k, v in export.model.state_dict().items() if ".heads." in k}


def save_backbones(export: ExportModel, out: Path, with_preprocessors: bool = True) -> None:
    for b in export.backbones:
        folder = out / b.subfolder
        b.module.save_pretrained(folder)
        if b.tokenizer is not None:
            b.tokenizer.save_pretrained(folder)
        if b.feature_extractor is not None and with_preprocessors:
            b.feature_extractor.save_pretrained(folder)


def write_hf(export: ExportModel, out: Path) -> None:
    out = Path(out)
    export.config.save_pretrained(out)
    save_file(head_state(export), str(out / "model.safetensors"), metadata={"format": "pt"})
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=export.config.sampling_rate, padding_value=0.0,
                             do_normalize=False, return_attention_mask=True).save_pretrained(out)
    for name in CODE_FILES:
        shutil.copyfile(REMOTE / name, out / name)
    save_backbones(export, out)
