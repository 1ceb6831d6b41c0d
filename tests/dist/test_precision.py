"""Both BF16 modes train both stages: bf16 parameters (with BatchNorm's buffers) as well as autocast; and the
default, auto, resolves to one precision for all ranks."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.dist.conftest import LPIPS, train


def test_bf16_parameters_train_and_resume_both_stages(train_shards: Path, tmp_path: Path) -> None:
    common = ["deepspeed.precision=bf16", "train.ckpt_every=1", "train.val_batches=1"]
    # One VAE-GAN update (two micro-batches, the GAN terms and LPIPS on) and its validation: with bf16
    # parameters each costs ~30 s of bf16 fallback kernels on a CPU without native bf16.
    vae = train("vae", tmp_path / "vae", train_shards, *common, *LPIPS, "loss.disc_start=0", "train.val_every=1",
                "train.max_steps=1", nproc=1)
    assert vae.returncode == 0, vae.output[-3000:]
    losses = vae.losses("ae/loss")
    assert list(losses) == [1] and all(math.isfinite(v) for v in losses.values()) and vae.losses("val/psnr")
    assert vae.losses("ae/d_weight")[1] > 0  # the adaptive weight and the discriminator in bf16 too
    ldm_args = [*common, "train.val_every=2", f"vae.checkpoint={vae.run_dir}", "ema.start_step=1", "ema.update_every=1"]
    ldm = train("ldm", tmp_path / "ldm", train_shards, *ldm_args, "train.max_steps=2", nproc=1)
    resumed = train("ldm", tmp_path / "ldm", train_shards, *ldm_args, "train.max_steps=3", nproc=1)
    assert ldm.returncode == 0 and resumed.returncode == 0, ldm.output[-2000:] + resumed.output[-2000:]
    assert "(step 2)" in resumed.output and sorted(resumed.losses("loss")) == [1, 2, 3]


def test_auto_precision_is_resolved_once_for_all_ranks_and_recorded(train_shards: Path, tmp_path: Path) -> None:
    """The default deepspeed.precision=auto: rank 0 resolves it for its device, every rank trains with it, and
    config.yaml records what ran (fp32 on a CPU without native bf16, where bf16 kernels are slow fallbacks)."""
    from omegaconf import OmegaConf

    from radiodiff.precision import resolve_precision

    expected = resolve_precision("auto", torch.device("cpu"))
    run = train("vae", tmp_path / "vae", train_shards, "train.max_steps=1", "train.ckpt_every=1")
    assert run.returncode == 0, run.output[-3000:]
    assert f"deepspeed.precision=auto -> {expected}" in run.output
    assert f"2 rank(s) on cpu, ZeRO 2, {expected}," in run.output
    assert OmegaConf.load(run.run_dir / "config.yaml").deepspeed.precision == expected
