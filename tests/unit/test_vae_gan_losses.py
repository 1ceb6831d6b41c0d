"""VAE-GAN loss functions against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radiodiff.config import ConfigError, VaeGanLossConfig, autoencoder_preset, discriminator_preset
from radiodiff.losses import vae_gan as L
from radiodiff.models.autoencoder import AutoencoderKL, DiagonalGaussian
from radiodiff.models.discriminator import NLayerDiscriminator


def test_reconstruction_loss_by_hand() -> None:
    x = torch.tensor([0.5, -1.0, 0.0, 0.2]).view(2, 1, 1, 2)
    x_hat = torch.tensor([0.0, 1.0, 0.0, -0.2]).view(2, 1, 1, 2)
    perceptual = torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)
    # |d| + d^2: d = 0.5 -> 0.75, d = -2 -> 6, d = 0 -> 0, d = 0.4 -> 0.56; plus 2 * LPIPS per image.
    want = torch.tensor([0.75 + 0.2, 6.0 + 0.2, 0.0 + 0.6, 0.56 + 0.6]).view(2, 1, 1, 2)
    torch.testing.assert_close(L.reconstruction_loss(x, x_hat, perceptual, 2.0), want)
    torch.testing.assert_close(
        L.reconstruction_loss(x, x_hat, None, 2.0), torch.tensor([0.75, 6.0, 0.0, 0.56]).view(2, 1, 1, 2)
    )


def test_nll_loss_by_hand() -> None:
    rec = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).view(2, 1, 1, 3)
    logvar = torch.tensor([math.log(2.0)])
    # sum(rec / 2 + log 2) / 2 = (21 / 2 + 6 log 2) / 2
    want = (21.0 / 2.0 + 6.0 * math.log(2.0)) / 2.0
    assert L.nll_loss(rec, logvar).item() == pytest.approx(want, rel=1e-6)
    assert L.nll_loss(rec, torch.zeros(1)).item() == pytest.approx(21.0 / 2.0)


def test_kl_loss_by_hand() -> None:
    # Example 0: mean (1, 0), logvar (0, log 2) -> 0.5 * ((1 + 1 - 1 - 0) + (0 + 2 - 1 - log 2)).
    # Example 1: mean (0, -2), logvar (0, 0)      -> 0.5 * (0 + 4).
    mean = torch.tensor([[1.0, 0.0], [0.0, -2.0]]).view(2, 2, 1, 1)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]]).view(2, 2, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    kl0 = 0.5 * (1.0 + 1.0 - math.log(2.0))
    kl1 = 0.5 * 4.0
    torch.testing.assert_close(posterior.kl(), torch.tensor([kl0, kl1]))
    assert L.kl_loss(posterior).item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)


def test_generator_loss() -> None:
    assert L.generator_loss(torch.tensor([[1.0, -3.0], [2.0, 4.0]])).item() == pytest.approx(-1.0)


def test_adaptive_weight_against_hand_gradients() -> None:
    w = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0]]))
    f = torch.tensor([[1.0], [2.0], [0.5]])
    out = w @ f  # (1, 1) = 0.5 - 2 + 1 = -0.5
    nll = (out**2).sum()  # d/dw = 2 * out * f^T = -f^T
    g = (3.0 * out).sum()  # d/dw = 3 f^T
    fn = f.numpy().ravel()
    want = np.linalg.norm(-fn) / (np.linalg.norm(3 * fn) + 1e-4) * 0.5
    got = L.adaptive_disc_weight(nll, g, w, disc_weight=0.5)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert not got.requires_grad
    assert w.grad is None
    nll.backward()  # the caller's graph is still usable
    torch.testing.assert_close(w.grad, -f.T)


def test_adaptive_weight_is_clamped() -> None:
    w = torch.nn.Parameter(torch.ones(1, 2))
    out = (w * torch.tensor([[3.0, 4.0]])).sum()
    g = 0.0 * out  # zero gradient: 5 / 1e-4 = 5e4, clamped to 1e4
    assert L.adaptive_disc_weight(out, g, w, disc_weight=2.0).item() == pytest.approx(2e4)


def test_disc_factor_boundary() -> None:
    assert L.disc_factor(50000, 50001) == 0.0
    assert L.disc_factor(50001, 50001) == 1.0
    assert L.disc_factor(60000, 50001, factor=0.5) == 0.5


def test_hinge_and_vanilla_by_hand() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = (0, .5, 2), mean 5/6; relu(1 + fake) = (0, 1, 2.5), mean 7/6; half of 2 = 1.
    assert L.hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert L.discriminator_loss(real, fake, "hinge", 0.5).item() == pytest.approx(0.5)
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    want = 0.5 * (softplus(-real.numpy()).mean() + softplus(fake.numpy()).mean())
    assert L.vanilla_d_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert L.discriminator_loss(real, fake, "vanilla", 1.0).item() == pytest.approx(want, rel=1e-6)
    assert L.discriminator_loss(real, fake, "hinge", 0.0).item() == 0.0
    with pytest.raises(ValueError, match="disc_loss"):
        L.discriminator_loss(real, fake, "wgan", 1.0)


def test_autoencoder_loss_by_hand() -> None:
    nll, kl, g = torch.tensor(10.0), torch.tensor(2000.0), torch.tensor(-0.5)
    total, terms = L.autoencoder_loss(nll, kl, g, kl_weight=1e-3, d_weight=torch.tensor(4.0), disc_factor=1.0)
    assert total.item() == pytest.approx(10.0 + 2.0 - 2.0)
    assert terms["d_weight"].item() == 4.0 and terms["g"].item() == -0.5
    total_off, _ = L.autoencoder_loss(nll, kl, g, kl_weight=1e-3, d_weight=4.0, disc_factor=0.0)
    assert total_off.item() == pytest.approx(12.0)
    total_none, terms_none = L.autoencoder_loss(nll, kl, None, kl_weight=1e-3, d_weight=0.0, disc_factor=0.0)
    assert total_none.item() == pytest.approx(12.0) and terms_none["g"].item() == 0.0


def test_adaptive_weight_on_recomputed_last_layer_matches_full_graph() -> None:
    # The DeepSpeed-safe path: recompute only the last conv from its detached input.
    torch.manual_seed(0)
    ae = AutoencoderKL(autoencoder_preset("tiny"))
    disc = NLayerDiscriminator(discriminator_preset("tiny")).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    posterior = ae.encode(x)
    recon, feats = ae.decode(posterior.mode(), return_features=True)

    def weight(out: torch.Tensor) -> torch.Tensor:
        nll = L.nll_loss(L.reconstruction_loss(x, out, None, 0.0), torch.zeros(1))
        return L.adaptive_disc_weight(nll, L.generator_loss(disc(out)), ae.last_layer.weight, 0.5)

    small = ae.last_layer(feats.detach())
    torch.testing.assert_close(small, recon)
    torch.testing.assert_close(weight(small), weight(recon), rtol=1e-5, atol=0)


def test_loss_config_validation() -> None:
    with pytest.raises(ConfigError, match="loss.disc_loss"):
        VaeGanLossConfig(disc_loss="wgan")
    with pytest.raises(ConfigError, match="loss.kl_weight"):
        VaeGanLossConfig(kl_weight=-1.0)
