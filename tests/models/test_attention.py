"""Attention blocks: the fused kernels accept their inputs (no silent fall-back to the math kernel,
which materialises the N x N weights), and they compute softmax(q k^T / sqrt(d)) v as written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from radiodiff.models.blocks import AttnBlock
from radiodiff.models.unet_blocks import CrossAttention, SelfAttention


BLOCKS = ("vae AttnBlock", "unet SelfAttention", "unet CrossAttention")


def _block(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """One of BLOCKS, seeded, with its inputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    if name == "vae AttnBlock":
        return AttnBlock(32, num_groups=8), (x,)
    if name == "unet SelfAttention":
        return SelfAttention(32, 4, 8, 8), (x,)
    return CrossAttention(32, 4, 8, 8), (x, torch.randn(2, 4, 32))


@pytest.mark.parametrize("name", BLOCKS)
def test_attention_runs_on_the_fused_kernel(name: str) -> None:
    """Only flash attention allowed (the CPU's fused kernel): raises "No available kernel" where the inputs
    are views the kernel refuses (a transposed token layout), forward or backward."""
    block, inputs = _block(name)
    inputs = tuple(x.requires_grad_() for x in inputs)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        block(*inputs).square().mean().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) by hand, float64."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # (B, N, heads * d) -> (B, heads, N, d)
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def test_vae_attention_matches_the_formula() -> None:
    block, (x,) = _block("vae AttnBlock")
    block, x = block.double(), x.double()
    b, c, h, w = x.shape
    y = block.norm(x)
    q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (block.q, block.k, block.v))
    out = _softmax_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
    expected = x + block.proj_out(out)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_unet_self_attention_matches_the_formula() -> None:
    block, (x,) = _block("unet SelfAttention")
    block, x = block.double(), x.double()
    b, c, h, w = x.shape
    qkv = block.to_qkv(block.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3 * inner)
    q, k, v = (_heads(z, block.heads) for z in qkv.chunk(3, dim=-1))
    out = _softmax_attention(q, k, v).transpose(1, 2).reshape(b, h * w, -1)  # (B, HW, inner)
    expected = x + block.to_out(out.transpose(1, 2).reshape(b, -1, h, w))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
