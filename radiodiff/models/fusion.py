"""How the condition reaches the U-Net: distance, line-of-sight and detour channels, convolutional stem, dense
and token fusion.

The transmitter is one pixel of the condition image. Anything that averages over a region before the
network has located it (a 4x4 patch embedding, pooling to a few tokens) dilutes or erases it, so the
condition is fused *densely* at every level of the U-Net, at that level's own resolution
(:class:`DenseFusion`), and optionally also through cross-attention to pooled tokens
(:class:`ConditionFusion`). See radiodiff/models/README.md for the measurements behind the defaults.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff.models.unet_blocks import CrossAttention
from radiodiff.precision import without_autocast

TX_CHANNEL = 1  # condition channels are [buildings, transmitter, cars or buildings]
BUILDINGS_CHANNEL = 0
LOS_CHANNELS = 2  # tx_line_of_sight's output channels
# Building length crossed is measured in units of 1/64 of the map's side (4 m of RadioMapSeer's 256 m, about
# where the penetration loss through a building saturates), so the channel reads the same at every size.
LOS_LENGTH_UNITS = 64
LOS_MAX_POINTS = 1 << 22  # line samples per chunk: bounds the memory at 256x256 and large batches
# A detour around buildings is measured in units of 1/16 of the map's side (16 m of RadioMapSeer's 256 m).
DETOUR_UNITS = 16


def _transmitter_rc(cond: torch.Tensor, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> the transmitter's row and column (B,) each, float32: the argmax of ``cond[:, channel]``."""
    w = cond.shape[-1]
    index = cond[:, channel].flatten(1).argmax(dim=1)  # (B,)
    return torch.div(index, w, rounding_mode="floor").float(), (index % w).float()


def _pixel_distance(cond: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """(B, H, W) Euclidean distance in pixels from every pixel of ``cond`` to (row[b], col[b]), float32."""
    h, w = cond.shape[-2:]
    dr = torch.arange(h, device=cond.device, dtype=torch.float32)[None, :, None] - row[:, None, None]  # (B, H, 1)
    dc = torch.arange(w, device=cond.device, dtype=torch.float32)[None, None, :] - col[:, None, None]  # (B, 1, W)
    return (dr.square() + dc.square()).sqrt()


def tx_distance_map(cond: torch.Tensor, channel: int = TX_CHANNEL) -> torch.Tensor:
    """(B, C, H, W) condition -> (B, 1, H, W) distance to the transmitter, mapped to [-1, 1].

    The transmitter is the argmax of ``cond[:, channel]`` (exactly one pixel at the maximum value;
    on ties the first in row-major order). The Euclidean distance in pixels is divided by the image
    diagonal ``sqrt((H - 1)^2 + (W - 1)^2)`` and mapped linearly from [0, 1] to [-1, 1], the value
    range of the other condition channels. Everything stays on ``cond``'s device: no host sync.
    A condition without a transmitter (all equal) gives the distance to pixel (0, 0).
    """
    h, w = cond.shape[-2:]
    diagonal = max(((h - 1) ** 2 + (w - 1) ** 2) ** 0.5, 1.0)
    distance = _pixel_distance(cond, *_transmitter_rc(cond, channel)) / diagonal  # (B, H, W) in [0, 1]
    return (2.0 * distance - 1.0).unsqueeze(1).to(cond.dtype)


def derived_channels(tx_distance: bool, tx_los: bool, tx_detour: bool = False) -> int:
    """How many channels :func:`with_derived_channels` appends."""
    return int(tx_distance) + LOS_CHANNELS * int(tx_los) + int(tx_detour)


def with_derived_channels(cond: torch.Tensor, *, tx_distance: bool, tx_los: bool,
                          tx_detour: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C + derived_channels(...), H, W): ``cond``, then the opt-in channels computed
    from it, in this order: the distance to the transmitter (1), the line-of-sight channels (2), the
    detour around buildings (1)."""
    extra = [tx_distance_map(cond)] if tx_distance else []
    if tx_los or tx_detour:  # one line-of-sight pass for both
        with torch.no_grad(), without_autocast(cond.device):
            sight = _sight_lines(cond, TX_CHANNEL, BUILDINGS_CHANNEL)
            extra += ([_los_channels(sight)] if tx_los else []) + ([_detour_channel(sight)] if tx_detour else [])
    return torch.cat([cond, *[x.to(cond.dtype) for x in extra]], dim=1) if extra else cond


def _buildings_unit(cond: torch.Tensor, channel: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) float32: ``cond[:, channel]`` scaled to [0, 1] by its own minimum and
    maximum (a map without buildings reads 0)."""
    buildings = cond[:, channel:channel + 1].float()
    low = buildings.amin(dim=(2, 3), keepdim=True)
    return (buildings - low) / (buildings.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-6)


def _line_share(buildings: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) buildings in [0, 1] -> (B, H, W): the mean of the buildings along the straight line from
    (row[b], col[b])'s pixel centre to each pixel's, sampled bilinearly at ``max(H, W)`` evenly spaced
    midpoints (spacing at most 1.42 pixels), in row chunks of at most ``LOS_MAX_POINTS`` samples."""
    b, _, h, w = buildings.shape
    k = max(h, w)
    along = (torch.arange(k, device=buildings.device, dtype=torch.float32) + 0.5) / k  # (K,)
    cols = torch.arange(w, device=buildings.device, dtype=torch.float32)
    # Sample points in grid_sample's normalised coordinates (align_corners=False: pixel centres).
    x = col[:, None, None] + along[None, None, :] * (cols[None, :, None] - col[:, None, None])  # (B, W, K)
    gx = ((x + 0.5) * (2.0 / w) - 1.0)[:, None]  # (B, 1, W, K)
    shares, chunk = [], max(1, LOS_MAX_POINTS // (b * w * k))
    for start in range(0, h, chunk):
        rows = torch.arange(start, min(start + chunk, h), device=buildings.device, dtype=torch.float32)
        y = row[:, None, None] + along[None, None, :] * (rows[None, :, None] - row[:, None, None])  # (B, R, K)
        gy = ((y + 0.5) * (2.0 / h) - 1.0)[:, :, None]  # (B, R, 1, K)
        grid = torch.stack(torch.broadcast_tensors(gx.expand(-1, len(rows), -1, -1), gy), dim=-1)
        samples = F.grid_sample(buildings, grid.reshape(b, len(rows), w * k, 2), mode="bilinear",
                                align_corners=False)  # (B, 1, R, W * K)
        shares.append(samples.reshape(b, len(rows), w, k).mean(dim=-1))  # (B, R, W)
    return torch.cat(shares, dim=1)


def tx_line_of_sight(cond: torch.Tensor, channel: int = TX_CHANNEL,
                     buildings_channel: int = BUILDINGS_CHANNEL) -> torch.Tensor:
    """(B, C, H, W) condition -> (B, 2, H, W): how much building the straight line from the transmitter to
    each pixel crosses, in [-1, 1] (-1: line of sight).

    Channel 0: the share of the line inside buildings. Channel 1: ``1 - exp(-L)``, L the building length
    crossed in units of 1/64 of the map's side (``LOS_LENGTH_UNITS``), which saturates after a few metres
    of building as the penetration loss does. The line from the transmitter's pixel centre to the
    pixel's is sampled at ``max(H, W)`` evenly spaced midpoints (spacing at most 1.42 pixels), each read
    bilinearly from the buildings channel scaled to [0, 1] by its own minimum and maximum (a map without
    buildings reads 0). The transmitter is located as in :func:`tx_distance_map`. Computed in float32
    without gradients, in row chunks of at most ``LOS_MAX_POINTS`` samples; returned in ``cond``'s dtype.
    """
    with torch.no_grad(), without_autocast(cond.device):
        return _los_channels(_sight_lines(cond, channel, buildings_channel)).to(cond.dtype)


class _SightLines(NamedTuple):
    """What the line-of-sight and detour channels share, float32, (B, ...)."""

    buildings: torch.Tensor  # (B, 1, H, W) in [0, 1]
    direct: torch.Tensor  # (B, H, W) straight-line distance to the transmitter in pixels
    share: torch.Tensor  # (B, H, W) the share of that line inside buildings


def _sight_lines(cond: torch.Tensor, channel: int, buildings_channel: int) -> _SightLines:
    buildings = _buildings_unit(cond, buildings_channel)
    row, col = _transmitter_rc(cond, channel)  # (B,) each
    return _SightLines(buildings, _pixel_distance(cond, row, col), _line_share(buildings, row, col))


def _los_channels(sight: _SightLines) -> torch.Tensor:
    """-> (B, 2, H, W) float32: :func:`tx_line_of_sight`'s channels."""
    crossed = sight.share * sight.direct * (LOS_LENGTH_UNITS / max(sight.direct.shape[-2:]))  # (B, H, W)
    return 2.0 * torch.stack([sight.share, 1.0 - torch.exp(-crossed)], dim=1) - 1.0


@torch.compiler.disable  # H + W sweeps would be unrolled into one graph (512 at 256x256): run them eagerly
def _shortest_paths(seed: torch.Tensor, blocked: torch.Tensor, sweeps: int) -> torch.Tensor:
    """(B, H, W) path lengths known so far (inf elsewhere) -> after ``sweeps`` relaxations over the 8
    neighbours (steps of 1 and sqrt(2) pixels) through pixels that are not ``blocked`` (stay inf).

    One relaxation takes separable minima over 3-pixel windows: along rows and along columns (the pixel
    and its 4 edge neighbours, +1), then the row minima along columns (all 9, +sqrt(2)). The 9-pixel
    term overstates nothing (an edge neighbour or the pixel itself is already reached more cheaply), so
    the result is exactly the per-neighbour minimum, without an (8, B, H, W) stack of shifted copies."""
    h, w = seed.shape[-2:]
    path = seed.masked_fill(blocked, float("inf"))
    for _ in range(sweeps):
        padded = F.pad(path, (1, 1, 1, 1), value=float("inf"))
        rows = torch.minimum(torch.minimum(padded[:, :, :w], padded[:, :, 1:w + 1]), padded[:, :, 2:])  # (B, H+2, W)
        columns = torch.minimum(padded[:, :h, 1:w + 1], padded[:, 2:, 1:w + 1])
        square = torch.minimum(torch.minimum(rows[:, :h], rows[:, 1:h + 1]), rows[:, 2:])
        edges = torch.minimum(rows[:, 1:h + 1], columns)
        path = torch.minimum(torch.minimum(path, edges + 1.0), square + 2.0 ** 0.5).masked_fill(blocked, float("inf"))
    return path


def tx_detour_map(cond: torch.Tensor, channel: int = TX_CHANNEL,
                  buildings_channel: int = BUILDINGS_CHANNEL) -> torch.Tensor:
    """(B, C, H, W) condition -> (B, 1, H, W): how much longer the shortest path from the transmitter around
    the buildings is than the straight line, ``1 - exp(-D)`` mapped to [-1, 1] (-1: line of sight).

    D is the detour in units of 1/16 of the map's side (``DETOUR_UNITS``: 16 m of RadioMapSeer's 256 m,
    where the dominant path around a building has lost most of its power). Pixels whose straight line
    crosses less than half a pixel of building (:func:`_line_share`) keep their straight-line distance; the
    others get the shortest 8-neighbour path from those through pixels outside buildings (buildings: the
    buildings channel scaled as in :func:`tx_line_of_sight`, >= 0.5), relaxed ``H + W`` times (enough for
    paths that turn a few corners; no host sync). Building pixels and unreachable ones read 1. Computed in
    float32 without gradients; returned in ``cond``'s dtype.
    """
    with torch.no_grad(), without_autocast(cond.device):
        return _detour_channel(_sight_lines(cond, channel, buildings_channel)).to(cond.dtype)


def _detour_channel(sight: _SightLines) -> torch.Tensor:
    """-> (B, 1, H, W) float32: :func:`tx_detour_map`'s channel."""
    h, w = sight.direct.shape[-2:]
    in_sight = sight.share * sight.direct < 0.5
    seed = torch.where(in_sight, sight.direct, float("inf"))
    path = _shortest_paths(seed, sight.buildings[:, 0] >= 0.5, h + w)
    detour = (path - sight.direct).clamp_min(0.0) * (DETOUR_UNITS / max(h, w))  # inf stays inf
    return (2.0 * (1.0 - torch.exp(-detour)) - 1.0).unsqueeze(1)


class ConditionStem(nn.Module):
    """Conv stack on the raw condition: features at strides ``first_stride * (1, 2, 4, 8)`` (the condition
    encoder's), widths ``dim*(1,2,4,4)``; ``first_stride`` is 4 (the published layout) or 2 (a factor-2 VAE).

    Two 3x3 conv-GroupNorm-SiLU layers per resolution (full, 1/2 when ``first_stride`` is 4, then one
    pair per level) with 2x2 max-pooling between resolutions. Max-pooling is what lets the network
    *learn* to use the one-pixel transmitter: the peak it makes in the first layers survives every
    pooling at full strength. With stride-2 convolutions instead (every pixel still reaches every
    level), the transmitter's share of each output is a few percent of the buildings', and the U-Net
    trained as a direct latent regressor did not learn to use it in 400 updates
    (radiodiff/models/README.md).
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
