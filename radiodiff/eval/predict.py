"""Radio-map prediction from a trained run, shared by radiodiff-eval and radiodiff-sample.

Predictions are returned at the native 256x256 on the [0, 1] gray scale: a model that works at
``data.image_size`` != 256 gets its inputs resized exactly as the data readers resize them
(``schema.to_tensors``: nearest for the condition, antialiased bilinear for the target) and its
output resized back bilinearly, so metrics and written maps are comparable with RadioMapSeer's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from radiodiff.config import DataConfig
from radiodiff.data.schema import NATIVE_SIZE, resize_maps
from radiodiff.diffusion.sampler import sample
from radiodiff.eval.metrics import to_unit
from radiodiff.eval.runs import LoadedModels

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def generator_seed(seed: int, rank: int) -> int:
    """The sampler's seed on ``rank``: ranks draw different noise, runs with one seed the same."""
    return seed * 1000003 + rank


def to_model_size(cond: torch.Tensor, target: torch.Tensor, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Native (B, 3, 256, 256) condition and (B, 1, 256, 256) target -> ``data.image_size``, exactly
    as the readers resize them (the value mapping is per pixel and precedes the resize in both)."""
    return resize_maps(cond, target, data)


def to_native_unit(x: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """A model output (B, 1, s, s) in the run's value range -> (B, 1, 256, 256) in [0, 1]."""
    unit = to_unit(x) if data.value_range == "symmetric" else x.float().clamp(0.0, 1.0)
    if unit.shape[-1] != NATIVE_SIZE:
        unit = F.interpolate(unit, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", align_corners=False)
    return unit.clamp(0.0, 1.0)


def make_predictor(models: LoadedModels, data: DataConfig, *, steps: int, generator: torch.Generator) -> Predict:
    """``predict(cond, target)`` at model size -> (B, 1, 256, 256) in [0, 1].

    VAE run: the reconstruction of ``target`` from the posterior mode (deterministic). LDM run:
    ``steps`` bridge-sampler steps from ``cond`` (``target`` is unused), noise from ``generator``
    only, decoded by the frozen VAE.
    """
    vae = models.vae
    if models.unet is None:
        def reconstruct(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                recon, _ = vae(target.float(), sample_posterior=False)
            return to_native_unit(recon, data)

        return reconstruct
    unet, scale, eps = models.unet, models.scale_factor, models.eps
    factor = vae.cfg.downsample_factor

    def predict(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, _, h, w = cond.shape
        shape = (b, vae.cfg.embed_dim, h // factor, w // factor)
        with torch.no_grad():
            z = sample(lambda z_t, t: unet(z_t, t, cond), shape, steps=steps, eps=eps, generator=generator)
            pred = vae.decode(z / scale)
        return to_native_unit(pred, data)

    return predict


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
