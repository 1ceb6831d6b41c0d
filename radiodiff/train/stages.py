"""Building each stage's models, engines and validation from its config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from radiodiff.config import AutoencoderConfig, ConfigError, TrainLdmConfig, TrainVaeConfig
from radiodiff.data.shards import ShardLoader
from radiodiff.diffusion.sampler import sample
from radiodiff.eval.metrics import all_metrics, to_unit
from radiodiff.losses.perceptual import LPIPSLoss
from radiodiff.models.autoencoder import AutoencoderKL, build_vae_gan_generator
from radiodiff.models.discriminator import build_discriminator
from radiodiff.models.unet import build_unet
from radiodiff.train import checkpoint
from radiodiff.train.dist import DistInfo, all_reduce_mean
from radiodiff.train.ema import EMA
from radiodiff.train.engines import build_engine
from radiodiff.train.loop import Stage
from radiodiff.train.steps import LdmModels, VaeGanModels, encode_latents, ldm_step, vae_gan_step

AUTOENCODER_WEIGHTS = "autoencoder_weights"  # the bare autoencoder, exported with each VAE checkpoint


def _check_zero_stage(stage: int, what: str) -> None:
    # Both stages call modules outside their engine's forward (the frozen discriminator, the EMA),
    # which needs every parameter on every rank: ZeRO 3 partitions them.
    if stage > 2:
        raise ConfigError(f"deepspeed.zero_stage={stage}: {what} trains on ZeRO stages 0-2")


def _validation_batches(cfg, dist: DistInfo, batch_size: int, limit: int):
    """Up to ``limit`` batches of this rank's share of the validation split (or None if there is none)."""
    loader = ShardLoader(cfg, "val", batch_size=batch_size, rank=dist.rank, world_size=dist.world_size,
                         epochs=1, shuffle=False, num_workers=0)
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        yield batch


def _autocast(precision: str, dist: DistInfo) -> torch.autocast:
    return torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=precision != "fp32")


def _has_val_split(cfg) -> bool:
    from radiodiff.data.shard_stream import read_manifest

    return "val" in read_manifest(cfg.shards)["splits"]


def _mean_metrics(values: list[dict[str, torch.Tensor]], prefix: str, dist: DistInfo) -> dict[str, float]:
    if not values:
        return {}
    means = {f"{prefix}/{k}": torch.cat([v[k] for v in values]).mean() for k in ("psnr", "ssim", "nmse", "rmse")}
    return all_reduce_mean(means, dist.device)


def build_vae_stage(cfg: TrainVaeConfig, dist: DistInfo, *, load_universal: bool = False) -> Stage:
    _check_zero_stage(cfg.deepspeed.zero_stage, "the VAE-GAN")
    generator = build_vae_gan_generator(cfg.model.autoencoder, cfg.loss)
    discriminator = build_discriminator(cfg.model.discriminator)
    engines = {name: build_engine(module, cfg.train, cfg.deepspeed, world_size=dist.world_size,
                                  load_universal=load_universal)
               for name, module in (("autoencoder", generator), ("discriminator", discriminator))}
    perceptual = None
    if cfg.loss.perceptual_weight > 0:
        perceptual = LPIPSLoss(cfg.perceptual).to(dist.device)
    models = VaeGanModels(engines["autoencoder"], engines["discriminator"], perceptual, cfg.loss)
    autoencoder = engines["autoencoder"].module.autoencoder
    has_val = _has_val_split(cfg.data)

    def validate(step: int) -> dict[str, float]:
        if not has_val:
            return {}
        values = []
        with torch.no_grad(), _autocast(cfg.deepspeed.precision, dist):
            for batch in _validation_batches(cfg.data, dist, cfg.train.micro_batch, cfg.train.val_batches):
                x = batch["target"].to(dist.device)
                recon, _ = autoencoder(x, sample_posterior=False)
                values.append(all_metrics(to_unit(recon), to_unit(x)))
        return _mean_metrics(values, "val", dist)

    def extras() -> dict:
        return {AUTOENCODER_WEIGHTS: {k: v.detach().float().cpu() for k, v in autoencoder.state_dict().items()}}

    return Stage("vae", "ae/loss", models, engines, vae_gan_step, validate=validate, extras=extras)


def load_frozen_vae(path: str, device: torch.device) -> tuple[AutoencoderKL, AutoencoderConfig, Path]:
    """The autoencoder of a VAE run (its newest committed checkpoint) or of one checkpoint folder."""
    from radiodiff.config import TrainVaeConfig

    folder = checkpoint.resolve_checkpoint(path)
    vae_cfg = checkpoint.read_run_config(folder.parent.parent, TrainVaeConfig)
    autoencoder = AutoencoderKL(vae_cfg.model.autoencoder)
    weights = folder / f"{AUTOENCODER_WEIGHTS}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: the autoencoder weights {weights} are missing")
    autoencoder.load_state_dict(checkpoint.load_extra(folder, AUTOENCODER_WEIGHTS), strict=True)
    autoencoder.requires_grad_(False).eval().to(device)
    return autoencoder, vae_cfg.model.autoencoder, folder


def build_ldm_stage(cfg: TrainLdmConfig, dist: DistInfo, *, load_universal: bool = False) -> Stage:
    _check_zero_stage(cfg.deepspeed.zero_stage, "the latent diffusion model (with its EMA)")
    vae, vae_cfg, _ = load_frozen_vae(cfg.vae.checkpoint, dist.device)
    latent = cfg.data.image_size // vae_cfg.downsample_factor
    if latent != cfg.model.unet.latent_size:
        raise ConfigError(f"model.unet.latent_size={cfg.model.unet.latent_size} but data.image_size="
                          f"{cfg.data.image_size} / the VAE's factor {vae_cfg.downsample_factor} gives {latent}")
    scale = cfg.diffusion.scale_factor or vae_cfg.scaling_factor
    engine = build_engine(build_unet(cfg.model.unet, cfg.model.condition), cfg.train, cfg.deepspeed,
                          world_size=dist.world_size, load_universal=load_universal)
    ema = EMA(engine.module, cfg.ema)
    models = LdmModels(engine, vae, scale, replace(cfg.diffusion, scale_factor=scale))

    def validate(step: int) -> dict[str, float]:
        values = []
        generator = torch.Generator(dist.device).manual_seed(cfg.seed * 1000003 + dist.rank)
        unet = engine.module
        with torch.no_grad(), _autocast(cfg.deepspeed.precision, dist):
            for batch in _validation_batches(cfg.data, dist, cfg.train.micro_batch, cfg.train.val_batches):
                x, cond = batch["target"].to(dist.device), batch["cond"].to(dist.device)
                z0 = encode_latents(vae, x, 1.0)
                z = sample(lambda z_t, t: unet(z_t, t, cond), tuple(z0.shape), steps=cfg.sampler.steps,
                           eps=cfg.diffusion.eps, generator=generator)
                pred = vae.decode(z / scale)
                values.append(all_metrics(to_unit(pred), to_unit(x)))
        return _mean_metrics(values, "val", dist)

    return Stage("ldm", "loss", models, {"unet": engine}, ldm_step, validate=validate if _has_val_split(cfg.data) else None,
                 after_update=lambda step: ema.update(engine.module, step),
                 extras=lambda: {"ema": ema.state_dict()},
                 restore=lambda folder: ema.load_state_dict(checkpoint.load_extra(folder, "ema")))
