"""Building blocks of the KL autoencoder.

Submodule names (``norm1``, ``conv1``, ``nin_shortcut``, ``q``/``k``/``v``/``proj_out``, ``conv``)
follow the CompVis latent-diffusion layout so that published checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff.models.attention import attend

# The latent-diffusion autoencoders normalise with eps=1e-6; checkpoints were trained with it.
GROUP_NORM_EPS = 1e-6


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1 when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0, num_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels: int, *, num_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        # 1x1 convs rather than Linear layers: that is how the checkpoints store q/k/v.
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(2, 3)

        # attend scales by 1/sqrt(C), the reference scaling.
        out = attend(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.transpose(2, 3).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padded by one pixel on the right and bottom only, as latent-diffusion does."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
