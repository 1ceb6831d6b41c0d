"""Swin-style hierarchical condition encoder: the (buildings, transmitter, ...) image -> 4 feature maps.

A patch embedding (stride ``patch_size``) is followed by four stages of window self-attention blocks
with a learned relative position bias; every second block shifts its windows by half a window
(cyclic shift plus an attention mask, so a token never attends across the wrap-around seam), and a
patch merging layer halves the resolution and doubles the width between stages. The encoder returns
the normalised output of every stage: strides ``patch_size * (1, 2, 4, 8)`` (4, 8, 16, 32 by default)
with widths ``embed_dim * (1, 2, 4, 8)``.

Module and parameter names follow the layout of the official Swin checkpoints (``patch_embed.proj``,
``layers.{i}.blocks.{j}.attn.qkv``, ``layers.{i}.downsample.reduction``, ...), so a converted
Swin-B state dict loads when its window size matches ours (the ImageNet window of 7 gives a relative
bias table of another shape, and loading names that key). Differences from the detection backbone:
windows larger than a feature map shrink to the map (no padding), and there is no drop-path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff.config import ConditionEncoderConfig
from radiodiff.models.attention import attend

# Keys a pretrained file may hold that this encoder does not use (classification head, final norm)
# or recomputes (index buffers and masks).
_IGNORED_PREFIXES = ("head.", "norm.", "avgpool.")
_IGNORED_SUFFIXES = ("relative_position_index", "attn_mask")


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Boolean mask (num_windows, window^2, window^2): True where attention is allowed.

    After rolling the map by ``-shift``, the last ``shift`` rows (columns) hold content that came
    from the opposite edge. Label each token by the (row band, column band) it falls in; tokens of one
    window may attend to each other only when their labels agree.
    """
    labels = torch.zeros(h, w, dtype=torch.long)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            labels[rows, cols] = label
            label += 1
    windows = window_partition(labels.view(1, h, w, 1), window).squeeze(-1)  # (nW, w*w)
    return windows[:, :, None] == windows[:, None, :]


def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(window^2, window^2) indices into a ((2 * table_window - 1)^2) bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # (2, window^2)
    rel = coords[:, :, None] - coords[:, None, :] + table_window - 1  # shifted to be >= 0
    return rel[0] * (2 * table_window - 1) + rel[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self._indices: dict[tuple, torch.Tensor] = {}  # not state: rebuilt from the window size

    def _index(self, window: int, device: torch.device) -> torch.Tensor:
        """The relative position index, built on the host once per (window, device) and kept: later
        forwards create no host tensors and copy nothing to the device."""
        key = (window, str(device))
        if key not in self._indices:
            self._indices[key] = relative_position_index(window, self.window_size).to(device)
        return self._indices[key]

    def forward(self, x: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B * nW, N, C) with N = window^2; mask: (nW, N, N) bool or None
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B * nW, heads, N, C / heads)
        index = self._index(window, x.device)
        bias = self.relative_position_bias_table[index.flatten()].view(n, n, -1).permute(2, 0, 1)
        bias = bias.to(q.dtype).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            num_windows = mask.shape[0]
            # Masked pairs get -inf; every token may attend to itself, so no row is all -inf.
            blocked = torch.zeros(mask.shape, dtype=q.dtype, device=x.device).masked_fill(~mask, float("-inf"))
            bias = (bias.unsqueeze(0) + blocked[None, :, None]).expand(bw // num_windows, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.num_heads, n, n)
        out = attend(q, k, v, attn_mask=bias)  # (B * nW, heads, N, C / heads)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention + MLP; ``shifted`` blocks roll the map by half a window first."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, shifted: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._masks: dict[tuple, torch.Tensor] = {}  # not state: rebuilt from the map size

    def _mask(self, h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
        """The shifted-window mask, built once per map size and device (see WindowAttention._index)."""
        key = (h, w, window, shift, str(device))
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(h, w, window, shift).to(device)
        return self._masks[key]

    def window_and_shift(self, h: int, w: int) -> tuple[int, int]:
        """The window and shift used on an (h, w) map."""
        window = min(self.window_size, h, w)
        if h % window or w % window:
            raise ValueError(
                f"feature map {h}x{w} is not divisible by the window size {window}; "
                "use a condition size divisible by patch_size * 8 * window_size"
            )
        # A window covering the whole map has nothing to shift towards (as in Swin).
        shift = window // 2 if self.shifted and window < min(h, w) else 0
        return window, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        b, h, w, c = x.shape
        window, shift = self.window_and_shift(h, w)
        y = self.norm1(x)
        mask = None
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            mask = self._mask(h, w, window, shift, x.device)
        y = self.attn(window_partition(y, window), window, mask)  # (B * nW, window^2, C)
        y = window_reverse(y, window, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Official Swin order of the four sub-grids, so that converted weights mean the same thing.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, cfg: ConditionEncoderConfig, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, cfg.window_size, cfg.mlp_ratio, shifted=j % 2 == 1) for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (stage output before merging, input of the next stage)."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class ConditionEncoder(nn.Module):
    """(B, in_channels, H, W) -> [(B, embed_dim * 2**i, H / (patch_size * 2**i), ...) for i in 0..3]."""

    def __init__(self, cfg: ConditionEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.widths = [cfg.embed_dim * 2**i for i in range(len(cfg.depths))]
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.embed_dim, cfg.patch_size)
        last = len(cfg.depths) - 1
        self.layers = nn.ModuleList(
            SwinStage(width, depth, heads, cfg, merge=i < last)
            for i, (width, depth, heads) in enumerate(zip(self.widths, cfg.depths, cfg.num_heads))
        )
        for i, width in enumerate(self.widths):
            self.add_module(f"norm{i}", nn.LayerNorm(width))
        self.apply(_init_weights)
        if cfg.pretrained_path is not None:
            load_pretrained(self, cfg.pretrained_path)

    @property
    def stride(self) -> int:
        return self.cfg.patch_size * 2 ** (len(self.cfg.depths) - 1)

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        h, w = cond.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"condition size {h}x{w} must be divisible by {self.stride}")
        x = self.patch_embed(cond)  # (B, H/4, W/4, C)
        features = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            norm = getattr(self, f"norm{i}")
            features.append(norm(out).permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
        return features


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def load_pretrained(encoder: ConditionEncoder, path: str) -> None:
    """Load a local state dict (optionally wrapped in ``{"model": ...}`` or ``{"state_dict": ...}``).

    Raises FileNotFoundError naming the file when it is missing, and ValueError listing the
    missing, unexpected and mis-shaped keys when the file does not describe this encoder.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"condition.pretrained_path={path!r}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {
        k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)
    }
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"condition.pretrained_path={path!r} does not match the condition encoder: "
            f"missing {_preview(missing)}; unexpected {_preview(unexpected)}; shape mismatch {_preview(mis_shaped)}"
        )
    encoder.load_state_dict(state)


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ConditionEncoder", "shifted_window_mask", "window_partition", "load_pretrained", "count_parameters"]
