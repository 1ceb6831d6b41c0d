"""Decoupled constant-SDE loss: 0.5 * E_b[w_C(t) (MSE + L1)(C_hat, C) + w_eps(t) (MSE + L1)(eps_hat, eps)]."""

from __future__ import annotations

import torch

from radiodiff.diffusion.weights import weight_c, weight_eps


def mse_plus_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) x 2 -> (B,): per-example mean squared error plus mean absolute error."""
    diff = (pred - target).float().flatten(1)  # float32 so bf16 activations do not round the loss
    return diff.square().mean(dim=1) + diff.abs().mean(dim=1)


def constant_sde_loss(
    c_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    c: torch.Tensor,
    eps_noise: torch.Tensor,
    t: torch.Tensor,
    weighting: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the scalar loss and detached terms: the batch-mean weighted and unweighted losses of each head."""
    raw_c = mse_plus_l1(c_hat, c)  # (B,)
    raw_eps = mse_plus_l1(eps_hat, eps_noise)
    t = t.float()
    term_c = (weight_c(t, weighting) * raw_c).mean()
    term_eps = (weight_eps(t, weighting) * raw_eps).mean()
    total = 0.5 * (term_c + term_eps)
    terms = {
        "loss_c": term_c.detach(),
        "loss_eps": term_eps.detach(),
        "mse_l1_c": raw_c.mean().detach(),
        "mse_l1_eps": raw_eps.mean().detach(),
    }
    return total, terms
