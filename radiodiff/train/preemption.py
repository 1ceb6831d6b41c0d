"""Preemption: signal handlers only set a flag; the loop acts on it at a step boundary.

Slurm sends SIGUSR1 ahead of a time limit or a preemption (``--signal=USR1@<seconds>``); schedulers
and ``kill`` send SIGTERM. After the loop has saved a checkpoint it exits with ``EXIT_PREEMPTED``
and, under Slurm, rank 0 requeues the job (torchrun turns a worker's exit code into its own 1, so
the batch script cannot see the 75 to requeue itself).

A stop file (``train.stop_file``) asks the same of a run that no signal can reach: one in a Ray
trial's thread, or on another host. Each rank looks for it at most every ``STOP_POLL_S`` seconds
(one ``stat`` on the shared filesystem); the step's agreement makes every rank stop together when
any has seen it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_POLL_S = 2.0


class StopFileWatch:
    """Whether a stop file has appeared, looked for at most every ``poll_s`` seconds (one ``stat`` on
    a shared filesystem); once seen, it stays seen."""

    def __init__(self, path: str | Path, poll_s: float = STOP_POLL_S) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.seen = False
        self._next_poll = 0.0

    def __call__(self) -> bool:
        if not self.seen and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            self.seen = self.path.exists()
        return self.seen


class PreemptionFlag:
    def __init__(self, stop_file: str | Path | None = None, poll_s: float = STOP_POLL_S) -> None:
        self.received: int | None = None
        self.stop_file = Path(stop_file) if stop_file else None
        self._watch = StopFileWatch(stop_file, poll_s) if stop_file else None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Whether this rank should stop: a signal arrived, or the stop file exists (looked for at
        most every ``poll_s`` seconds; once seen, it stays seen)."""
        return self.received is not None or (self._watch is not None and self._watch())

    def install(self) -> "PreemptionFlag":
        """Handle the signals (only the main thread can: a run inside a Ray trial's thread is
        stopped by its stop file, or by Ray, and resumes from its run directory when retried)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_slurm_job() -> str | None:
    """Requeue this Slurm job (rank 0, after a committed checkpoint); returns what was done."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        return f"scontrol requeue {job_id} failed: {done.stderr.strip()}"
    return f"requeued Slurm job {job_id}"
