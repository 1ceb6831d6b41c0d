"""PatchGAN discriminator of the VAE-GAN (one logit per overlapping 70x70 patch at 3 layers)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from radiodiff.config import DiscriminatorConfig

LEAKY_SLOPE = 0.2
INIT_STD = 0.02


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` initialised from the first training batch.

    After the first training forward, that batch's output has zero mean and unit standard
    deviation per channel. Under torch.distributed the statistics are averaged over ranks first,
    so every rank starts from the same parameters.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        # A buffer, not a Python flag, so that a resumed run does not re-initialise.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:  # x: (B, C, H, W)
        x = x.float()
        moments = torch.stack([x.mean(dim=(0, 2, 3)), x.pow(2).mean(dim=(0, 2, 3))])  # (2, C)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean = moments[0]
        std = (moments[1] - mean.pow(2)).clamp_min(0.0).sqrt()
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1.0 / (std + self.eps)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def _norm(channels: int, use_actnorm: bool) -> nn.Module:
    return ActNorm(channels) if use_actnorm else nn.BatchNorm2d(channels)


class NLayerDiscriminator(nn.Module):
    """conv4/s2 + LeakyReLU; (num_layers - 1) x [conv4/s2, norm, LeakyReLU]; conv4/s1, norm,
    LeakyReLU; conv4/s1 to one logit map. 256 input -> 30x30 logits at num_layers=3."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        ndf = cfg.ndf
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        width = ndf
        for n in range(1, cfg.num_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < cfg.num_layers else 1
            # No conv bias: the norm that follows has its own shift.
            layers += [
                nn.Conv2d(width, out, kernel_size=4, stride=stride, padding=1, bias=False),
                _norm(out, cfg.use_actnorm),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, 1, H', W')
        return self.main(x)


def build_discriminator(cfg: DiscriminatorConfig) -> NLayerDiscriminator:
    return NLayerDiscriminator(cfg)
