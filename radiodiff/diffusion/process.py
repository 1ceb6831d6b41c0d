"""Forward process of the constant SDE: z_t = (1 - t) z0 + sqrt(t) noise, t ~ U(eps, 1).

The data term is ``z0 + C * t`` with the constant ``C = -z0``: it moves on a straight line from z0
(t = 0) to 0 (t = 1), while the noise variance grows linearly, so z_1 is pure noise.
"""

from __future__ import annotations

import torch


def _per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def sample_time(
    batch: int, eps: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    power: float = 0.0,
) -> torch.Tensor:
    """(B,) times drawn from [eps, 1) with density proportional to t^power (0: uniform, as published);
    eps > 0 keeps log(t) and 1 / sqrt(t) finite."""
    return time_from_uniform(torch.rand(batch, generator=generator, device=device), eps, power)


def time_from_uniform(u: torch.Tensor, eps: float, power: float = 0.0) -> torch.Tensor:
    """Uniform [0, 1) draws -> times in [eps, 1) with density proportional to t^power (inverse CDF)."""
    if power:
        u = u.pow(1.0 / (1.0 + power))
    return eps + (1.0 - eps) * u


def forward_sample(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) z0 + sqrt(t) noise, with t (B,) and z0, noise (B, C, H, W)."""
    tb = _per_example(t, z0)
    return (1.0 - tb) * z0 + tb.sqrt() * noise


def targets(z0: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two regression targets: C = -z0 for the C head, the noise for the eps head."""
    return -z0, noise
