"""Stopping a sweep so that its running trials save first: ``out_dir/STOP``.

The trials' training runs in Ray's worker threads, where no signal handler can be installed, so a
sweep is stopped through a file every trial can see: each trial's ``train.stop_file``. It appears
when radiodiff-tune receives SIGTERM (``slurm/tune.sh`` sends it ahead of the time limit) or a first
Ctrl-C, or when a user creates it (``touch out_dir/STOP``, from any host). Then:

- each running trial stops at its next update, commits a checkpoint and ends as failed with
  "stopped" (its training exits 75); a trial that starts afterwards trains nothing;
- once no trial is running, ``SweepStop`` ends the experiment, so pending trials never start;
- radiodiff-tune exits 75 without writing results; the same command continues the sweep, and
  removes the file when it starts.

A second Ctrl-C stops at once, without the saves. Ray Tune's own SIGUSR1 handler (installed by
``Tuner.fit``) also stops the trials at once; it is left as it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ray.tune import Callback, Stopper

from radiodiff.train.preemption import STOP_POLL_S, StopFileWatch

TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # read by Tuner.fit when it installs its handlers


def request_stop(stop_file: Path, why: str) -> None:
    """Create the stop file (atomically; who asked and when is its content)."""
    temporary = stop_file.with_name(f".{stop_file.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{why}: host {socket.gethostname()}, pid {os.getpid()}, time {time.time():.0f}\n")
    temporary.replace(stop_file)


@contextlib.contextmanager
def stop_on_signals(stop_file: Path) -> Iterator[None]:
    """While inside, SIGTERM and a first Ctrl-C (SIGINT) to this process create the stop file instead
    of ending it; a second Ctrl-C, or a stop file that cannot be created, stops at once, without the
    trials' saves (KeyboardInterrupt). Ray Tune's own SIGINT handler is kept out
    (``TUNE_DISABLE_SIGINT_HANDLER``). The main thread only; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts = 0

    def say(text: str) -> None:  # os.write: a print here could re-enter one the main thread was in
        os.write(1, f"sweep: {text}\n".encode())

    def stop(what: str) -> None:
        try:
            request_stop(stop_file, f"{what} to radiodiff-tune")
        except OSError as err:  # e.g. a full disk: asked to stop, the sweep stops, at once
            say(f"{what}: cannot create {stop_file} ({err}); stopping at once, without the trials' saves")
            raise KeyboardInterrupt from err
        say(f"{what}: stopping; running trials save a checkpoint first ({stop_file})"
            + ("; Ctrl-C again stops at once, without saving" if what == "Ctrl-C" else ""))

    def on_sigterm(signum: int, frame: Any) -> None:
        stop("SIGTERM")

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        stop("Ctrl-C")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
                signal.SIGINT: signal.signal(signal.SIGINT, on_sigint)}
    tune_handler = os.environ.get(TUNE_SIGINT)
    os.environ[TUNE_SIGINT] = "1"
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if tune_handler is None:
            os.environ.pop(TUNE_SIGINT, None)
        else:
            os.environ[TUNE_SIGINT] = tune_handler


class SweepStop(Stopper, Callback):
    """Ends the experiment once the stop file exists and no trial is running (a running trial is
    left to save and end by itself: Tune's own stop would kill it mid-update)."""

    def __init__(self, stop_file: Path, poll_s: float = STOP_POLL_S) -> None:
        self.stop_file = stop_file
        self.requested = StopFileWatch(stop_file, poll_s)
        self.running = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.running = any(trial.status == "RUNNING" for trial in trials)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False  # trials stop themselves (their training watches the file)

    def stop_all(self) -> bool:
        return self.requested() and not self.running
