"""Make ensemble/ self-contained: a copy of each member's head and config, and where its
backbones are.

The run folders may be cleaned up, moved or left behind on the cluster, so inference must
not need them: ``ensemble/members/<run_id>/`` holds ``best_head.safetensors``,
``config.yaml`` and, for a run that fine-tuned top backbone layers,
``best_backbone.safetensors``; ensemble.json names each member's backbones with relative paths
resolved against the launch directory (run configs hold paths relative to it), so the
folder loads from any working directory and on another machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ser_hpc.atomic_io import write_bytes
from ser_hpc.ensemble.collect import AggregateError, RunRecord
from ser_hpc.ensemble.member_files import BACKBONE_FILE, CONFIG_FILE, HEAD_FILE, read_config, same_tensors

MEMBERS_DIR = "members"


def resolve_backbone(name: str | None, launch_dir: str | Path | None) -> str | None:
    """A local path made absolute (relative to the launch dir); a hub id left as is."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    if launch_dir:
        candidate = Path(launch_dir) / path
        # "org/model" is a hub id unless such a folder exists; "./x" is always a path.
        if name.startswith(".") or candidate.exists():
            return str(candidate.resolve())
    return str(path.resolve()) if path.exists() else name


def describe_member(record: RunRecord, config: dict[str, Any], launch_dir: str | None,
                    pair: str | None, tuned: bool) -> dict[str, Any]:
    """The ensemble.json entry of one member: what inference needs to rebuild it."""
    model = config.get("model") or {}
    modalities = str(model.get("modalities") or "audio+text")
    used = modalities.split("+")
    speech = (model.get("speech") or {}).get("name") if "audio" in used else None
    text = (model.get("text") or {}).get("name") if "text" in used else None
    return {
        "run_id": record.run_id, "name": record.name, "dev_macro_f1": record.dev_macro_f1,
        "pair": pair, "modalities": modalities,
        "backbones": {"speech": resolve_backbone(speech, launch_dir), "text": resolve_backbone(text, launch_dir)},
        "head": f"{MEMBERS_DIR}/{record.run_id}/{HEAD_FILE}",
        "config": f"{MEMBERS_DIR}/{record.run_id}/{CONFIG_FILE}",
        # Fine-tuned top layers replace the pretrained ones: this member cannot share a backbone.
        "backbone_weights": f"{MEMBERS_DIR}/{record.run_id}/{BACKBONE_FILE}" if tuned else None,
    }


def copy_members(out: Path, members: Sequence[RunRecord], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Copy heads and configs into out/members/ and return the members' ensemble.json entries.

    ``members`` may repeat a run (greedy selection with replacement): its entry is then
    listed as often, which weights it in inference's mean or vote; its files are copied once.
    Every member passed the checks of member_files.py when it was collected; each copy is
    read back and compared with its source, so a folder is never published with a file
    that changed or broke on the way.
    """
    pairs = {r.get("run_id"): r.get("pair") for r in plan.get("runs", [])}
    launch_dir = plan.get("launch_dir")
    configs = [read_config(m.run_dir / CONFIG_FILE) for m in members]
    tuned = [(m.run_dir / BACKBONE_FILE).is_file() for m in members]
    entries = [describe_member(m, cfg, launch_dir, pairs.get(m.run_id), t)
               for m, cfg, t in zip(members, configs, tuned)]
    # ``out`` is a fresh folder (folder.py): nothing from an earlier aggregation to clean up.
    for m, entry in {m.run_id: (m, e) for m, e in zip(members, entries)}.values():
        names = (HEAD_FILE, CONFIG_FILE) + ((BACKBONE_FILE,) if entry["backbone_weights"] else ())
        for name in names:
            source, copy = m.run_dir / name, out / MEMBERS_DIR / m.run_id / name
            data = source.read_bytes()
            write_bytes(copy, data)
            if copy.read_bytes() != data or (name != CONFIG_FILE and not same_tensors(source, copy)):
                raise AggregateError(f"the copy of {source} in {copy} does not match its source")
    return entries
