"""Training-time augmentation by the data's one exact symmetry: reflection across the anti-diagonal.

Path loss is the same under any rotation or reflection of a city with its transmitter, but
RadioMapSeer's maps are not: the simulator rasterises the buildings a little off the PNGs, so the
street pixels on the north and east faces of buildings are often 0 (the ring that
``data.propagation`` models: about 27% of street pixels with a building only to their south or
only to their west are 0 in the real training maps, 1% of those with one only to their north or
east). A flip or a 90-degree rotation moves that ring onto faces where the data never has it.
Reflection across the anti-diagonal, pixel (r, c) -> (255 - c, 255 - r), swaps the south and west
neighbours, so it maps the ring onto itself: it is the only non-trivial element of the square's
symmetry group that keeps the data's conventions, and the synthetic simulator gives the reflected
city the reflected map up to rounding (tests/unit/test_augment.py).

Whether a sample is reflected is drawn from (loader seed, its stream position), so the choice does
not depend on the rank, the micro-batch or a resume at another world size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_PURPOSE = 4  # a stream of its own, apart from the diffusion draws keyed by the same positions


def antidiagonal(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, H) -> the maps reflected across the anti-diagonal: out[..., r, c] = in[..., H-1-c, H-1-r]."""
    if maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"the anti-diagonal reflection needs square maps, got {tuple(maps.shape[-2:])}")
    return maps.flip(-2, -1).transpose(-2, -1)


def reflected(positions: Sequence[int], seed: int) -> torch.Tensor:
    """(B,) bool: which samples, by stream position, the loader with ``seed`` reflects (half of them)."""
    draws = [np.random.SeedSequence([seed, _PURPOSE, int(p)]).generate_state(1)[0] & 1 for p in positions]
    return torch.tensor(draws, dtype=torch.bool)


def augment_batch(batch: dict, seed: int) -> dict:
    """Reflect the condition and the target of the chosen samples of a collated batch, in place."""
    chosen = reflected(batch["pos"].tolist(), seed)
    if chosen.any():
        for name in ("cond_u8", "target_u8"):
            batch[name][chosen] = antidiagonal(batch[name][chosen])
    return batch
