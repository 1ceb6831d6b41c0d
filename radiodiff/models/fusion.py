"""How the condition reaches the U-Net: distance channel, convolutional stem, dense and token fusion.

The transmitter is one pixel of the condition image. Anything that averages over a region before the
network has located it (a 4x4 patch embedding, pooling to a few tokens) dilutes or erases it, so the
condition is fused *densely* at every level of the U-Net, at that level's own resolution
(:class:`DenseFusion`), and optionally also through cross-attention to pooled tokens
(:class:`ConditionFusion`). See radiodiff/models/README.md for the measurements behind the defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff.models.unet_blocks import CrossAttention

TX_CHANNEL = 1  # condition channels are [buildings, transmitter, cars or buildings]


def tx_distance_map(cond: torch.Tensor, channel: int = TX_CHANNEL) -> torch.Tensor:
    """(B, C, H, W) condition -> (B, 1, H, W) distance to the transmitter, mapped to [-1, 1].

    The transmitter is the argmax of ``cond[:, channel]`` (exactly one pixel at the maximum value;
    on ties the first in row-major order). The Euclidean distance in pixels is divided by the image
    diagonal ``sqrt((H - 1)^2 + (W - 1)^2)`` and mapped linearly from [0, 1] to [-1, 1], the value
    range of the other condition channels. Everything stays on ``cond``'s device: no host sync.
    A condition without a transmitter (all equal) gives the distance to pixel (0, 0).
    """
    b, _, h, w = cond.shape
    index = cond[:, channel].flatten(1).argmax(dim=1)  # (B,)
    row = torch.div(index, w, rounding_mode="floor").float()
    col = (index % w).float()
    rows = torch.arange(h, device=cond.device, dtype=torch.float32)
    cols = torch.arange(w, device=cond.device, dtype=torch.float32)
    dr = rows[None, :, None] - row[:, None, None]  # (B, H, 1)
    dc = cols[None, None, :] - col[:, None, None]  # (B, 1, W)
    diagonal = max(((h - 1) ** 2 + (w - 1) ** 2) ** 0.5, 1.0)
    distance = (dr.square() + dc.square()).sqrt() / diagonal  # (B, H, W) in [0, 1]
    return (2.0 * distance - 1.0).unsqueeze(1).to(cond.dtype)


class ConditionStem(nn.Module):
    """Conv stack on the raw condition: features at strides ``first_stride * (1, 2, 4, 8)`` (the condition
    encoder's), widths ``dim*(1,2,4,4)``; ``first_stride`` is 4 (the published layout) or 2 (a factor-2 VAE).

    Two 3x3 conv-GroupNorm-SiLU layers per resolution (full, 1/2 when ``first_stride`` is 4, then one
    pair per level) with 2x2 max-pooling between resolutions. Max-pooling is what lets the network *learn* to use the one-pixel
    transmitter: the peak it makes in the first layers survives every pooling at full strength. With
    stride-2 convolutions instead (every pixel still reaches every level), the transmitter's share of
    each output is a few percent of the buildings', and the U-Net trained as a direct latent regressor
    did not learn to use it in 400 updates (radiodiff/models/README.md).
    """

    def __init__(self, in_channels: int, dim: int, groups: int, first_stride: int = 4) -> None:
        super().__init__()
        if first_stride not in (2, 4):
            raise ValueError(f"the condition stem starts at stride 2 or 4, not {first_stride} "
                             "(condition.patch_size); set unet.cond_stem_dim=0 for other patch sizes")
        self.widths = [dim, 2 * dim, 4 * dim, 4 * dim]

        def pair(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())

        self.full = pair(in_channels, dim)  # stride 1
        # stride 2 (before the first level at stride 4); the stride-2 layout's first level is this resolution
        self.half_res = pair(dim, dim) if first_stride == 4 else None
        self.levels = nn.ModuleList(pair(cin, cout) for cin, cout in zip([dim, *self.widths[:-1]], self.widths))

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        x = self.full(cond)  # (B, dim, H, W)
        if self.half_res is not None:
            x = self.half_res(F.max_pool2d(x, 2))  # (B, dim, H / 2, W / 2)
        features = []
        for level in self.levels:
            x = level(F.max_pool2d(x, 2))
            features.append(x)  # (B, widths[i], H / (first_stride * 2**i), W / (first_stride * 2**i))
        return features


class DenseFusion(nn.Module):
    """GroupNorm(x + mix([x, resize(proj(feature))])): the condition at every position of the level.

    ``proj`` (1x1) brings the condition feature to the level width, bilinear resizing to the U-Net
    feature's size (a no-op when the condition is 4x the latent), ``mix`` (1x1) combines the two.
    ``zero_init`` starts ``mix`` at zero, so that the block is only a GroupNorm at initialisation.
    """

    def __init__(self, cond_channels: int, width: int, groups: int, zero_init: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cond_channels, width, 1)
        self.mix = nn.Conv2d(2 * width, width, 1)
        self.norm = nn.GroupNorm(groups, width)
        if zero_init:
            nn.init.zeros_(self.mix.weight)
            nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W); feature: (B, C_cond, H', W')
        c = self.proj(feature)  # (B, C, H', W')
        if c.shape[-2:] != x.shape[-2:]:
            c = F.interpolate(c, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.norm(x + self.mix(torch.cat([x, c], dim=1)))


class ConditionTokens(nn.Module):
    """(B, C_cond, H, W) condition feature -> (B, grid^2, C_level) tokens with a learned position."""

    def __init__(self, in_ch: int, out_ch: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(in_ch, out_ch, 1)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, out_ch) * 0.02)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        # Pooling before the 1x1 conv gives the same result (both are linear) at a fraction of the cost.
        # A grid larger than the feature repeats its entries (adaptive pooling of a smaller map).
        pooled = F.adaptive_avg_pool2d(feature, self.grid)  # (B, C_cond, grid, grid)
        return self.proj(pooled).flatten(2).transpose(1, 2) + self.pos  # (B, grid^2, C_level)


class ConditionFusion(nn.Module):
    """The fusion of one U-Net level: dense fusion, then cross-attention to pooled tokens; each optional."""

    def __init__(
        self,
        cond_channels: int,
        width: int,
        *,
        dense: bool,
        attention: bool,
        token_grid: int,
        heads: int,
        dim_head: int,
        groups: int,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.dense = DenseFusion(cond_channels, width, groups, zero_init) if dense else None
        self.tokens = ConditionTokens(cond_channels, width, token_grid) if attention else None
        self.cross = CrossAttention(width, heads, dim_head, groups) if attention else None

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = self.dense(x, feature)
        if self.cross is not None:
            x = self.cross(x, self.tokens(feature))
        return x
