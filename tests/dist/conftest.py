"""Helpers for training tests: real shards, and training runs as real processes (torchrun for 2 ranks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from radiodiff.launch import console_command
from tests.conftest import PROCESS_GROUP_KEYS


BIN = Path(sys.executable).parent
# Tiny, fast, deterministic: 64 px maps, no data-loader workers, metrics every step, no wandb.
TINY = ["model=tiny", "data.num_workers=0", "train.global_batch=4", "train.micro_batch=2", "train.log_every=1",
        "wandb.enabled=false"]
# The VAE-GAN without its LPIPS term unless a test is about the objective itself: with no pretrained
# VGG16 (never downloaded) LPIPS is a random network, no signal, yet a large part of a tiny step and
# ~1.5 s of start-up per rank. The tests of the objective (rank invariance, BF16, gradient averaging, sync-free
# steps) put it back with LPIPS; exact resume does without (a frozen, stateless network adds nothing to
# what a checkpoint must restore).
STAGE_TINY = {"vae": ["perceptual.pretrained=false", "loss.perceptual_weight=0"], "ldm": []}
LPIPS = ["loss.perceptual_weight=1"]


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def losses(self, key: str) -> dict[int, float]:
        return {m["step"]: m[key] for m in self.metrics() if key in m}


def environment() -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_KEYS}
    return {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def train(stage: str, run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, timeout_s: int = 600) -> Run:
    """Run radiodiff-train-{stage} to completion and return its exit code, output and run dir."""
    args = [f"run_dir={run_dir}", f"data.shards={shards}", *TINY, *STAGE_TINY[stage], *overrides]
    done = subprocess.run(console_command(f"radiodiff-train-{stage}", nproc) + args, capture_output=True, text=True,
                          timeout=timeout_s, env=environment())
    return Run(done.returncode, done.stdout + done.stderr, run_dir)


def start(stage: str, run_dir: Path, shards: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """Start a training run in its own process group (so that a test can signal or kill all of it)."""
    args = [f"run_dir={run_dir}", f"data.shards={shards}", *TINY, *STAGE_TINY[stage], *overrides]
    return subprocess.Popen(console_command(f"radiodiff-train-{stage}", nproc) + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=environment(), start_new_session=True)


def stopped_at(run_dir: Path, step: int, copy: Path) -> Path:
    """A copy of a finished run directory as a run preempted right after its step-``step`` checkpoint
    would have left it: the later checkpoints and metrics removed."""
    shutil.copytree(run_dir, copy)
    for checkpoint in (copy / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    metrics = copy / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= step))
    return copy
