"""Building blocks of the conditional U-Net: time embedding, residual block, attentions, frequency filter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff.models.attention import attend


class FourierTimeEmbedding(nn.Module):
    """t -> log(t) / 4 -> [sin, cos](2 pi x f) with fixed random f ~ N(0, scale^2) -> MLP.

    log(t) spreads the small times near eps, where the sampler's last steps happen, over a useful
    range. The frequencies are drawn from a private generator (the global RNG is not touched) and kept
    as a persistent buffer, so a checkpoint holds them.
    """

    def __init__(self, num_frequencies: int, scale: float, out_dim: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        freqs = torch.randn(num_frequencies, generator=generator, device="cpu") * scale
        self.register_buffer("frequencies", freqs)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t: (B,) in (0, 1]
        x = torch.log(t.float()) / 4.0
        angles = 2 * torch.pi * x[:, None] * self.frequencies.to(x.device)[None, :]  # (B, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 2F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time embedding scales and shifts the second normalisation."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W); temb: (B, time_dim)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.time(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class CrossAttention(nn.Module):
    """Feature map (queries) attends to condition tokens (keys, values); residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, groups: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim)
        self.token_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W); tokens: (B, T, C)
        b, c, h, w = x.shape
        queries = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = _split_heads(self.to_q(queries), self.heads)  # (B, heads, HW, d)
        k, v = (_split_heads(z, self.heads) for z in self.to_kv(self.token_norm(tokens)).chunk(2, dim=-1))
        out = attend(q, k, v)  # (B, heads, HW, d)
        out = self.to_out(out.transpose(1, 2).reshape(b, h * w, -1))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class SelfAttention(nn.Module):
    """Full softmax self-attention over all positions (used at the small bottleneck); residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, groups: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim)
        self.to_qkv = nn.Conv2d(dim, 3 * inner, 1, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3 * inner)
        q, k, v = (_split_heads(z, self.heads) for z in qkv.chunk(3, dim=-1))
        out = attend(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(1, 2).reshape(b, h * w, -1).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.to_out(out)


class LinearAttention(nn.Module):
    """Attention linear in the number of positions (softmax over features for q, positions for k)."""

    def __init__(self, dim: int, heads: int, dim_head: int, groups: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.GroupNorm(groups, dim)
        self.to_qkv = nn.Conv2d(dim, 3 * inner, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim, 1), nn.GroupNorm(groups, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale  # (B, heads, d, HW)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, heads, d, d): cost O(HW d^2)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, h, w)
        return x + self.to_out(out)


class FrequencyFilter(nn.Module):
    """x + irfft2(rfft2(x) * W): a learnable global filter over the whole (H, W) map.

    W is complex with shape (C, H, W // 2 + 1); it is stored as a real tensor with a trailing
    (real, imag) axis because optimizers, EMA and ZeRO partitioning handle real tensors everywhere.
    """

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.randn(channels, size, size // 2 + 1, 2) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            raise ValueError(
                f"frequency filter is sized for a {self.size}x{self.size} bottleneck but got {h}x{w}; "
                "set unet.latent_size to the latent size the model is used with"
            )
        # FFTs run in float32: half-precision FFTs are limited to power-of-two sizes and lose accuracy.
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")  # (B, C, H, W//2+1) complex
        # torch.complex, not view_as_complex: ZeRO makes parameters views into one flat buffer at
        # offsets that view_as_complex does not accept (and channels_last restrides the weight).
        weight = self.weight.float()
        filtered = torch.fft.irfft2(spectrum * torch.complex(weight[..., 0], weight[..., 1]), s=(h, w), norm="ortho")
        return x + filtered.to(x.dtype)


class Downsample(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1))


class Upsample(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        # Nearest upsampling then a conv avoids the checkerboard of strided transposed convs.
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1))
