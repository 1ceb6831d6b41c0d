"""Gradients are averaged across ranks: after a step with different data, parameters are identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.conftest import LPIPS, STAGE_TINY, TINY, environment


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_parameters_identical_on_both_ranks_after_a_step(train_shards: Path, tmp_path: Path, zero_stage: int) -> None:
    script = Path(__file__).with_name("grad_average_check.py")
    overrides = [f"run_dir={tmp_path}", f"data.shards={train_shards}", *TINY, *STAGE_TINY["vae"], *LPIPS,
                 f"deepspeed.zero_stage={zero_stage}", "loss.disc_start=0"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *overrides], capture_output=True, text=True, timeout=600, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert set(result["keys"][0]).isdisjoint(result["keys"][1])  # the ranks saw different samples
    assert result["changed"]  # the step trained
    assert result["identical"]  # ... and left both ranks with the same parameters
