"""Shared test helpers (no work at import time)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_fake_vgg16_weights(path: Path, seed: int) -> Path:
    """Write a torchvision-vgg16-shaped state dict with random conv weights to ``path``.

    Only the ``features`` convs matter to LPIPS; the 120M classifier weights are stored as
    stride-0 views of one element, so the file stays small while still loading into
    ``torchvision.models.vgg16`` with ``strict=True``.
    """
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.startswith("features."):
            # Scaled so activations neither vanish nor explode through 13 random convs.
            fan_in = shape[1:].numel() if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5 if len(shape) > 1 else (
                0.01 * torch.randn(shape, generator=gen)
            )
        else:
            state[key] = torch.zeros(1).expand(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
