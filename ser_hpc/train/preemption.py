"""Preemption and time-limit warnings.

Slurm sends USR2 some time before the limit (``--signal=USR2@N``) and SIGTERM when it
preempts or cancels. The handler only records the signal: checkpointing inside a signal
handler could interrupt a half-done optimizer step or a file write. The training loop
checks the flag at each step boundary, checkpoints, and raises ``Preempted``.
"""
from __future__ import annotations

import signal


class Preempted(Exception):
    """Training stopped at a step boundary after a checkpoint, on a signal."""

    def __init__(self, step: int, signum: int, unfinished: list[str] | None = None):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after checkpointing")
        self.step = step
        self.signum = signum
        self.unfinished = unfinished  # run folder names still to finish; None: not known

    @property
    def wants_requeue(self) -> bool:
        return self.signum == signal.SIGUSR2  # the time-limit warning; SIGTERM is a cancel or preemption


class PreemptionFlag:
    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is None or signum == signal.SIGUSR2:
            self.signum = signum

    def __enter__(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)

    @property
    def raised(self) -> bool:
        return self.signum is not None
