"""Building each stage's models, engines and validation from its config."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Iterator

import torch

from radiodiff.config import ConfigError, DataConfig, ModelConfig, TrainLdmConfig, TrainVaeConfig
from radiodiff.data.manifest import read_manifest
from radiodiff.data.schema import NATIVE_SIZE
from radiodiff.data.shards import ShardLoader
from radiodiff.diffusion.latent_scale import AUTO, LatentScale, latent_std
from radiodiff.dist import DistInfo, all_reduce_sum, print0
from radiodiff.losses.perceptual import LPIPSLoss
from radiodiff.models.autoencoder import DiagonalGaussian, build_vae_gan_generator
from radiodiff.models.discriminator import build_discriminator
from radiodiff.models.ema import EMA
from radiodiff.models.unet import build_unet
from radiodiff.runs import FrozenVae, LoadedModels, latent_scale, load_frozen_vae
from radiodiff.runs.latent_cache import check_cache
from radiodiff.runs.layout import (
    AUTOENCODER_WEIGHTS,
    EMA_STATE,
    LATENT_SCALE,
    UNET_ENGINE,
)
from radiodiff.runs.predict import (
    Predict,
    make_predictor,
    sampler_generator,
    score_batch,
)
from radiodiff.train.acceleration import compile_regions, restride_frozen
from radiodiff.train.engines import build_engine
from radiodiff.train.loop import Stage
from radiodiff.train.steps import LdmModels, VaeGanModels, ldm_step, vae_gan_step

VAL_METRICS = ("psnr", "ssim", "nmse", "rmse")
# Data options that change what the frozen VAE sees: stage 2 must use the VAE run's values.
VAE_DATA_KEYS = ("value_range", "threshold", "image_size", "cars_input")


def _check_zero_stage(stage: int, what: str) -> None:
    # Both stages call modules outside their engine's forward (the frozen discriminator, the EMA),
    # which needs every parameter on every rank: ZeRO 3 partitions them.
    if stage > 2:
        raise ConfigError(f"deepspeed.zero_stage={stage}: {what} trains on ZeRO stages 0-2")


def _has_val_split(data: DataConfig) -> bool:
    return "val" in read_manifest(data.shards)["splits"]


def _native_val_batches(data: DataConfig, dist: DistInfo, batch_size: int, limit: int) -> Iterator[dict]:
    """Up to ``limit`` native-size batches of this rank's share of the validation split (maybe none).

    Always from the image shards (``data.shards``), also when stage 2 trains from a latent cache:
    validation scores sampled maps against the native 256x256 target, which no latent holds, and
    the cache was checked to be made from these very shards (``check_cache``).
    """
    loader = ShardLoader(replace(data, image_size=NATIVE_SIZE), "val", batch_size=batch_size, rank=dist.rank,
                         world_size=dist.world_size, epochs=1, shuffle=False, num_workers=0)
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        yield batch


def validate_with(predict: Predict, data: DataConfig, dist: DistInfo, batch_size: int, limit: int) -> dict[str, float]:
    """Mean validation metrics over all ranks, scored as radiodiff-eval scores them.

    Every rank enters the one all-reduce of (sums, count), with zeros where it has no data (a split
    with fewer samples than ranks x micro batch), so no rank can skip a collective that the others enter.
    """
    sums = torch.zeros(len(VAL_METRICS) + 1, dtype=torch.float64)  # the metrics' sums, then the count
    for batch in _native_val_batches(data, dist, batch_size, limit):
        values = score_batch(predict, batch["cond"], batch["target"], data, dist.device)
        sums += torch.tensor([float(values[m].double().sum()) for m in VAL_METRICS] + [len(batch["key"])],
                             dtype=torch.float64)
    totals = all_reduce_sum(sums, dist.device)
    if totals[-1] == 0:
        return {}
    return {f"val/{m}": float(totals[i] / totals[-1]) for i, m in enumerate(VAL_METRICS)}


def _compile(enabled: bool, **modules: torch.nn.Module) -> None:
    """train.compile: each module's repeated blocks compiled in place (before its engine is built)."""
    if enabled:
        counts = ", ".join(f"{name} {compile_regions(module)}" for name, module in modules.items())
        print0(f"train.compile: blocks compiled in place ({counts}); the first updates compile them")


def build_vae_stage(cfg: TrainVaeConfig, dist: DistInfo, *, load_universal: bool = False) -> Stage:
    _check_zero_stage(cfg.deepspeed.zero_stage, "the VAE-GAN")
    if cfg.data.latents is not None:
        raise ConfigError(f"data.latents={cfg.data.latents}: a latent cache feeds stage 2 (radiodiff-train-ldm); "
                          "the VAE-GAN trains on the images of data.shards: leave data.latents unset")
    generator = build_vae_gan_generator(cfg.model.autoencoder, cfg.loss)
    discriminator = build_discriminator(cfg.model.discriminator)
    _compile(cfg.train.compile, generator=generator, discriminator=discriminator)
    engines = {name: build_engine(module, cfg.train, cfg.deepspeed, world_size=dist.world_size,
                                  load_universal=load_universal)
               for name, module in (("autoencoder", generator), ("discriminator", discriminator))}
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = restride_frozen(LPIPSLoss(cfg.perceptual), cfg.train.channels_last).to(dist.device)
    models = VaeGanModels(engines["autoencoder"], engines["discriminator"], perceptual, cfg.loss)
    autoencoder = engines["autoencoder"].module.autoencoder
    predict = make_predictor(LoadedModels(autoencoder), cfg.data, generator=torch.Generator(),
                             precision=cfg.deepspeed.precision)

    def validate(step: int) -> dict[str, float]:
        return validate_with(predict, cfg.data, dist, cfg.train.micro_batch, cfg.train.val_batches)

    def exports() -> dict:
        return {AUTOENCODER_WEIGHTS: {k: v.detach().float().cpu() for k, v in autoencoder.state_dict().items()}}

    return Stage("vae", "ae/loss", models, engines, vae_gan_step,
                 validate=validate if _has_val_split(cfg.data) else None, exports=exports)


def check_vae_data(data: DataConfig, vae: FrozenVae, where: str) -> None:
    """Stage 2 must feed the frozen VAE what it was trained on; another simulation only warns."""
    for key in VAE_DATA_KEYS:
        mine, theirs = getattr(data, key), getattr(vae.data, key)
        if mine != theirs:
            raise ConfigError(f"data.{key}={mine!r} but the VAE ({where}) was trained with {theirs!r}; "
                              f"set data.{key}={theirs!r} or train a VAE for it")
    if data.simulation != vae.data.simulation:
        print0(f"warning: data.simulation={data.simulation} but the VAE ({where}) was trained on "
               f"{vae.data.simulation}; its latents may fit these maps less well")


def check_vae_layout(model: ModelConfig, image_size: int, factor: int, where: str) -> None:
    """The U-Net's latent size and the condition encoder's first stride must follow the VAE's factor."""
    latent = image_size // factor
    if latent != model.unet.latent_size:
        raise ConfigError(f"model.unet.latent_size={model.unet.latent_size} but data.image_size={image_size} / "
                          f"the factor {factor} of the VAE ({where}) gives {latent}")
    if model.condition.patch_size != factor:
        raise ConfigError(f"model.condition.patch_size={model.condition.patch_size} but the VAE ({where}) "
                          f"downsamples by {factor}: the condition's first feature must have the latent's size; "
                          f"set model.condition.patch_size={factor}")


def _ldm_validation(cfg: TrainLdmConfig, dist: DistInfo, vae: FrozenVae, engine, ema: EMA,
                    scale: LatentScale) -> Callable[[int], dict[str, float]]:
    """Samples with the EMA weights once the EMA averages (logged as ``val/ema``), else the raw ones."""
    unet = engine.module

    def validate(step: int) -> dict[str, float]:
        models = LoadedModels(vae.model, unet, scale.value, cfg.diffusion.eps)
        generator = sampler_generator(cfg.seed, dist.rank, dist.device)  # the same noise at every validation
        predict = make_predictor(models, cfg.data, sampler=cfg.sampler, generator=generator,
                                 precision=cfg.deepspeed.precision)
        use_ema = ema.started
        with ema.swapped_into(unet) if use_ema else contextlib.nullcontext():
            metrics = validate_with(predict, cfg.data, dist, cfg.train.micro_batch, cfg.train.val_batches)
        return {**metrics, "val/ema": float(use_ema)} if metrics else metrics

    return validate


def build_ldm_stage(cfg: TrainLdmConfig, dist: DistInfo, *, load_universal: bool = False) -> Stage:
    _check_zero_stage(cfg.deepspeed.zero_stage, "the latent diffusion model (with its EMA)")
    vae = load_frozen_vae(cfg.vae.checkpoint, dist.device)
    check_vae_data(cfg.data, vae, cfg.vae.checkpoint)
    restride_frozen(vae.model, cfg.train.channels_last)
    if cfg.data.latents is not None:
        check_cache(cfg.data, vae, cfg.vae.checkpoint)
    check_vae_layout(cfg.model, cfg.data.image_size, vae.config.downsample_factor, cfg.vae.checkpoint)
    std = measure_latent_std(cfg, vae, dist)
    scale = LatentScale(1.0 / std if cfg.diffusion.scale_factor == AUTO else latent_scale(cfg.diffusion, vae.config))
    print0(f"latent std {std:.4f}: scale factor {scale.value:.4f} ({cfg.diffusion.scale_factor or 'the VAE config'}) "
           f"gives z0 a std of {scale.value * std:.3f} against the noise's 1 (a resumed run keeps its stored scale)")
    unet = build_unet(cfg.model.unet, cfg.model.condition)
    _compile(cfg.train.compile, unet=unet, frozen_vae=vae.model)
    engine = build_engine(unet, cfg.train, cfg.deepspeed, world_size=dist.world_size, load_universal=load_universal)
    ema = EMA(engine.module, cfg.ema)
    models = LdmModels(engine, vae.model, scale, cfg.diffusion)
    validate = _ldm_validation(cfg, dist, vae, engine, ema, scale) if _has_val_split(cfg.data) else None
    return Stage("ldm", "loss", models, {UNET_ENGINE: engine}, ldm_step, validate=validate,
                 after_update=lambda step: ema.update(engine.module, step),
                 state={EMA_STATE: ema, LATENT_SCALE: scale})


SCALE_BATCHES = 4  # micro-batches of the train split whose latents are measured at the start


def measure_latent_std(cfg: TrainLdmConfig, vae: FrozenVae, dist: DistInfo) -> float:
    """Std of the posterior means of the first train batches (the same on every rank): logged at the
    start of stage 2, and 1 / it is diffusion.scale_factor=auto. From a latent cache, its stored means."""
    cached = cfg.data.latents is not None
    loader = ShardLoader(cfg.data, "train", batch_size=cfg.train.micro_batch, epochs=1, shuffle=False, num_workers=0,
                         latents=cached)
    with torch.no_grad():
        latents = [DiagonalGaussian(batch["moments"]).mode() if cached
                   else vae.model.encode(batch["target"].to(dist.device).float()).mode()
                   for _, batch in zip(range(SCALE_BATCHES), loader)]
    return latent_std(latents)
