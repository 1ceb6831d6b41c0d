"""In-training validation and radiodiff-eval share one predictor and agree: with data.value_range=unit
(where converting with the symmetric mapping read about 6 dB too high) the logged val/psnr equals
radiodiff-eval's PSNR on the same samples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.dist.conftest import train
from tests.smoke.test_eval import run_eval


def test_validation_equals_eval_with_unit_value_range(train_shards: Path, tmp_path: Path) -> None:
    run = train("vae", tmp_path / "vae", train_shards, "train.max_steps=2", "train.ckpt_every=2", "train.val_every=2",
                "train.val_batches=1000", "data.value_range=unit", "deepspeed.precision=fp32", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    logged = [m for m in run.metrics() if "val/psnr" in m][-1]
    metrics = run_eval(run.run_dir, train_shards, tmp_path / "eval", "split=val", "precision=fp32")
    assert logged["val/psnr"] == pytest.approx(metrics["psnr"], abs=1e-4)
    assert logged["val/ssim"] == pytest.approx(metrics["ssim"], abs=1e-5)


def test_latent_scale_auto_is_read_from_the_checkpoint(tmp_path: Path) -> None:
    from radiodiff.config import AutoencoderConfig, ConfigError, DiffusionConfig
    from radiodiff.diffusion.latent_scale import LatentScale, latent_std
    from radiodiff.runs import latent_scale

    torch.save(LatentScale(2.5).state_dict(), tmp_path / "latent_scale.pt")
    assert latent_scale(DiffusionConfig(scale_factor="auto"), AutoencoderConfig(), tmp_path) == 2.5
    assert latent_scale(DiffusionConfig(scale_factor="0.7"), AutoencoderConfig(), tmp_path) == 0.7
    assert latent_scale(DiffusionConfig(), AutoencoderConfig(scaling_factor=0.3)) == 0.3
    with pytest.raises(ConfigError, match="expected a number, auto or null"):
        DiffusionConfig(scale_factor="abc")
    batches = [torch.randn(4, 3, 8, 8) * 2 + 1, torch.randn(2, 3, 8, 8)]
    everything = torch.cat([b.flatten() for b in batches]).double()
    assert math.isclose(latent_std(batches), float(everything.std(unbiased=False)), rel_tol=1e-9)
