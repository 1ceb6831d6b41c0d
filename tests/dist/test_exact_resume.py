"""Exact resume on 2 ranks (torchrun, gloo), ZeRO-2, BF16 autocast: 8 steps == 4 steps + resume to 8."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist.conftest import train

# The decay horizon is fixed so that stopping with max_steps=4 keeps the 8-step run's learning rates.
COMMON = ["deepspeed.zero_stage=2", "deepspeed.precision=autocast", "train.ckpt_every=2", "train.lr_decay_steps=8"]


@pytest.fixture(scope="module")
def vae_runs(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("vae-resume")
    # disc_start=3: the GAN terms and the adaptive weight switch on inside the window.
    whole = train("vae", root / "whole", train_shards, *COMMON, "loss.disc_start=3", "train.max_steps=8")
    half = train("vae", root / "half", train_shards, *COMMON, "loss.disc_start=3", "train.max_steps=4")
    resumed = train("vae", root / "half", train_shards, *COMMON, "loss.disc_start=3", "train.max_steps=8")
    return whole, half, resumed


def test_vae_gan_resume_is_exact(vae_runs: tuple) -> None:
    whole, half, resumed = vae_runs
    for run in vae_runs:
        assert run.returncode == 0, run.output[-3000:]
    assert "resumed from" in resumed.output and "(step 4)" in resumed.output
    for key in ("ae/loss", "ae/nll", "ae/kl", "ae/g", "ae/d_weight", "disc/loss"):
        assert resumed.losses(key) == whole.losses(key), key
    assert sorted(whole.losses("ae/loss")) == list(range(1, 9))
    assert whole.losses("ae/d_weight")[3] == 0 and whole.losses("ae/d_weight")[4] > 0  # disc on from step index 3


def test_ldm_resume_is_exact(vae_runs: tuple, train_shards: Path, tmp_path: Path) -> None:
    vae = vae_runs[0].run_dir
    args = [*COMMON, f"vae.checkpoint={vae}", "ema.start_step=2", "ema.update_every=1"]
    whole = train("ldm", tmp_path / "whole", train_shards, *args, "train.max_steps=6")
    train("ldm", tmp_path / "half", train_shards, *args, "train.max_steps=3")
    resumed = train("ldm", tmp_path / "half", train_shards, *args, "train.max_steps=6")
    assert whole.returncode == 0 and resumed.returncode == 0, whole.output[-3000:] + resumed.output[-3000:]
    assert resumed.losses("loss") == whole.losses("loss")
    assert sorted(whole.losses("loss")) == list(range(1, 7))
