"""VAE-GAN objective of the first stage, as pure functions of tensors.

The discriminator and the perceptual network are models owned by the training step; the
functions here only combine their outputs.
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

import torch
import torch.nn.functional as F


class Posterior(Protocol):
    def kl(self) -> torch.Tensor: ...  # (B,)


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, perceptual: Optional[torch.Tensor], perceptual_weight: float
) -> torch.Tensor:
    """Per-pixel ``|x - x_hat| + (x - x_hat)^2 + w_p * LPIPS``: (B, C, H, W).

    ``perceptual`` is the per-image LPIPS distance (B, 1, 1, 1), broadcast over pixels.
    """
    diff = x - x_hat
    rec = diff.abs() + diff.pow(2)
    if perceptual is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * perceptual
    return rec


def nll_loss(rec: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Gaussian-style NLL with one learned log-variance: sum over pixels, mean over the batch."""
    nll = rec / torch.exp(logvar) + logvar  # (B, C, H, W)
    return nll.sum() / rec.shape[0]


def kl_loss(posterior: Posterior) -> torch.Tensor:
    return posterior.kl().mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_disc_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    disc_weight: float,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """``clamp(||dNLL/dW|| / (||dG/dW|| + eps), 0, max_weight) * disc_weight``, detached.

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer.
    Uses ``torch.autograd.grad`` on whatever graph the caller built (retained, so the caller may
    still backpropagate through it); no ``.grad`` is touched.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = torch.norm(nll_grad) / (torch.norm(g_grad) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


def disc_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """The GAN terms are off (0) before ``disc_start`` and ``factor`` from it on."""
    return factor if step >= disc_start else 0.0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # softplus(-r) = -log sigmoid(r), softplus(f) = -log(1 - sigmoid(f)): binary cross-entropy.
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str, factor: float
) -> torch.Tensor:
    """``factor * 0.5 * (real term + fake term)``; ``logits_fake`` must come from a detached x_hat."""
    if kind not in D_LOSSES:
        raise ValueError(f"disc_loss={kind!r} is not valid; expected one of {', '.join(D_LOSSES)}")
    return factor * D_LOSSES[kind](logits_real, logits_fake)


def autoencoder_loss(
    nll: torch.Tensor,
    kl: torch.Tensor,
    g_loss: Optional[torch.Tensor],
    *,
    kl_weight: float,
    d_weight: Union[torch.Tensor, float],
    disc_factor: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``nll + kl_weight * kl + d_weight * disc_factor * g_loss``, and its terms (detached).

    ``g_loss=None`` (the discriminator is not on yet) drops the GAN term.
    """
    total = nll + kl_weight * kl
    g_term = torch.zeros_like(nll) if g_loss is None else g_loss
    if g_loss is not None:
        total = total + d_weight * disc_factor * g_loss
    terms = {
        "loss": total.detach(),
        "nll": nll.detach(),
        "kl": kl.detach(),
        "g": g_term.detach(),
        "d_weight": torch.as_tensor(d_weight, dtype=nll.dtype, device=nll.device).detach(),
        # A device-side fill, not a host-to-device copy (which would synchronise).
        "disc_factor": torch.full((), float(disc_factor), dtype=nll.dtype, device=nll.device),
    }
    return total, terms
