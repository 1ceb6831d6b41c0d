"""Compiled blocks and the channels-last layout (``train.compile``, ``train.channels_last``).

Compilation is regional: each repeated block (a res block, an attention block, a Swin block; the
small PatchGAN as one region) is compiled in place with ``Module.compile``, never the whole network:
- blocks of one class share their compiled code (dynamo takes a module's parameters as graph
  inputs), so compile time grows with the number of block classes and shapes, not with depth;
- the state-dict names stay what they were (no ``_orig_mod.`` prefix): a compiled run resumes an
  eager run's checkpoint and the other way round, and exported weights do not change;
- what runs between the blocks (DeepSpeed's hooks, activation checkpointing, the losses, the
  non-finite agreement, the EMA) stays eager, so the guards and the exact resume are unchanged.

Channels-last restrides the step's 4-d inputs and the frozen modules' convolution weights (LPIPS,
the frozen VAE of stage 2). The engines' weights stay contiguous: they are views into ZeRO's flat
buffers, which DeepSpeed cannot build from restrided weights (its broadcast views them as bytes) and
which restriding after the engine is built would break (its gradient hooks flatten them with
``view(-1)``). Their convolutions still run channels-last: cuDNN and oneDNN follow the input's layout.
"""

from __future__ import annotations

import torch
from torch import nn

from radiodiff.models.blocks import AttnBlock, ResnetBlock
from radiodiff.models.condition import SwinBlock
from radiodiff.models.discriminator import NLayerDiscriminator
from radiodiff.models.unet_blocks import CrossAttention, LinearAttention, ResBlock, SelfAttention

# The compiled regions: the autoencoder's, the U-Net's and the condition encoder's repeated blocks,
# and the PatchGAN whole (a short plain stack).
REGIONS: tuple[type[nn.Module], ...] = (
    ResnetBlock, AttnBlock, ResBlock, CrossAttention, SelfAttention, LinearAttention, SwinBlock,
    NLayerDiscriminator,
)
# Dynamo recompiles a block's code for each new input shape or block layout (a res block with and
# without a skip conv, each resolution): the reference U-Net needs a few dozen variants of its
# res block's code, above dynamo's default of 8, after which it would fall back to eager silently.
RECOMPILE_LIMIT = 64


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def restride_frozen(module: nn.Module, channels_last: bool) -> nn.Module:
    """The convolution weights of a frozen (non-engine) module in the requested layout.

    ``module.to(memory_format=...)`` is avoided: it would restride every 4-d parameter.
    """
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
        conv.to(memory_format=memory_format(channels_last))
    return module


def compile_regions(module: nn.Module, backend: str = "inductor") -> int:
    """Compile every region of ``module`` in place (the outermost, not one inside another), with
    static shapes; returns how many. ``backend``: torch.compile's (tests use "aot_eager": the same
    graph capture and forward/backward split, without inductor's code generation)."""
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, RECOMPILE_LIMIT)
    regions = _outermost_regions(module)
    for region in regions:
        region.compile(dynamic=False, backend=backend)
    return len(regions)


def _outermost_regions(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, REGIONS):
        return [module]
    return [region for child in module.children() for region in _outermost_regions(child)]
