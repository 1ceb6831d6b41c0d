"""Sync-free training steps: per update, radiodiff issues one collective and one host read per
micro-batch (the agreement on non-finite losses and preemption), and nothing else outside logging,
validation and checkpoint steps. Counted on 2 real gloo ranks for both stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.conftest import LPIPS, STAGE_TINY, TINY, environment

SCRIPT = Path(__file__).with_name("sync_count_check.py")
ACCUM = 2  # global batch 8 = micro batch 2 x 2 ranks x 2 accumulation steps
# Logged at step 3 and 6 (updates 2 and 5), one checkpoint at the end, no validation.
RUN = ["train.max_steps=6", "train.log_every=3", "train.ckpt_every=100", "train.val_every=0",
       "train.global_batch=8"]
QUIET_UPDATES = ("1", "3", "4")  # neither the first (FLOP counting), nor logged, nor saved


def counted_run(stage: str, run_dir: Path, shards: Path, *extra: str) -> list[dict]:
    args = [f"run_dir={run_dir}", f"data.shards={shards}", *TINY, *STAGE_TINY[stage], *RUN, *extra]
    counts = run_dir.with_name(f"{run_dir.name}-counts")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), stage, str(counts), *args], capture_output=True, text=True, timeout=600,
                          env=environment())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = [json.loads((counts / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["code"] == 0 for r in results)
    return results


def check_quiet_updates(results: list[dict]) -> None:
    for rank in results:
        for index in QUIET_UPDATES:
            events = rank["updates"][index]
            assert events["collective"].get("radiodiff", 0) == ACCUM, (index, events)
            assert events.get("host_read", {}).get("radiodiff", 0) <= ACCUM, (index, events)
        # A logging step adds the metrics' one all-reduce (and its read); the counter sees it.
        assert rank["updates"]["2"]["collective"]["radiodiff"] > ACCUM


@pytest.fixture(scope="module")
def vae_counts(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("sync-vae")
    return run_dir, counted_run("vae", run_dir, train_shards, *LPIPS, "loss.disc_start=0")


def test_vae_gan_update_has_one_collective_and_one_host_read_per_micro_batch(vae_counts) -> None:
    check_quiet_updates(vae_counts[1])


def test_ldm_update_has_one_collective_and_one_host_read_per_micro_batch(vae_counts, train_shards: Path,
                                                                       tmp_path: Path) -> None:
    vae_dir, _ = vae_counts
    check_quiet_updates(counted_run("ldm", tmp_path / "ldm", train_shards, f"vae.checkpoint={vae_dir}",
                                    "ema.start_step=1", "ema.update_every=1"))

