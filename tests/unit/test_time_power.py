"""diffusion.time_power reaches the real stage-2 step: the times the U-Net sees are the keyed uniform
draws mapped through the inverse CDF of density ~ t^p, sample by sample."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS, DeepSpeedConfig, DiffusionConfig, TrainConfig
from radiodiff.config import autoencoder_preset
from radiodiff.diffusion.latent_scale import LatentScale
from radiodiff.models.autoencoder import AutoencoderKL
from radiodiff.models.unet import build_unet
from radiodiff.train.engines import build_engine
from radiodiff.train.steps import LdmModels, StepContext, ldm_step

SIZE, BATCH, EPS = 32, 4, 1e-4


class Seen(Exception):
    """Raised by the U-Net's pre-forward hook with the times it was called with (no forward, no update)."""


def times_seen(power: float) -> torch.Tensor:
    """The (B,) times the U-Net is called with in one ldm_step with ``diffusion.time_power=power``."""
    torch.manual_seed(0)
    ae = dataclasses.replace(autoencoder_preset("tiny"), resolution=SIZE)
    unet_cfg = dataclasses.replace(copy.deepcopy(UNET_PRESETS["tiny"]), latent_size=SIZE // ae.downsample_factor,
                                   dim_mults=[1, 1, 1, 1])
    cond_cfg = dataclasses.replace(copy.deepcopy(CONDITION_PRESETS["tiny"]), depths=[1, 1, 1, 1])
    unet = build_unet(unet_cfg, cond_cfg)

    def stop(module, args):
        raise Seen(args[1].detach().clone())

    unet.register_forward_pre_hook(stop)
    train = TrainConfig(micro_batch=BATCH, global_batch=BATCH, lr=1e-3, min_lr=1e-3)
    engine = build_engine(unet, train, DeepSpeedConfig(precision="fp32"), world_size=1)
    models = LdmModels(engine, AutoencoderKL(ae).requires_grad_(False).eval(), LatentScale(0.3),
                       DiffusionConfig(eps=EPS, time_power=power))
    g = torch.Generator().manual_seed(1)
    batch = {"target": torch.rand(BATCH, 1, SIZE, SIZE, generator=g) * 2 - 1,
             "cond": torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1, "pos": torch.arange(BATCH) + 100}
    with pytest.raises(Seen) as seen:
        ldm_step(models, batch, StepContext(step=0, device=torch.device("cpu"), precision="fp32"))
    t = seen.value.args[0]
    assert t.shape == (BATCH,) and t.dtype == torch.float32
    return t


def test_ldm_step_draws_times_through_the_inverse_cdf_of_t_to_the_power(world_of_one) -> None:
    uniform = times_seen(0.0)
    u = (uniform.double() - EPS) / (1 - EPS)  # the keyed uniform draws behind the published times
    for power in (1.0, 3.0):
        tilted = times_seen(power)
        expected = EPS + (1 - EPS) * u.pow(1 / (1 + power))
        torch.testing.assert_close(tilted.double(), expected, rtol=1e-6, atol=1e-7, msg=f"power {power}")
        assert (tilted >= uniform).all() and (tilted > uniform).any()  # every time moved towards 1
