"""The learning rate as a function of the step (``train.lr_schedule``, ``train.warmup_steps``).

- ``plateau`` (the paper): constant, times ``lr_decay`` after every ``lr_patience``
  evaluations without improvement (the evaluations keep that factor in the loop state).
- ``cosine`` / ``linear``: decay from the base lr to 0 at the last step.
Every schedule may start with a linear warmup from 0. The factor multiplies each parameter
group's base lr (the head's ``train.lr``, fine-tuned layers' ``train.backbone_lr``).
"""
from __future__ import annotations

import math


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int, plateau_scale: float = 1.0) -> float:
    """Factor for the optimizer step with 0-based index ``step`` of ``total_steps``."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "plateau":
        return warm * plateau_scale
    progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return warm * decay
