"""A run's state: the one vocabulary of run folders (final.json), the trainer, plans, the
status command and aggregation.

A ``str`` enum: ``RunStatus.DONE == "done"``, and it is written to JSON and printed as its
value, so files and tables keep the plain words.
"""
from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    PENDING = "pending"     # planned; its task has not started (status command)
    RUNNING = "running"     # training: a head in the loop, or its Slurm task running
    REQUEUED = "requeued"   # its task was stopped and requeued; it resumes from its checkpoint
    DONE = "done"           # final.json says done: trained to the last step or stopped early
    FAILED = "failed"       # final.json says failed (or a done run the ensemble cannot use)
    MISSING = "missing"     # no final.json: not run yet, crashed or cancelled (plan, aggregation)

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def of_final(cls, final: dict | None) -> "RunStatus":
        """What a run's final.json (None: there is none) says about it."""
        if final is None:
            return cls.MISSING
        return cls.DONE if final.get("status") == cls.DONE else cls.FAILED
