"""A one-line-per-event progress report of a sweep (Ray Tune's own table is turned off)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback


class ProgressPrinter(Callback):
    """Prints each report of the sweep's metric, and each trial's end with the count of trials done."""

    def __init__(self, metric: str, num_trials: int, stop_file: Path) -> None:
        self.metric = metric
        self.num_trials = num_trials
        self.stop_file = stop_file  # once it exists, a trial's error is its stop (pipeline/tune_stop.py)
        self.done = 0
        self.failed = 0
        self.started = time.perf_counter()

    def _prefix(self, trial: Any) -> str:
        return f"[{time.perf_counter() - self.started:7.1f} s] {trial}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"{self._prefix(trial)}: started (disc_start={trial.config['disc_start']}, "
              f"kl_weight={trial.config['kl_weight']:g})", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        shown = ", ".join(f"{key}={result[key]:.4g}" for key in (self.metric, "val/ssim", "ae/loss")
                          if isinstance(result.get(key), (int, float)))
        print(f"{self._prefix(trial)}: step {result.get('step', '?')}: {shown}", flush=True)

    def _ended(self, trial: Any, outcome: str) -> None:
        self.done += 1
        print(f"{self._prefix(trial)}: {outcome} ({self.done}/{self.num_trials} trials done, "
              f"{self.failed} failed)", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.stop_file.exists():
            self._ended(trial, "stopped (the sweep is stopping; the same command continues it)")
            return
        self.failed += 1
        self._ended(trial, "FAILED (error in results.csv and the trial's log)")
