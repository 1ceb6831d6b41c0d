"""Per-sample random draws keyed by each sample's stream position.

A training sample's draws (its diffusion time and noise, its posterior sample) come from a
generator seeded by (run seed, purpose, the sample's position in the data stream), so they do not
depend on which rank, micro-batch or accumulation step the sample lands in: the same global batch
gives the same draws on 1 rank with accumulation 4 and on 4 ranks without, and a run resumed at
another world size draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Purposes: each draws from its own stream (4 is data.augment's, radiodiff/data/augment.py).
TIME, NOISE, POSTERIOR = 1, 2, 3


def sample_seed(seed: int, purpose: int, key: int) -> int:
    """A well-mixed 63-bit seed of (seed, purpose, key)."""
    return int(np.random.SeedSequence([seed, purpose, key]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _keyed(keys: Sequence[int], seed: int, purpose: int, device: torch.device, draw) -> torch.Tensor:
    """``draw(generator)`` once per key, the generator reseeded from (seed, purpose, key) each time."""
    generator = torch.Generator(device=device)
    rows = []
    for key in keys:
        generator.manual_seed(sample_seed(seed, purpose, int(key)))
        rows.append(draw(generator))
    return torch.stack(rows)


def keyed_normal(keys: Sequence[int], shape: Sequence[int], *, seed: int, purpose: int,
                 device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal fp32 draws, row i from the generator of ``keys[i]``."""
    return _keyed(keys, seed, purpose, device, lambda g: torch.randn(tuple(shape), generator=g, device=device))


def keyed_uniform(keys: Sequence[int], *, seed: int, purpose: int, device: torch.device) -> torch.Tensor:
    """(B,) uniform [0, 1) fp32 draws, one per key."""
    return _keyed(keys, seed, purpose, device, lambda g: torch.rand((), generator=g, device=device))
