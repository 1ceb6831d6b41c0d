"""KL-regularised autoencoder (the first stage of RadioDiff) and its VAE-GAN training wrapper.

Parameter names follow the CompVis latent-diffusion layout (``encoder.down.0.block.1.norm1.weight``,
``encoder.mid.attn_1.q.weight``, ``decoder.up.2.upsample.conv.weight``, ``quant_conv.weight``, ...),
so published "KL" autoencoder checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from radiodiff.config import AutoencoderConfig, VaeGanLossConfig
from radiodiff.models.blocks import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    group_norm,
)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """Posterior q(z|x) with diagonal covariance, from (B, 2*Z, h, w) moments (mean first)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, Z, h, w) each
        # Clamped so that exp() neither overflows nor collapses to 0 early in training.
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, Z, h, w)
        """mean + std * noise; ``noise`` (like the mean) if given, else drawn from ``generator``."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.dtype)

    def mode(self) -> torch.Tensor:  # (B, Z, h, w)
        return self.mean

    def kl(self) -> torch.Tensor:  # (B,)
        """KL(q || N(0, I)) per example, summed over channels and positions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class _Level(nn.Module):
    """One resolution level; a plain container so that names read ``down.{i}.block.{j}``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups)
        self.attn_1 = AttnBlock(channels, num_groups=num_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups)


class _CheckpointedModule(nn.Module):
    grad_checkpointing: bool = False

    def _run(self, block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _mid(self, mid: _MidBlock, h: torch.Tensor) -> torch.Tensor:
        h = self._run(mid.block_1, h)
        h = self._run(mid.attn_1, h)
        return self._run(mid.block_2, h)


class Encoder(_CheckpointedModule):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.grad_checkpointing = cfg.grad_checkpointing
        groups, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = cfg.ch, cfg.resolution
        for i, block_out in enumerate(widths):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout, num_groups=groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, num_groups=groups))
            if i != len(widths) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _MidBlock(block_in, cfg.dropout, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, 2Z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = self._run(block, h)
                if len(level.attn) > 0:
                    h = self._run(level.attn[j], h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self._mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_CheckpointedModule):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.grad_checkpointing = cfg.grad_checkpointing
        groups, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        res = cfg.resolution // 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _MidBlock(block_in, cfg.dropout, groups)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):  # built from the lowest resolution up
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, widths[i], dropout=cfg.dropout, num_groups=groups))
                block_in = widths[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, num_groups=groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.append(level)
        # Indexed by resolution level (up.0 is the full-resolution one), as in the checkpoints.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, kernel_size=3, padding=1)

    def features(self, z: torch.Tensor) -> torch.Tensor:  # (B, Z, h, w) -> (B, ch*ch_mult[0], H, W)
        """Everything but ``conv_out``: the input of the last layer."""
        h = self._mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = self._run(block, h)
                if len(level.attn) > 0:
                    h = self._run(level.attn[j], h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return F.silu(self.norm_out(h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, Z, h, w) -> (B, Cout, H, W)
        return self.conv_out(self.features(z))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)

    @property
    def last_layer(self) -> nn.Conv2d:
        """The decoder's last conv, whose weight the adaptive discriminator weight differentiates."""
        return self.decoder.conv_out

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(Z, h, w) of the latent of an image_size x image_size input."""
        side = image_size // self.cfg.downsample_factor
        return (self.cfg.embed_dim, side, side)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # x: (B, Cin, H, W)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(
        self, z: torch.Tensor, return_features: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, E, h, w) latent -> (B, Cout, H, W); with ``return_features`` also the input of
        ``last_layer``, so a caller can recompute ``last_layer(features.detach())`` on a small
        separate graph (the adaptive weight under DeepSpeed, whose engines hook their outputs)."""
        feats = self.decoder.features(self.post_quant_conv(z))
        recon = self.decoder.conv_out(feats)
        return (recon, feats) if return_features else recon

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: Optional[torch.Generator] = None,
        return_features: bool = False,
        noise: Optional[torch.Tensor] = None,
    ) -> Union[tuple[torch.Tensor, DiagonalGaussian], tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]]:
        """(recon, posterior), plus the input of ``last_layer`` when ``return_features``: a
        training engine's forward must hand those out, since only its forward may be called.
        ``noise``: the posterior sample's standard normal draw (else from ``generator``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        if return_features:
            recon, feats = self.decode(z, return_features=True)
            return recon, posterior, feats
        return self.decode(z), posterior


class VaeGanGenerator(nn.Module):
    """The autoencoder plus the NLL loss's learned log-variance, trained by one optimizer.

    ``logvar`` has shape (1,), not (), because DeepSpeed's bf16 mode cannot handle 0-dim
    parameters. It lives beside ``autoencoder`` so that the autoencoder's own state dict stays
    exactly the CompVis layout.
    """

    def __init__(self, autoencoder: AutoencoderKL, *, learn_logvar: bool = True, logvar_init: float = 0.0) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = nn.Parameter(torch.full((1,), float(logvar_init)), requires_grad=learn_logvar)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: Optional[torch.Generator] = None,
        return_features: bool = False,
        noise: Optional[torch.Tensor] = None,
    ) -> Union[tuple[torch.Tensor, DiagonalGaussian], tuple[torch.Tensor, DiagonalGaussian, torch.Tensor]]:
        return self.autoencoder(x, sample_posterior=sample_posterior, generator=generator,
                                return_features=return_features, noise=noise)

    def autoencoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare autoencoder's weights, in the CompVis layout (no ``logvar``)."""
        return self.autoencoder.state_dict()


def build_vae_gan_generator(cfg: AutoencoderConfig, loss_cfg: VaeGanLossConfig) -> VaeGanGenerator:
    return VaeGanGenerator(AutoencoderKL(cfg), learn_logvar=loss_cfg.learn_logvar, logvar_init=loss_cfg.logvar_init)
