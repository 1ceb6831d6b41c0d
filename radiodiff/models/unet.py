"""Two-head conditional U-Net of RadioDiff: (z_t, t, condition image) -> (C_hat, eps_hat).

Layout (widths ``dim * dim_mults``, four levels whose resolutions match the condition encoder's
strides 4, 8, 16, 32 when the condition is 4x the latent size):

- input: z_t concatenated with the stride-4 condition feature (1x1 conv to ``dim``), 7x7 conv;
- time: log(t)/4 -> fixed random Fourier features -> MLP; residual blocks use it as scale/shift;
- encoder level i: res block, cross-attention to the stride 4*2**i condition feature (1x1 conv to
  the level width, average-pooled to ``cond_token_grid``^2 tokens plus a learned position
  embedding), res block, linear attention, strided-conv downsample (not after the last level);
- bottleneck: res block, full self-attention, res block;
- two decoders (C and eps), each starting with its own learnable global frequency filter
  ``x + irfft2(rfft2(x) * W)`` and taking both skips of every encoder level; each ends in a 1x1
  conv to ``latent_channels``.

The module owns the condition encoder, so one optimizer trains both.

Parameter count and differences from the reference (225M, 88M of it the Swin-B encoder). Ours, with
the reference configs: condition encoder 86,766,072; U-Net without it 129,477,638 (encoder 30.0M,
bottleneck 10.8M, each decoder 43.3M, condition/time/input layers 2.1M); total 216,243,710 (asserted
in tests/models/test_unet.py and tests/models/test_condition.py). Where the ~9M go:
- condition encoder (-1.2M): no ImageNet classification head (1.03M) and final norm; four output
  norms instead; 8x8 windows give 225-entry relative bias tables instead of Swin-B's 169;
- U-Net (-7.5M): this is our own layout built from the published description, not a layer-by-layer
  copy; in particular our decoders have no condition cross-attention and one 2-conv res block per
  skip, and the attention widths are heads x dim_head = 128 at every level;
- the frequency filter's complex weight counts as two real numbers per entry (stored as real pairs).
The learned position embedding of the condition tokens is our addition: average pooling and
attention are otherwise blind to where a token came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from radiodiff.config import ConditionEncoderConfig, UNetConfig
from radiodiff.models.condition import ConditionEncoder
from radiodiff.models.unet_blocks import (
    CrossAttention,
    Downsample,
    FourierTimeEmbedding,
    FrequencyFilter,
    LinearAttention,
    ResBlock,
    SelfAttention,
    Upsample,
)


class ConditionTokens(nn.Module):
    """(B, C_cond, H, W) condition feature -> (B, grid^2, C_level) tokens."""

    def __init__(self, in_ch: int, out_ch: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(in_ch, out_ch, 1)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, out_ch) * 0.02)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        # Pooling before the 1x1 conv gives the same result (both are linear) at a fraction of the cost.
        pooled = F.adaptive_avg_pool2d(feature, self.grid)  # (B, C_cond, grid, grid)
        return self.proj(pooled).flatten(2).transpose(1, 2) + self.pos  # (B, grid^2, C_level)


class EncoderLevel(nn.Module):
    def __init__(self, in_ch: int, width: int, next_width: int | None, cfg: UNetConfig, time_dim: int) -> None:
        super().__init__()
        g, heads, dh = cfg.norm_groups, cfg.attn_heads, cfg.attn_dim_head
        self.res1 = ResBlock(in_ch, width, time_dim, g)
        self.cross = CrossAttention(width, heads, dh, g)
        self.res2 = ResBlock(width, width, time_dim, g)
        self.attn = LinearAttention(width, heads, dh, g)
        self.down = Downsample(width, next_width) if next_width is not None else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (input of the next level, skip 1, skip 2)."""
        skip1 = self.cross(self.res1(x, temb), tokens)  # (B, width, H, W)
        skip2 = self.attn(self.res2(skip1, temb))
        out = self.down(skip2) if self.down is not None else skip2
        return out, skip1, skip2


class DecoderLevel(nn.Module):
    def __init__(self, width: int, prev_width: int | None, cfg: UNetConfig, time_dim: int) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.res1 = ResBlock(2 * width, width, time_dim, g)
        self.res2 = ResBlock(2 * width, width, time_dim, g)
        self.attn = LinearAttention(width, cfg.attn_heads, cfg.attn_dim_head, g)
        self.up = Upsample(width, prev_width) if prev_width is not None else None

    def forward(self, x: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res1(torch.cat([x, skip2], dim=1), temb)  # (B, width, H, W)
        x = self.attn(self.res2(torch.cat([x, skip1], dim=1), temb))
        return self.up(x) if self.up is not None else x


class Decoder(nn.Module):
    """One head: frequency filter on the bottleneck, levels from coarse to fine, 1x1 conv out."""

    def __init__(self, widths: list[int], cfg: UNetConfig, time_dim: int, bottleneck_size: int) -> None:
        super().__init__()
        self.filter = FrequencyFilter(widths[-1], bottleneck_size)
        self.levels = nn.ModuleList(
            DecoderLevel(widths[i], widths[i - 1] if i > 0 else None, cfg, time_dim)
            for i in reversed(range(len(widths)))
        )
        self.final = ResBlock(widths[0] + cfg.dim, cfg.dim, time_dim, cfg.norm_groups)
        self.out = nn.Conv2d(cfg.dim, cfg.latent_channels, 1)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(
        self, x: torch.Tensor, skips: list[tuple[torch.Tensor, torch.Tensor]], first: torch.Tensor, temb: torch.Tensor
    ) -> torch.Tensor:
        x = self.filter(x)
        for level, (skip1, skip2) in zip(self.levels, reversed(skips)):
            x = _run(level, self.grad_checkpointing, x, skip1, skip2, temb)
        x = self.final(torch.cat([x, first], dim=1), temb)  # (B, dim, h, w)
        return self.out(x)  # (B, latent_channels, h, w)


class ConditionalUNet(nn.Module):
    """forward(z_t (B, C, h, w), t (B,), cond (B, C_cond, 4h, 4w)) -> (C_hat, eps_hat), each like z_t."""

    def __init__(self, cfg: UNetConfig, cond_cfg: ConditionEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.dim * m for m in cfg.dim_mults]
        time_dim = 4 * cfg.dim
        self.cond_encoder = ConditionEncoder(cond_cfg)
        cond_widths = self.cond_encoder.widths
        self.cond_in = nn.Conv2d(cond_widths[0], cfg.dim, 1)
        self.init_conv = nn.Conv2d(cfg.latent_channels + cfg.dim, cfg.dim, 7, padding=3)
        self.time_embed = FourierTimeEmbedding(cfg.fourier_features, cfg.fourier_scale, time_dim)
        self.cond_tokens = nn.ModuleList(
            ConditionTokens(cond_widths[i], widths[i], cfg.cond_token_grid) for i in range(len(widths))
        )
        self.encoder = nn.ModuleList(
            EncoderLevel(
                cfg.dim if i == 0 else widths[i],
                widths[i],
                widths[i + 1] if i + 1 < len(widths) else None,
                cfg,
                time_dim,
            )
            for i in range(len(widths))
        )
        g = cfg.norm_groups
        self.mid1 = ResBlock(widths[-1], widths[-1], time_dim, g)
        self.mid_attn = SelfAttention(widths[-1], cfg.attn_heads, cfg.attn_dim_head, g)
        self.mid2 = ResBlock(widths[-1], widths[-1], time_dim, g)
        bottleneck = cfg.latent_size // 2 ** (len(widths) - 1)
        self.decoder_c = Decoder(widths, cfg, time_dim, bottleneck)
        self.decoder_eps = Decoder(widths, cfg, time_dim, bottleneck)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_inputs(z_t, t)
        features = self.cond_encoder(cond)  # 4 x (B, C_i, h / 2**i, w / 2**i)
        if features[0].shape[-2:] != z_t.shape[-2:]:
            raise ValueError(
                f"the stride-4 condition feature is {tuple(features[0].shape[-2:])} but the latent is "
                f"{tuple(z_t.shape[-2:])}: the condition must be 4x the latent size"
            )
        temb = self.time_embed(t)  # (B, 4 * dim)
        first = self.init_conv(torch.cat([z_t, self.cond_in(features[0])], dim=1))  # (B, dim, h, w)
        x, skips = first, []
        for level, tokens, feature in zip(self.encoder, self.cond_tokens, features):
            x, skip1, skip2 = _run(level, self.cfg.grad_checkpointing, x, temb, tokens(feature))
            skips.append((skip1, skip2))
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)  # (B, widths[-1], h/8, w/8)
        return self.decoder_c(x, skips, first, temb), self.decoder_eps(x, skips, first, temb)

    def _check_inputs(self, z_t: torch.Tensor, t: torch.Tensor) -> None:
        size = self.cfg.latent_size
        if z_t.shape[-2:] != (size, size):
            raise ValueError(
                f"latent is {tuple(z_t.shape[-2:])} but unet.latent_size={size} sizes the frequency filters; "
                "set unet.latent_size to the latent size"
            )
        if t.shape != z_t.shape[:1]:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({z_t.shape[0]},), one time per example")


def _run(module: nn.Module, use_checkpoint: bool, *args: torch.Tensor) -> torch.Tensor:
    """Call ``module``, recomputing its activations in backward when checkpointing is on and useful."""
    if use_checkpoint and torch.is_grad_enabled() and module.training:
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def build_unet(cfg: UNetConfig, cond_cfg: ConditionEncoderConfig) -> ConditionalUNet:
    return ConditionalUNet(cfg, cond_cfg)
