"""A torch.profiler trace of a window of updates (``train.profile_steps=[a, b]``).

The loop tells the profiler where each update starts and ends (steps counted from 1, as in logs);
the profiler records CPU activity, and CUDA activity on a GPU, from the start of update ``a`` to the
end of update ``b``, each update marked as a range named ``update {step}``, and every rank writes
``{run_dir}/profile/rank{r}_steps{a}-{b}.json`` (a Chrome trace: chrome://tracing, Perfetto).
Only a run that starts update ``a`` records: a run resumed past it records nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from radiodiff.dist import DistInfo, print0
from radiodiff.runs.layout import PROFILE_DIR


def trace_path(run_dir: Path, rank: int, first: int, last: int) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"rank{rank}_steps{first}-{last}.json"


class StepProfiler:
    """Records updates ``steps[0]..steps[1]``; a no-op when ``steps`` is None."""

    def __init__(self, steps: list[int] | None, run_dir: Path, dist: DistInfo) -> None:
        self.window = tuple(steps) if steps else None
        self.run_dir, self.dist = Path(run_dir), dist
        self._profiler: Any = None
        self._update: Any = None  # the open ``update {step}`` range

    @property
    def recording(self) -> bool:
        return self._profiler is not None

    def update_started(self, step: int) -> None:
        """Called before update ``step`` (1-based) runs."""
        if self.window is None:
            return
        if step == self.window[0]:
            activities = [ProfilerActivity.CPU]
            if self.dist.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities)
            self._profiler.start()
        if self.recording:
            self._update = record_function(f"update {step}")
            self._update.__enter__()

    def update_done(self, step: int) -> Path | None:
        """Called after update ``step``; at the window's last update, writes the trace and returns its path."""
        if not self.recording:
            return None
        self._update.__exit__(None, None, None)
        self._update = None
        if step < self.window[1]:
            return None
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)  # the kernels of update b belong in its trace
        self._profiler.stop()
        path = trace_path(self.run_dir, self.dist.rank, *self.window)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(path))
        self._profiler = None
        first, last = self.window
        print0(f"profile of updates {first}-{last} ({self.dist.world_size} rank(s)): "
               f"{path.parent}/rank*_steps{first}-{last}.json")
        return path
