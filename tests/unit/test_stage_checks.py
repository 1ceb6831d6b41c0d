"""Stage 2's checks of its model layout against the frozen VAE it trains on."""

from __future__ import annotations

import dataclasses

import pytest

from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS, ConfigError, ModelConfig
from radiodiff.train.stages import check_vae_layout


def tiny_model(latent_size: int = 16, patch_size: int = 4) -> ModelConfig:
    return ModelConfig(unet=dataclasses.replace(UNET_PRESETS["tiny"], latent_size=latent_size),
                       condition=dataclasses.replace(CONDITION_PRESETS["tiny"], patch_size=patch_size))


def test_the_published_and_the_factor_2_layouts_pass() -> None:
    check_vae_layout(tiny_model(), 64, 4, "runs/vae")
    check_vae_layout(tiny_model(latent_size=32, patch_size=2), 64, 2, "runs/vae")


def test_a_latent_size_the_vae_does_not_give_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"latent_size=16 but data.image_size=64 / the factor 2 of the VAE "
                                          r"\(runs/vae\) gives 32"):
        check_vae_layout(tiny_model(patch_size=2), 64, 2, "runs/vae")


def test_a_condition_stride_other_than_the_vae_factor_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"patch_size=4 but the VAE \(runs/vae\) downsamples by 2: .*"
                                          r"set model.condition.patch_size=2$"):
        check_vae_layout(tiny_model(latent_size=32), 64, 2, "runs/vae")
