"""Is a backbone usable where jobs run (offline: a local folder, or the hub cache), and
fetching it on the login node, which has the network: only the files an encoder reads."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .encoders import BackboneError, missing_model

log = logging.getLogger("ser_hpc.models")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class UnavailableError(BackboneError):
    """A backbone cannot be loaded offline (or fetched); the message names it and what is missing."""


def resolve_offline(name: str, filename: str) -> str | None:
    """Path of ``filename`` for a local folder or a hub id in the local cache, or None."""
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local / filename) if (local / filename).is_file() else None
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(name, filename)
    return found if isinstance(found, str) else None


def check_available(name: str, kind: str) -> None:
    """The checkpoint must load with no network: config, weights, and the preprocessor; a
    speech checkpoint must be of a supported family (speech_families.py)."""
    from .speech_families import _is_emotion2vec, speech_spec
    if kind == "speech" and _is_emotion2vec(name):
        speech_spec(name)  # its config.yaml parses
        return
    if resolve_offline(name, "config.json") is None:
        where = "folder" if Path(name).expanduser().exists() or name.startswith(("/", ".")) else "hub cache"
        hint = ("" if where == "folder" else
                f" (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); run jobs/prefetch_models.py on the login node")
        raise UnavailableError(f"{kind} model {name!r}: no config.json in the {where}{hint}")
    if kind == "speech":
        speech_spec(name)  # BackboneError naming the family when it is not one ser_hpc can use
    if not any(resolve_offline(name, f) for f in WEIGHT_FILES):
        raise UnavailableError(f"{kind} model {name!r}: no weights ({', '.join(WEIGHT_FILES)}) available offline")
    if kind == "text":
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UnavailableError(f"text model {name!r}: tokenizer does not load offline: {exc}") from None
        if len(tok) < 100:
            raise UnavailableError(f"text model {name!r}: tokenizer has only {len(tok)} tokens; the tokenizer files "
                             "were probably not found")


# What a frozen encoder needs; skips other frameworks' weights (tf, flax, onnx) to save space.
PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "merges.txt", "vocab.*", "*.py"]
# A speech encoder reads its config, its preprocessor's and its weights: no tokenizer, vocabulary or
# generation config (a Whisper checkpoint's are several MB, and its decoder is never run).
SPEECH_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
                   "pytorch_model*.bin", "pytorch_model.bin.index.json"]


def download_patterns(kind: str) -> list[str]:
    """The files prefetch downloads for a backbone of this kind."""
    return SPEECH_PATTERNS if kind == "speech" else PATTERNS


def fetch(kind: str, name: str) -> str:
    """Download a hub backbone into the cache (a local folder stays as it is), then prove it
    loads offline; returns what was done. Raises BackboneError naming the model."""
    missing = missing_model(kind, name)  # a folder that does not exist, or not a possible hub id
    if missing is not None:
        raise missing
    if Path(name).expanduser().exists():
        outcome = "local folder"
    else:
        from huggingface_hub import snapshot_download
        try:
            outcome = f"downloaded to {snapshot_download(name, allow_patterns=download_patterns(kind))}"
        except Exception as exc:  # offline, unknown repo, gated model, ...
            raise UnavailableError(f"{kind} model {name!r}: download failed: {exc}") from None
    check_available(name, kind)
    return outcome
