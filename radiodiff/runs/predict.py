"""The one predictor of a trained run: in-training validation, radiodiff-eval and radiodiff-sample.

Predictions are returned at the native 256x256 on the [0, 1] gray scale: a model that works at
``data.image_size`` != 256 gets its inputs resized exactly as the data readers resize them
(``schema.resize_maps``: nearest for the condition, antialiased bilinear for the target) and its
output resized back bilinearly, so metrics and written maps are comparable with RadioMapSeer's.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from radiodiff.config import DataConfig, SamplerConfig
from radiodiff.data.schema import NATIVE_SIZE, resize_maps
from radiodiff.diffusion.sampler import sample
from radiodiff.metrics import all_metrics, to_unit
from radiodiff.precision import autocast
from radiodiff.runs.artifact import LoadedModels

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BATCH1_MAPS = 3  # maps timed one at a time for the batch-1 speed (after one warm-up call)


def generator_seed(seed: int, rank: int) -> int:
    """The sampler's seed on ``rank``: ranks draw different noise, runs with one seed the same."""
    return seed * 1000003 + rank


def sampler_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(generator_seed(seed, rank))


def to_model_size(cond: torch.Tensor, target: torch.Tensor, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Native (B, 3, 256, 256) condition and (B, 1, 256, 256) target -> ``data.image_size``, exactly
    as the readers resize them (the value mapping is per pixel and precedes the resize in both)."""
    return resize_maps(cond, target, data)


def to_unit_scale(x: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """Values in the run's ``data.value_range`` -> the [0, 1] gray scale."""
    return to_unit(x) if data.value_range == "symmetric" else x.float().clamp(0.0, 1.0)


def to_native_unit(x: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """A model output (B, 1, s, s) in the run's value range -> (B, 1, 256, 256) in [0, 1]."""
    unit = to_unit_scale(x, data)
    if unit.shape[-1] != NATIVE_SIZE:
        unit = F.interpolate(unit, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", align_corners=False)
    return unit.clamp(0.0, 1.0)


def make_predictor(models: LoadedModels, data: DataConfig, *, generator: torch.Generator,
                   sampler: SamplerConfig | None = None, precision: str = "fp32") -> Predict:
    """``predict(cond, target)`` at model size -> (B, 1, 256, 256) in [0, 1].

    VAE run: the reconstruction of ``target`` from the posterior mode (deterministic). LDM run:
    ``sampler.steps`` bridge-sampler steps with ``sampler.estimate`` from ``cond`` (``target`` is
    unused), noise from ``generator`` only, decoded by the frozen VAE; with ``sampler.draws`` > 1 the
    mean of that many draws (one after the other from ``generator``) on the [0, 1] scale. ``sampler``
    None: the defaults (a VAE run ignores it). ``precision``: the networks run under bf16 autocast unless fp32.
    """
    vae = models.vae
    device = next(vae.parameters()).device
    if models.unet is None:
        def reconstruct(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(device, precision):
                recon, _ = vae(target.float(), sample_posterior=False)
            return to_native_unit(recon.float(), data)

        return reconstruct
    unet, scale, eps = models.unet, models.scale_factor, models.eps
    sampler = sampler or SamplerConfig()
    factor = vae.cfg.downsample_factor

    def draw(cond: torch.Tensor) -> torch.Tensor:
        b, _, h, w = cond.shape
        shape = (b, vae.cfg.embed_dim, h // factor, w // factor)
        with torch.no_grad(), autocast(device, precision):
            z = sample(lambda z_t, t: unet(z_t, t, cond), shape, steps=sampler.steps, eps=eps,
                       estimate=sampler.estimate, generator=generator)
            pred = vae.decode(z / scale)
        return to_native_unit(pred.float(), data)

    def predict(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        draws = sampler.draws
        return sum(draw(cond) for _ in range(draws)) / draws  # exact for one draw: 0 + x and x / 1 are x

    return predict


def predict_native(predict: Predict, cond: torch.Tensor, target: torch.Tensor, data: DataConfig,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Native-size (B, 3, 256, 256) condition and target in the run's value range ->
    (prediction, ground truth), both (B, 1, 256, 256) in [0, 1] on the CPU."""
    model_cond, model_target = to_model_size(cond, target, data)
    pred = predict(model_cond.to(device), model_target.to(device)).cpu()
    return pred, to_unit_scale(target, data)


def score_batch(predict: Predict, cond: torch.Tensor, target: torch.Tensor, data: DataConfig,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Per-image metrics (B,) of one native-size batch, as radiodiff-eval computes them."""
    pred, gt = predict_native(predict, cond, target, data, device)
    return all_metrics(pred, gt)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_map_batch1(predict_one: Callable[[int], Any], num_maps: int, device: torch.device) -> float:
    """Seconds per map at batch 1: ``predict_one(i)`` predicts map i alone; one warm-up call (map 0),
    then maps 0..num_maps-1 each timed with the device synchronised before and after."""
    assert num_maps > 0
    predict_one(0)
    seconds = 0.0
    for index in range(num_maps):
        synchronize(device)
        started = time.perf_counter()
        predict_one(index)
        synchronize(device)
        seconds += time.perf_counter() - started
    return seconds / num_maps


def speed_text(seconds_per_map: float, batch_size: int, batch1: float | None) -> str:
    """Seconds per map at the configured batch, and at batch 1 when it was timed."""
    text = f"{seconds_per_map:.4g} s/map at batch {batch_size}"
    return text if batch1 is None else f"{text}, {batch1:.4g} s/map at batch 1"


def inference_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on GPUs (tensor cores), fp32 on CPUs (no speed-up worth the rounding)."""
    if setting == "auto":
        return "autocast" if device.type == "cuda" else "fp32"
    return setting


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
