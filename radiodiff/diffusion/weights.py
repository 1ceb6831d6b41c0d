"""Per-example loss weights of the two heads.

w_C(t) = 2 exp(1 - t) stresses C at small t, where C decides the sample's detail; w_eps(t) =
exp(sqrt(t)) stresses eps at large t, where the noise dominates z_t. Both are 1 when weighting is off.
"""

from __future__ import annotations

import torch


def weight_c(t: torch.Tensor, weighting: bool = True) -> torch.Tensor:
    """(B,) -> (B,) weight of the C term."""
    return 2.0 * torch.exp(1.0 - t) if weighting else torch.ones_like(t)


def weight_eps(t: torch.Tensor, weighting: bool = True) -> torch.Tensor:
    """(B,) -> (B,) weight of the eps term."""
    return torch.exp(torch.sqrt(t)) if weighting else torch.ones_like(t)
