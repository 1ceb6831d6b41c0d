"""Exact resume on 2 ranks (torchrun, gloo), ZeRO-2, the default precision: an uninterrupted run's later steps
== the same run stopped after a middle checkpoint and resumed from it. The default, auto, is BF16 autocast
where the CPU computes bf16 natively and fp32 elsewhere (there bf16 runs through fallback kernels, several
times slower); the checkpoint of an autocast engine is also loaded in tests/unit/test_checkpoint.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist.conftest import stopped_at, train

# A fixed decay horizon: the learning rates do not depend on max_steps.
COMMON = ["deepspeed.zero_stage=2", "train.ckpt_every=2", "train.lr_decay_steps=8"]


@pytest.fixture(scope="module")
def vae_runs(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("vae-resume")
    # disc_start=3: the GAN terms and the adaptive weight switch on inside the window.
    whole = train("vae", root / "whole", train_shards, *COMMON, "loss.disc_start=3", "train.max_steps=8")
    assert whole.returncode == 0, whole.output[-3000:]
    resumed = train("vae", stopped_at(whole.run_dir, 4, root / "resumed"), train_shards, *COMMON, "loss.disc_start=3",
                    "train.max_steps=8")
    return whole, resumed


def test_vae_gan_resume_is_exact(vae_runs: tuple) -> None:
    whole, resumed = vae_runs
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output and "(step 4)" in resumed.output
    for key in ("ae/loss", "ae/nll", "ae/kl", "ae/g", "ae/d_weight", "disc/loss"):
        assert resumed.losses(key) == whole.losses(key), key
    assert sorted(whole.losses("ae/loss")) == list(range(1, 9))
    assert whole.losses("ae/d_weight")[3] == 0 and whole.losses("ae/d_weight")[4] > 0  # disc on from step index 3


def test_ldm_resume_is_exact(vae_runs: tuple, train_shards: Path, tmp_path: Path) -> None:
    vae = vae_runs[0].run_dir
    args = [*COMMON, f"vae.checkpoint={vae}", "ema.start_step=2", "ema.update_every=1"]
    whole = train("ldm", tmp_path / "whole", train_shards, *args, "train.max_steps=6")
    assert whole.returncode == 0, whole.output[-3000:]
    resumed = train("ldm", stopped_at(whole.run_dir, 2, tmp_path / "resumed"), train_shards, *args, "train.max_steps=6")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output and "(step 2)" in resumed.output
    assert resumed.losses("loss") == whole.losses("loss")
    assert sorted(whole.losses("loss")) == list(range(1, 7))
