"""Preemption: signal handlers only set a flag; the loop acts on it at a step boundary.

Slurm sends SIGUSR1 ahead of a time limit or a preemption (``--signal=USR1@<seconds>``); schedulers
and ``kill`` send SIGTERM. After the loop has saved a checkpoint it exits with ``EXIT_PREEMPTED``
and, under Slurm, rank 0 requeues the job (torchrun turns a worker's exit code into its own 1, so
the batch script cannot see the 75 to requeue itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def install(self) -> "PreemptionFlag":
        """Handle the signals (only the main thread can: a run inside a Ray trial's thread is
        stopped by Ray instead, and resumes from its run directory when retried)."""
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
