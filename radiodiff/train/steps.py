"""One micro-batch of each stage: ``vae_gan_step`` and ``ldm_step``, with the same signature.

Each step runs the forward passes, agrees with the other ranks on whether its losses are finite,
backpropagates through the DeepSpeed engines and calls their ``step()`` (which updates only at an
accumulation boundary). Metrics come back as tensors; the loop averages them over ranks.

Why the VAE-GAN step is built the way it is: every DeepSpeed engine treats any backward that flows
through its forward's outputs as its own training backward. So the generator loss calls the frozen
discriminator as a plain module with detached parameters (each rank holds all of them at ZeRO <= 2),
and the adaptive weight's two gradient norms are taken on a separate small graph: the decoder's
last conv recomputed from its detached input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.func import functional_call

from radiodiff.config import DiffusionConfig, VaeGanLossConfig
from radiodiff.diffusion import noise as keyed
from radiodiff.diffusion.latent_scale import LatentScale
from radiodiff.diffusion.loss import constant_sde_loss
from radiodiff.diffusion.noise import keyed_normal, keyed_uniform
from radiodiff.diffusion.process import forward_sample, sample_time, targets, time_from_uniform
from radiodiff.dist import all_reduce_max_tensor
from radiodiff.losses import vae_gan
from radiodiff.models.autoencoder import DiagonalGaussian
from radiodiff.precision import autocast
from radiodiff.train.engines import skipped_update


@dataclass
class StepContext:
    """What a step needs to know beyond its batch."""

    step: int  # the update this micro-batch belongs to (0-based)
    device: torch.device
    precision: str  # autocast | bf16 | fp32
    seed: int = 0  # the run's seed: per-sample draws are keyed by it and each sample's stream position
    inject_nan: bool = False  # fault injection (train.nan_steps)
    stop_requested: Callable[[], bool] = lambda: False  # this rank received a preemption signal
    stop: bool = False  # some rank received one (agreed by all ranks); sticky for the update
    window_bad: dict[str, bool] = field(default_factory=dict)  # engine name -> a bad micro-batch this update
    micro_bad: bool = False  # the current micro-batch was bad for some engine (reset by the loop)
    channels_last: bool = False  # train.channels_last: 4-d inputs restrided on the device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def normal(self, batch: dict, shape: tuple[int, ...], purpose: int) -> torch.Tensor | None:
        """(B, *shape) normal draws keyed by the samples' stream positions (None: the batch has none)."""
        if "pos" not in batch:
            return None
        return keyed_normal(batch["pos"].tolist(), shape, seed=self.seed, purpose=purpose, device=self.device)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host batch tensor on the device; non-blocking, so the copy does not synchronise."""
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def inputs(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = self.to_device(tensor)
        return tensor.to(torch.bfloat16) if self.precision == "bf16" else tensor


def _zero_loss(engine) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter."""
    return sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0


@contextlib.contextmanager
def intended_sync() -> Iterator[None]:
    """Marks the step's one intended host synchronisation: CUDA's sync debug mode (which a GPU test
    sets to "error" to prove a step has no other) is off inside."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def agree(losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, bool]:
    """Whether each loss is non-finite on any rank, and whether any rank was asked to stop.

    The micro-batch's one host synchronisation: every flag (one per loss, plus the preemption
    flag) goes into a single all-reduce and is read once. All ranks then take the same path, so
    DeepSpeed's collectives stay in step. Sets ``ctx.stop`` once any rank has seen a signal.
    """
    if ctx.inject_nan:
        losses = {name: loss * float("nan") for name, loss in losses.items()}
    flags = [(~torch.isfinite(loss.detach())).any().float().reshape(1) for loss in losses.values()]
    # torch.full is a device-side fill: no host-to-device copy, so no synchronisation.
    flags.append(torch.full((1,), float(ctx.stop_requested()), device=ctx.device))
    agreed = all_reduce_max_tensor(torch.cat(flags))  # (n,) of 0/1 on the device
    # The one host read: the flags packed into one integer (bit i = flag i).
    with intended_sync():
        packed = int((agreed * 2.0 ** torch.arange(len(flags), device=ctx.device)).sum().item())
    ctx.stop = ctx.stop or bool(packed >> len(losses) & 1)
    return {name: bool(packed >> i & 1) for i, name in enumerate(losses)}


def apply_update(engine, name: str, loss: torch.Tensor, bad: bool, ctx: StepContext) -> None:
    """Backward and step of one engine; a micro-batch that was bad on any rank contributes nothing
    (``bad`` comes from :func:`agree`, the same on every rank)."""
    engine.backward(_zero_loss(engine) if bad else loss)
    ctx.window_bad[name] = ctx.window_bad.get(name, False) or bad
    ctx.micro_bad = ctx.micro_bad or bad
    if ctx.window_bad[name] and engine.is_gradient_accumulation_boundary():
        with skipped_update(engine):
            engine.step()
    else:
        engine.step()


@dataclass
class VaeGanModels:
    generator: Any  # DeepSpeed engine over VaeGanGenerator (autoencoder + learned logvar)
    discriminator: Any  # DeepSpeed engine over the PatchGAN
    perceptual: torch.nn.Module | None  # frozen LPIPS; None when perceptual_weight == 0
    loss: VaeGanLossConfig


def _frozen(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call ``module`` with detached parameters: gradients reach the input, never the module."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return lambda x: functional_call(module, params, (x,))


def _adaptive_weight(models: VaeGanModels, x: torch.Tensor, features: torch.Tensor, logvar: torch.Tensor,
                     disc: Callable) -> torch.Tensor:
    """The adaptive GAN weight on a small graph: the last conv recomputed from detached features."""
    last = models.generator.module.autoencoder.last_layer
    recon = last(features.detach().to(last.weight.dtype)).float()  # same values, a separate graph
    perceptual = models.perceptual(x, recon).float() if models.perceptual is not None else None
    nll = vae_gan.nll_loss(vae_gan.reconstruction_loss(x, recon, perceptual, models.loss.perceptual_weight), logvar)
    g_loss = vae_gan.generator_loss(disc(recon.to(last.weight.dtype)).float())
    return vae_gan.adaptive_disc_weight(nll, g_loss, last.weight, models.loss.disc_weight)


def _as_float(posterior: DiagonalGaussian) -> DiagonalGaussian:
    return DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).float())


def vae_gan_step(models: VaeGanModels, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
    """One autoencoder update with the discriminator frozen, then one discriminator update.

    Networks run in bf16 under autocast (or bf16 weights); every loss is reduced in fp32.
    """
    cfg = models.loss
    x = ctx.inputs(batch["target"])  # (B, 1, H, W) in [-1, 1]
    x32 = x.float()
    factor = vae_gan.disc_factor(ctx.step, cfg.disc_start, cfg.disc_factor)
    generator, discriminator = models.generator, models.discriminator
    logvar = generator.module.logvar.float()
    disc = _frozen(discriminator.module)
    latent = generator.module.autoencoder.latent_shape(x.shape[-1])
    with ctx.autocast():
        recon, posterior, features = generator(x, return_features=True,
                                               noise=ctx.normal(batch, latent, keyed.POSTERIOR))
        perceptual = models.perceptual(x, recon) if models.perceptual is not None else None
        logits_g = disc(recon) if factor > 0 else None  # the GAN terms are 0 before disc_start
    rec = vae_gan.reconstruction_loss(x32, recon.float(), None if perceptual is None else perceptual.float(),
                                      cfg.perceptual_weight)
    nll, kl = vae_gan.nll_loss(rec, logvar), vae_gan.kl_loss(_as_float(posterior))
    g_loss, d_weight = None, torch.zeros((), device=ctx.device)
    if logits_g is not None:
        g_loss = vae_gan.generator_loss(logits_g.float())
        d_weight = _adaptive_weight(models, x32, features, logvar, disc)
    ae_loss, terms = vae_gan.autoencoder_loss(nll, kl, g_loss, kl_weight=cfg.kl_weight, d_weight=d_weight,
                                              disc_factor=factor)
    with ctx.autocast():
        # The discriminator's forward does not depend on the autoencoder's update (the fake is
        # detached), so both losses exist before either update and one agreement covers both.
        logits_real, logits_fake = discriminator(x), discriminator(recon.detach())
    d_loss = vae_gan.discriminator_loss(logits_real.float(), logits_fake.float(), cfg.disc_loss, factor)
    bad = agree({"generator": ae_loss, "discriminator": d_loss}, ctx)
    apply_update(generator, "generator", ae_loss, bad["generator"], ctx)
    apply_update(discriminator, "discriminator", d_loss, bad["discriminator"], ctx)
    metrics = {f"ae/{k}": v.detach().float() for k, v in terms.items()}
    metrics.update({"disc/loss": d_loss.detach(), "disc/logits_real": logits_real.detach().float().mean(),
                    "disc/logits_fake": logits_fake.detach().float().mean(), "ae/logvar": logvar.detach().sum()})
    return metrics


@dataclass
class LdmModels:
    engine: Any  # DeepSpeed engine over the conditional U-Net (with its condition encoder)
    vae: torch.nn.Module  # frozen AutoencoderKL, eval mode
    scale: LatentScale  # restored with the checkpoint (diffusion.scale_factor=auto measures it)
    diffusion: DiffusionConfig


def encode_latents(vae: torch.nn.Module, x: torch.Tensor, scale_factor: float,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """z0 = scale * a sample of q(z | x), with no graph (the VAE is frozen on every rank)."""
    with torch.no_grad():
        return scale_factor * vae.encode(x.float()).sample(noise=noise).float()


def draw_z0(models: LdmModels, batch: dict, ctx: StepContext) -> torch.Tensor:
    """(B, Z, h, w) fp32 z0 = scale * a sample of q(z | x), keyed by the samples' stream positions.

    From a latent cache (``batch["moments"]``, fp32) the posterior is rebuilt from its stored moments
    instead of encoding ``batch["target"]``; the keyed noise and ``DiagonalGaussian.sample`` are the
    same, so both give the same z0 (bitwise in fp32 when the moments are).
    """
    if "moments" in batch:
        posterior = DiagonalGaussian(ctx.to_device(batch["moments"]))  # (B, 2Z, h, w): mean, logvar
        noise = ctx.normal(batch, tuple(posterior.mean.shape[1:]), keyed.POSTERIOR)
        return models.scale.value * posterior.sample(noise=noise).float()
    x = ctx.to_device(batch["target"])
    latent = models.vae.latent_shape(x.shape[-1])
    with ctx.autocast():
        return encode_latents(models.vae, x, models.scale.value, ctx.normal(batch, latent, keyed.POSTERIOR))


def draw_time(batch: dict, size: int, ctx: StepContext, eps: float, power: float = 0.0) -> torch.Tensor:
    """(B,) fp32 times in [eps, 1) (density ~ t^power), keyed by the samples' stream positions when the
    batch has them."""
    if "pos" not in batch:
        return sample_time(size, eps, device=ctx.device, power=power)
    u = keyed_uniform(batch["pos"].tolist(), seed=ctx.seed, purpose=keyed.TIME, device=ctx.device)
    return time_from_uniform(u, eps, power)


def ldm_step(models: LdmModels, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
    """Constant-SDE loss of the two-head U-Net on the frozen VAE's latents (loss reduced in fp32)."""
    cond = ctx.to_device(batch["cond"])
    z0 = draw_z0(models, batch, ctx)  # (B, Z, h, w) fp32
    latent = tuple(z0.shape[1:])
    t = draw_time(batch, z0.shape[0], ctx, models.diffusion.eps, models.diffusion.time_power)  # (B,) fp32
    noise = ctx.normal(batch, latent, keyed.NOISE)
    noise = torch.randn_like(z0) if noise is None else noise
    z_t = forward_sample(z0, t, noise)
    c_target, eps_target = targets(z0, noise)
    with ctx.autocast():
        # t stays fp32 (also with bf16 parameters): z_t was built with the fp32 t, and the time
        # embedding must see the same time.
        c_hat, eps_hat = models.engine(ctx.inputs(z_t), t, ctx.inputs(cond))
    loss, terms = constant_sde_loss(c_hat.float(), eps_hat.float(), c_target, eps_target, t,
                                    models.diffusion.weighting)
    apply_update(models.engine, "unet", loss, agree({"unet": loss}, ctx)["unet"], ctx)
    return {"loss": loss.detach(), **{f"ldm/{k}": v.float() for k, v in terms.items()}}
