"""The latent scale factor of stage 2: z0 = scale * (a sample of the VAE posterior).

A fixed number (the reference uses 0.3), the autoencoder config's ``scaling_factor``, or ``auto``:
1 / the standard deviation of the latents, measured on the first training batches at the start of
a run and stored with every checkpoint (``latent_scale.pt``), so a resumed run, evaluation and
sampling use the value the run trained with.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

AUTO = "auto"


class LatentScale:
    """The run's scale factor as checkpointed state (state_dict / load_state_dict)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def state_dict(self) -> dict[str, Any]:
        return {"scale_factor": torch.tensor(self.value, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["scale_factor"])


def latent_std(latents: Iterable[torch.Tensor]) -> float:
    """Standard deviation over every element of the given latent batches (float64 sums)."""
    total = total_sq = count = 0.0
    for z in latents:
        z = z.double()
        total += float(z.sum())
        total_sq += float(z.square().sum())
        count += z.numel()
    if count < 2:
        raise ValueError("no latents to measure the scale factor on")
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0) ** 0.5
