"""Model schemas of both stages and their size presets (``reference``, ``tiny``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from radiodiff.config.base import ConfigError, check_choice, check_positive

DISC_LOSSES = ("hinge", "vanilla")


@dataclass
class AutoencoderConfig:
    """AutoencoderKL (CompVis latent-diffusion layout); defaults are the RadioDiff reference."""

    in_channels: int = 1
    out_channels: int = 1
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # one level per entry
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    z_channels: int = 3
    embed_dim: int = 3
    attn_resolutions: list[int] = field(default_factory=list)  # empty: only the middle block attends
    resolution: int = 256  # only decides which levels attend (attn_resolutions)
    dropout: float = 0.0
    scaling_factor: float = 0.3  # latent scale used by stage 2
    grad_checkpointing: bool = False
    norm_groups: int = 32  # GroupNorm groups; every level width must be divisible by it

    def __post_init__(self) -> None:
        for key in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "embed_dim"):
            check_positive(f"autoencoder.{key}", getattr(self, key))
        check_positive("autoencoder.resolution", self.resolution)
        check_positive("autoencoder.norm_groups", self.norm_groups)
        check_positive("autoencoder.scaling_factor", self.scaling_factor)
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"autoencoder.ch_mult={self.ch_mult!r} must be a non-empty list of positive ints")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ConfigError(
                    f"autoencoder.ch_mult={self.ch_mult!r}: width {self.ch * mult} is not divisible by "
                    f"autoencoder.norm_groups={self.norm_groups}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"autoencoder.dropout={self.dropout} must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class DiscriminatorConfig:
    """PatchGAN discriminator of the VAE-GAN."""

    in_channels: int = 1
    ndf: int = 64  # width of the first layer
    num_layers: int = 3
    use_actnorm: bool = False  # ActNorm (data-dependent init) instead of BatchNorm

    def __post_init__(self) -> None:
        check_positive("discriminator.in_channels", self.in_channels)
        check_positive("discriminator.ndf", self.ndf)
        check_positive("discriminator.num_layers", self.num_layers)


@dataclass
class PerceptualConfig:
    """LPIPS (VGG16) perceptual distance; weights are never downloaded."""

    pretrained: bool = True  # False: random VGG backbone (tests, demo); linear layers always shipped ones
    vgg_weights: Optional[str] = None  # a torchvision vgg16 state dict; None: the torch hub cache


@dataclass
class VaeGanLossConfig:
    """Weights and schedule of the VAE-GAN objective."""

    kl_weight: float = 1e-6
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_start: int = 50001  # first step at which the GAN terms are on
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla
    learn_logvar: bool = True  # the reference leaves it at its initial value; we learn it
    logvar_init: float = 0.0

    def __post_init__(self) -> None:
        check_choice("loss.disc_loss", self.disc_loss, DISC_LOSSES)
        for key in ("kl_weight", "disc_weight", "disc_start", "disc_factor", "perceptual_weight"):
            check_positive(f"loss.{key}", getattr(self, key), allow_zero=True)


# Treat these as read-only; autoencoder_preset() / discriminator_preset() hand out copies.
AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    "reference": AutoencoderConfig(),
    # Same topology (factor 4, z=3, GroupNorm(32)) at 1/4 width, one res block per level: CPU tests.
    "tiny": AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1),
}
DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    "reference": DiscriminatorConfig(),
    "tiny": DiscriminatorConfig(ndf=8),
}


def _check_preset(kind: str, presets: dict[str, object], name: str) -> None:
    if name not in presets:
        raise ConfigError(f"{kind}={name!r} is not a preset; expected one of {', '.join(presets)}")


def autoencoder_preset(name: str) -> AutoencoderConfig:
    import copy

    _check_preset("autoencoder preset", AUTOENCODER_PRESETS, name)
    return copy.deepcopy(AUTOENCODER_PRESETS[name])


def discriminator_preset(name: str) -> DiscriminatorConfig:
    import copy

    _check_preset("discriminator preset", DISCRIMINATOR_PRESETS, name)
    return copy.deepcopy(DISCRIMINATOR_PRESETS[name])




@dataclass
class ConditionEncoderConfig:
    """Swin-style hierarchical condition encoder; features at strides patch_size * (1, 2, 4, 8).

    patch_size must be the VAE's downsampling factor (stage 2 checks it): 4 as published, 2 for a
    factor-2 VAE (a finer latent at small image sizes).

    window_size=8 divides the stride-4..32 feature sizes of a 256 condition (64, 32, 16, 8);
    Swin-B's ImageNet window of 7 does not.
    """

    in_channels: int = 3
    embed_dim: int = 128  # stage widths are embed_dim * (1, 2, 4, 8)
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 8
    patch_size: int = 4  # = the VAE's downsampling factor: the first feature has the latent's size
    mlp_ratio: float = 4.0
    pretrained_path: Optional[str] = None  # a local state-dict file; never downloaded

    def __post_init__(self) -> None:
        for key in ("in_channels", "embed_dim", "window_size", "patch_size", "mlp_ratio"):
            check_positive(f"condition.{key}", getattr(self, key))
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError(
                f"condition.depths={self.depths} / condition.num_heads={self.num_heads}: "
                "expected 4 stages each (strides 4, 8, 16, 32)"
            )
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            check_positive(f"condition.depths[{i}]", depth)
            check_positive(f"condition.num_heads[{i}]", heads)
            if (self.embed_dim * 2**i) % heads:
                raise ConfigError(
                    f"condition.num_heads[{i}]={heads} must divide the stage width {self.embed_dim * 2**i}"
                )


@dataclass
class UNetConfig:
    """Two-head conditional U-Net (predicts C and eps from a shared encoder)."""

    latent_channels: int = 3
    dim: int = 128
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    cond_token_grid: int = 8  # condition features are pooled to grid x grid tokens per level
    # How the condition reaches each level (see radiodiff/models/README.md for the measurements):
    dense_fusion: bool = True  # concat + 1x1 mix + residual + GroupNorm at every encoder/decoder level
    fusion_zero_init: bool = False  # start the dense fusion's mixing conv at zero
    cond_cross_attention: bool = True  # cross-attention to pooled condition tokens at every level
    cond_stem_dim: int = 0  # > 0: a conv stem on the raw condition adds features of widths dim*(1,2,4,4)
    tx_distance: bool = False  # add a distance-to-transmitter input channel (not a published input)
    tx_los: bool = False  # add two line-of-sight channels: building crossed towards the tx (not published inputs)
    tx_detour: bool = False  # add a channel: how much longer the path around buildings is (not a published input)
    output_skips: bool = False  # reference output skips: C = (1-t) z_t + t/sqrt(1+t^2) F_C, eps likewise
    fourier_features: int = 64  # random frequencies of the time embedding
    fourier_scale: float = 16.0
    attn_heads: int = 4
    attn_dim_head: int = 32
    latent_size: int = 64  # sizes the bottleneck frequency filters
    norm_groups: int = 8  # GroupNorm groups; must divide every level width
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("latent_channels", "dim", "cond_token_grid", "fourier_features", "fourier_scale",
                    "attn_heads", "attn_dim_head", "latent_size", "norm_groups"):
            check_positive(f"unet.{key}", getattr(self, key))
        check_positive("unet.cond_stem_dim", self.cond_stem_dim, allow_zero=True)
        if self.cond_stem_dim % self.norm_groups:
            raise ConfigError(
                f"unet.cond_stem_dim={self.cond_stem_dim} must be divisible by unet.norm_groups={self.norm_groups}"
            )
        if not self.dim_mults:
            raise ConfigError("unet.dim_mults must not be empty")
        if len(self.dim_mults) != 4:
            # Level i reads the condition feature at stride patch_size * 2**i, and there are four of them.
            raise ConfigError(f"unet.dim_mults={self.dim_mults}: expected 4 levels (one per condition stride)")
        for i, mult in enumerate(self.dim_mults):
            check_positive(f"unet.dim_mults[{i}]", mult)
            if (self.dim * mult) % self.norm_groups:
                raise ConfigError(
                    f"unet.norm_groups={self.norm_groups} must divide the level width {self.dim * mult}"
                )
        downsamples = 2 ** (len(self.dim_mults) - 1)
        if self.latent_size % downsamples:
            raise ConfigError(f"unet.latent_size={self.latent_size} must be divisible by {downsamples}")


@dataclass
class DiffusionConfig:
    """Constant-SDE decoupled diffusion: z_t = (1 - t) z0 + sqrt(t) noise, t in [eps, 1) uniform (or with
    density ~ t^time_power)."""

    eps: float = 1e-4  # smallest training / sampling time
    weighting: bool = True  # w_C = 2 exp(1 - t), w_eps = exp(sqrt(t)); both 1 when off
    time_power: float = 0.0  # training times drawn with density ~ t^time_power (0: uniform, as published)
    # z0 = scale_factor * autoencoder latent: a number; "auto" (1 / std of the latents, measured at
    # the start of the run and stored with it); None: the autoencoder config's scaling_factor (0.3).
    scale_factor: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"diffusion.eps={self.eps} must be in (0, 1)")
        if not 0.0 <= self.time_power <= 100.0:
            raise ConfigError(f"diffusion.time_power={self.time_power} must be in [0, 100]")
        if self.scale_factor is not None and self.scale_factor != "auto":
            try:
                value = float(self.scale_factor)
            except ValueError:
                raise ConfigError(f"diffusion.scale_factor={self.scale_factor!r}: expected a number, auto "
                                  "or null") from None
            check_positive("diffusion.scale_factor", value)


SAMPLER_ESTIMATES = ("c_head", "reference")  # the sampler's clean estimate (radiodiff/diffusion/sampler.py)


@dataclass
class SamplerConfig:
    steps: int = 5  # uniform steps; the sampler makes steps + 1 network calls
    # Independent draws per map, their decoded maps averaged on the [0, 1] scale: a Monte-Carlo estimate
    # of the posterior mean, which PSNR/NMSE reward, at `draws` times the cost (and softer edges).
    draws: int = 1
    # The clean estimate each step re-noises: "c_head" (z0 = -C_hat, drawn from the forward process's
    # posterior; scores higher, radiodiff/models/README.md) or "reference" (the published update).
    estimate: str = "c_head"

    def __post_init__(self) -> None:
        check_positive("sampler.steps", self.steps)
        check_positive("sampler.draws", self.draws)
        check_choice("sampler.estimate", self.estimate, SAMPLER_ESTIMATES)


@dataclass
class EMAConfig:
    beta: float = 0.999
    start_step: int = 10000  # before this optimizer step the EMA copies the weights
    update_every: int = 10  # optimizer steps between EMA updates
    # The n-th average uses min(beta, 1 - (1 + n) ** -power): short runs average recent weights
    # instead of staying anchored at the start_step copy; null: beta from the first average.
    warmup_power: Optional[float] = None

    def __post_init__(self) -> None:
        if self.warmup_power is not None:
            check_positive("ema.warmup_power", self.warmup_power)
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"ema.beta={self.beta} must be in [0, 1)")
        check_positive("ema.start_step", self.start_step, allow_zero=True)
        check_positive("ema.update_every", self.update_every)


CONDITION_PRESETS: dict[str, ConditionEncoderConfig] = {
    "swin_b": ConditionEncoderConfig(),
    # Shifted windows still occur: stages 0, 1 and 2 of a 64 condition have 16, 8, 4 px maps.
    "tiny": ConditionEncoderConfig(embed_dim=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4], window_size=4),
}

UNET_PRESETS: dict[str, UNetConfig] = {
    # cond_stem_dim: a max-pooling conv stem, so that the network learns to use the one-pixel
    # transmitter (radiodiff/models/README.md); cond_stem_dim=0 gives the published layout.
    "reference": UNetConfig(cond_stem_dim=32),
    # A 3x16x16 latent (64 px condition) with widths 16..64.
    "tiny": UNetConfig(dim=16, dim_mults=[1, 2, 4, 4], cond_token_grid=2, fourier_features=8,
                       attn_heads=2, attn_dim_head=8, latent_size=16, norm_groups=4, cond_stem_dim=16),
}
