"""Metrics logging: ``metrics.jsonl`` always, wandb (offline by default) too; rank 0 only.

Other ranks get a no-op logger, so the loop never branches on rank. On a resume the log is cut
back to the resumed step, so steps that are trained again are not logged twice.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from radiodiff.config import WandbConfig
from radiodiff.runs.layout import METRICS_FILE


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class LogWriteError(RuntimeError):
    """metrics.jsonl could not be appended to (a full disk, a lost filesystem)."""


def _step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop logged steps after ``last_step`` (they are about to be trained again), and any line
    that is not a logged step (what a write cut short by a kill left), saying which."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    steps = [_step(line) for line in lines]
    if broken := [number for number, step in enumerate(steps, 1) if step is None]:
        print(f"warning: {path}: dropping line(s) {', '.join(map(str, broken))}, not a logged step "
              "(a write cut short?)", file=sys.stderr, flush=True)
    kept = [line for line, step in zip(lines, steps) if step is not None and step <= last_step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept))
    os.replace(temporary, path)


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullLogger):
    """Appends one JSON object per logged step and mirrors it to wandb."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, *, run_id: str, config: dict[str, Any],
                 resume_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        truncate_metrics(self.path, resume_step)
        self.wandb = None
        if cfg.enabled and cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, id=run_id, resume="allow",
                                    dir=str(run_dir), mode=cfg.mode, config=config, name=run_dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        line = (json.dumps({"step": step, **metrics}) + "\n").encode()
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "ab") as handle:
                handle.write(line)
        except OSError as err:
            try:  # leave no partial line behind
                os.truncate(self.path, size)
            except OSError:
                pass  # the next start drops it (truncate_metrics)
            raise LogWriteError(f"appending step {step} to {self.path} failed ({err.strerror or err}); "
                                "the newest committed checkpoint is intact") from err
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
