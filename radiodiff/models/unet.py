"""Two-head conditional U-Net of RadioDiff: (z_t, t, condition image) -> (C_hat, eps_hat).

Layout (widths ``dim * dim_mults``, four levels whose resolutions match the condition encoder's
strides p * (1, 2, 4, 8), p = ``condition.patch_size``, the VAE's factor: 4 in the published layout,
2 for a factor-2 VAE; design and measurements in radiodiff/models/README.md):

- condition features: the Swin encoder's four stages, optionally concatenated with a small conv stem
  on the raw condition (``cond_stem_dim``), optionally fed a distance-to-transmitter channel
  (``tx_distance``), two line-of-sight channels (``tx_los``) and a detour channel (``tx_detour``); "the
  condition feature of level i" is the stride p*2**i one;
- input: z_t concatenated with the stride-p condition feature (1x1 conv to ``dim``), 7x7 conv;
- time: log(t)/4 -> fixed random Fourier features -> MLP; residual blocks use it as scale/shift;
- encoder level i: res block, condition fusion, res block, linear attention, strided-conv downsample
  (not after the last level). The fusion (radiodiff/models/fusion.py) is (a) dense: the level's
  condition feature, 1x1-projected and resized to the level, concatenated with the U-Net feature,
  mixed by a 1x1 conv, added back and GroupNorm-ed (``dense_fusion``), then (b) cross-attention to
  the feature average-pooled to ``cond_token_grid``^2 tokens plus a learned position embedding
  (``cond_cross_attention``);
- bottleneck: res block, full self-attention, res block;
- two decoders (C and eps), each starting with its own learnable global frequency filter
  ``x + irfft2(rfft2(x) * W)``; decoder level i: res block on [x, skip 2], the same condition
  fusion with the level-i condition feature, res block on [x, skip 1], linear attention, upsample;
  the input fusion result is concatenated before each head's last res block, then a 1x1 conv to
  ``latent_channels``; with ``output_skips`` the reference's skips from z_t are added in fp32.

13 dense fusions in all (input, 4 encoder levels, 4 levels of each decoder), as in the reference.
The module owns the condition encoder, so one optimizer trains both.

Parameter count with the reference configs (asserted in tests/models/test_unet.py and
tests/models/test_condition.py): condition encoder 86,766,072; U-Net without it 140,646,694 with
the default stem (``cond_stem_dim=32``: 0.62M in the stem, 0.91M in the fusions' wider inputs) and
139,112,454 without it (encoder 33.1M, bottleneck 10.8M, each decoder 47.1M, of which 11.3M are the
12 level fusions); total 227,412,766, or 225,878,526 in the published layout against the
reference's 225M (88M of it Swin-B). Differences:
- condition encoder (-1.2M): no ImageNet classification head (1.03M) and final norm; four output
  norms instead; 8x8 windows give 225-entry relative bias tables instead of Swin-B's 169;
- U-Net: our own layout built from the published description, not a layer-by-layer copy (one
  2-conv res block per skip; attention widths heads x dim_head = 128 at every level);
- the frequency filter's complex weight counts as two real numbers per entry (stored as real pairs).
The learned position embedding of the condition tokens is our addition: average pooling and
attention are otherwise blind to where a token came from.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from radiodiff.config import ConditionEncoderConfig, UNetConfig
from radiodiff.models.condition import ConditionEncoder
from radiodiff.models.fusion import ConditionFusion, ConditionStem, derived_channels, with_derived_channels
from radiodiff.models.unet_blocks import (
    Downsample,
    FourierTimeEmbedding,
    FrequencyFilter,
    LinearAttention,
    ResBlock,
    SelfAttention,
    Upsample,
)


def _fusion(cond_channels: int, width: int, cfg: UNetConfig) -> ConditionFusion:
    return ConditionFusion(
        cond_channels, width, dense=cfg.dense_fusion, attention=cfg.cond_cross_attention,
        token_grid=cfg.cond_token_grid, heads=cfg.attn_heads, dim_head=cfg.attn_dim_head,
        groups=cfg.norm_groups, zero_init=cfg.fusion_zero_init,
    )


class EncoderLevel(nn.Module):
    def __init__(
        self, in_ch: int, width: int, next_width: int | None, cond_ch: int, cfg: UNetConfig, time_dim: int
    ) -> None:
        super().__init__()
        g, heads, dh = cfg.norm_groups, cfg.attn_heads, cfg.attn_dim_head
        self.res1 = ResBlock(in_ch, width, time_dim, g)
        self.fusion = _fusion(cond_ch, width, cfg)
        self.res2 = ResBlock(width, width, time_dim, g)
        self.attn = LinearAttention(width, heads, dh, g)
        self.down = Downsample(width, next_width) if next_width is not None else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, feature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (input of the next level, skip 1, skip 2)."""
        skip1 = self.fusion(self.res1(x, temb), feature)  # (B, width, H, W)
        skip2 = self.attn(self.res2(skip1, temb))
        out = self.down(skip2) if self.down is not None else skip2
        return out, skip1, skip2


class DecoderLevel(nn.Module):
    def __init__(self, width: int, prev_width: int | None, cond_ch: int, cfg: UNetConfig, time_dim: int) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.res1 = ResBlock(2 * width, width, time_dim, g)
        self.fusion = _fusion(cond_ch, width, cfg)
        self.res2 = ResBlock(2 * width, width, time_dim, g)
        self.attn = LinearAttention(width, cfg.attn_heads, cfg.attn_dim_head, g)
        self.up = Upsample(width, prev_width) if prev_width is not None else None

    def forward(
        self, x: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor, temb: torch.Tensor, feature: torch.Tensor
    ) -> torch.Tensor:
        x = self.fusion(self.res1(torch.cat([x, skip2], dim=1), temb), feature)  # (B, width, H, W)
        x = self.attn(self.res2(torch.cat([x, skip1], dim=1), temb))
        return self.up(x) if self.up is not None else x


class Decoder(nn.Module):
    """One head: frequency filter on the bottleneck, levels from coarse to fine, 1x1 conv out."""

    def __init__(
        self, widths: list[int], cond_widths: list[int], cfg: UNetConfig, time_dim: int, bottleneck_size: int
    ) -> None:
        super().__init__()
        self.filter = FrequencyFilter(widths[-1], bottleneck_size)
        self.levels = nn.ModuleList(
            DecoderLevel(widths[i], widths[i - 1] if i > 0 else None, cond_widths[i], cfg, time_dim)
            for i in reversed(range(len(widths)))
        )
        self.final = ResBlock(widths[0] + cfg.dim, cfg.dim, time_dim, cfg.norm_groups)
        self.out = nn.Conv2d(cfg.dim, cfg.latent_channels, 1)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        skips: list[tuple[torch.Tensor, torch.Tensor]],
        first: torch.Tensor,
        temb: torch.Tensor,
        features: list[torch.Tensor],
    ) -> torch.Tensor:
        x = self.filter(x)
        for level, (skip1, skip2), feature in zip(self.levels, reversed(skips), reversed(features)):
            x = _run(level, self.grad_checkpointing, x, skip1, skip2, temb, feature)
        x = self.final(torch.cat([x, first], dim=1), temb)  # (B, dim, h, w)
        return self.out(x)  # (B, latent_channels, h, w)


def output_skips(
    z_t: torch.Tensor, t: torch.Tensor, f_c: torch.Tensor, f_eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's output skips, in fp32 (t is never rounded to the parameters' dtype).

    C = (1 - t) z_t + t / sqrt(1 + t^2) F_C,   eps = sqrt(t) z_t + sqrt(1 - t) / sqrt(1 + t^2) F_eps.
    At t -> 1 (pure noise) eps = z_t exactly, whatever the head says. At t -> 0 the C skip is +z_t =
    +z0 while the target is C = -z0, so the head, scaled by t, must cancel 2 z0 with outputs of order
    1/t: trained this way the maps are 4.6 dB worse than without skips (radiodiff/models/README.md),
    hence off by default. Returned in the heads' dtype.
    """
    tb = t.float().reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    z, norm = z_t.float(), (1.0 + tb.square()).sqrt()
    c = (1.0 - tb) * z + tb / norm * f_c.float()
    eps = tb.sqrt() * z + (1.0 - tb).clamp(min=0.0).sqrt() / norm * f_eps.float()
    return c.to(f_c.dtype), eps.to(f_eps.dtype)


class ConditionalUNet(nn.Module):
    """forward(z_t (B, C, h, w), t (B,), cond (B, C_cond, 4h, 4w)) -> (C_hat, eps_hat), each like z_t.

    Pass t in float32: the time embedding and the output skips use it as given.
    """

    def __init__(self, cfg: UNetConfig, cond_cfg: ConditionEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.dim * m for m in cfg.dim_mults]
        time_dim = 4 * cfg.dim
        cond_in = cond_cfg.in_channels + derived_channels(cfg.tx_distance, cfg.tx_los, cfg.tx_detour)
        if cond_in != cond_cfg.in_channels:
            cond_cfg = dataclasses.replace(cond_cfg, in_channels=cond_in)
        self.cond_encoder = ConditionEncoder(cond_cfg)
        self.cond_stem = (ConditionStem(cond_in, cfg.cond_stem_dim, cfg.norm_groups, cond_cfg.patch_size)
                          if cfg.cond_stem_dim else None)
        cond_widths = list(self.cond_encoder.widths)
        if self.cond_stem is not None:
            cond_widths = [a + b for a, b in zip(cond_widths, self.cond_stem.widths)]
        self.cond_in = nn.Conv2d(cond_widths[0], cfg.dim, 1)
        self.init_conv = nn.Conv2d(cfg.latent_channels + cfg.dim, cfg.dim, 7, padding=3)
        self.time_embed = FourierTimeEmbedding(cfg.fourier_features, cfg.fourier_scale, time_dim)
        self.encoder = nn.ModuleList(
            EncoderLevel(
                cfg.dim if i == 0 else widths[i],
                widths[i],
                widths[i + 1] if i + 1 < len(widths) else None,
                cond_widths[i],
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
        self.decoder_c = Decoder(widths, cond_widths, cfg, time_dim, bottleneck)
        self.decoder_eps = Decoder(widths, cond_widths, cfg, time_dim, bottleneck)

    def condition_features(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_cond, H, W) -> the condition feature of every level: 4 x (B, C_i, H / 2**(i+2), ...)."""
        cond = with_derived_channels(cond, tx_distance=self.cfg.tx_distance, tx_los=self.cfg.tx_los,
                                     tx_detour=self.cfg.tx_detour)
        features = self.cond_encoder(cond)
        if self.cond_stem is not None:
            features = [torch.cat(pair, dim=1) for pair in zip(features, self.cond_stem(cond))]
        return features

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_inputs(z_t, t)
        features = self.condition_features(cond)
        if features[0].shape[-2:] != z_t.shape[-2:]:
            stride = self.cond_encoder.cfg.patch_size
            raise ValueError(
                f"the stride-{stride} condition feature is {tuple(features[0].shape[-2:])} but the latent is "
                f"{tuple(z_t.shape[-2:])}: the condition must be {stride}x the latent size "
                "(condition.patch_size is the VAE's downsampling factor)"
            )
        temb = self.time_embed(t)  # (B, 4 * dim)
        first = self.init_conv(torch.cat([z_t, self.cond_in(features[0])], dim=1))  # (B, dim, h, w)
        x, skips = first, []
        for level, feature in zip(self.encoder, features):
            x, skip1, skip2 = _run(level, self.cfg.grad_checkpointing, x, temb, feature)
            skips.append((skip1, skip2))
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)  # (B, widths[-1], h/8, w/8)
        f_c = self.decoder_c(x, skips, first, temb, features)
        f_eps = self.decoder_eps(x, skips, first, temb, features)
        if self.cfg.output_skips:
            return output_skips(z_t, t, f_c, f_eps)
        return f_c, f_eps

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
