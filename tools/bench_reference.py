"""The reference implementation's VAE-GAN update, for `tools/bench.py models --stages vae-gan-ref`.

Its formulation, not its bugs: fp32, eager, plain modules and torch AdamW (no DeepSpeed), and the
two optimizers alternating over two passes of the training loop, each running the autoencoder's
forward on the batch (REFERENCE.md, section 2: the steps alternate through "gradient accumulation"
2). Pass 1: reconstruction + LPIPS + the discriminator on the reconstruction, the adaptive weight's
two gradient norms taken through the whole graph (``autograd.grad`` with ``retain_graph``), the
autoencoder's backward and step. Pass 2: the autoencoder's forward again, the discriminator on the
real and the (detached) reconstructed maps, its backward and step. One call = one update of each,
the same work as one call of our ``vae_gan_step``, so the two time per image side by side.
The losses are our loss functions (the same formulas as the reference's).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """As the reference computes it: both gradients through the full graph, which is kept."""
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    weight = torch.norm(nll_grad) / (torch.norm(g_grad) + ADAPTIVE_EPS)
    return torch.clamp(weight, 0.0, ADAPTIVE_MAX).detach() * disc_weight


def reference_update(generator: nn.Module, discriminator: nn.Module, perceptual: nn.Module | None, loss_cfg,
                     optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer]) -> Callable[[torch.Tensor], None]:
    """A function of a (B, 1, H, W) batch in [-1, 1] running one update of each network."""
    from radiodiff.losses import vae_gan

    ae_opt, d_opt = optimizers
    autoencoder, logvar = generator.autoencoder, generator.logvar

    def reconstruct(x: torch.Tensor):
        posterior = autoencoder.encode(x)
        return autoencoder.decode(posterior.sample()), posterior

    def update(x: torch.Tensor) -> None:
        # Pass 1 (optimizer_idx 0): the autoencoder.
        recon, posterior = reconstruct(x)
        lpips = perceptual(x, recon) if perceptual is not None else None
        nll = vae_gan.nll_loss(vae_gan.reconstruction_loss(x, recon, lpips, loss_cfg.perceptual_weight), logvar)
        g_loss = vae_gan.generator_loss(discriminator(recon))
        d_weight = adaptive_weight(nll, g_loss, autoencoder.last_layer.weight, loss_cfg.disc_weight)
        loss, _ = vae_gan.autoencoder_loss(nll, vae_gan.kl_loss(posterior), g_loss, kl_weight=loss_cfg.kl_weight,
                                           d_weight=d_weight, disc_factor=1.0)
        ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        ae_opt.step()
        # Pass 2 (optimizer_idx 1): the discriminator, after the autoencoder's forward again.
        recon, _ = reconstruct(x)
        d_loss = vae_gan.discriminator_loss(discriminator(x.detach()), discriminator(recon.detach()),
                                            loss_cfg.disc_loss, 1.0)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()

    return update
