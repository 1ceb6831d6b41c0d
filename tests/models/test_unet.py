"""Two-head conditional U-Net: shapes, determinism, errors, gradient flow, parameter counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS, ConfigError, UNetConfig
from radiodiff.diffusion.loss import constant_sde_loss
from radiodiff.models.condition import count_parameters
from radiodiff.models.unet import ConditionalUNet
from radiodiff.models.unet_blocks import FrequencyFilter

# Counted once with the reference presets, then fixed here: a change of architecture must be deliberate.
REFERENCE_CONDITION_PARAMETERS = 86_766_072
REFERENCE_UNET_PARAMETERS = 140_646_694  # without the condition encoder; 139,112,454 without the stem
TINY_TOTAL_PARAMETERS = 2_780_660


def tiny_unet(seed: int = 0, **overrides: object) -> ConditionalUNet:
    torch.manual_seed(seed)
    return ConditionalUNet(dataclasses.replace(UNET_PRESETS["tiny"], **overrides), CONDITION_PRESETS["tiny"])


def tiny_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    z_t = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.rand(batch, generator=g) * 0.99 + 0.01
    cond = torch.randn(batch, 3, 64, 64, generator=g)
    return z_t, t, cond


def test_tiny_shapes_and_determinism() -> None:
    z_t, t, cond = tiny_inputs()
    a, b = tiny_unet(seed=5).eval(), tiny_unet(seed=5).eval()
    with torch.no_grad():
        c_hat, eps_hat = a(z_t, t, cond)
        c_again, eps_again = b(z_t, t, cond)
    assert c_hat.shape == eps_hat.shape == (2, 3, 16, 16)
    assert torch.equal(c_hat, c_again) and torch.equal(eps_hat, eps_again)
    assert not torch.allclose(c_hat, eps_hat)  # two heads, not one output twice
    assert count_parameters(a) == TINY_TOTAL_PARAMETERS


def test_a_factor_2_layout_takes_a_latent_half_the_condition_and_every_pixel_of_it_counts() -> None:
    # A factor-2 VAE at 64x64 gives a 32x32 latent; condition.patch_size=2 puts the condition's first
    # feature (Swin stage and stem) at that size, and the levels at 32, 16, 8, 4.
    torch.manual_seed(0)
    model = ConditionalUNet(dataclasses.replace(UNET_PRESETS["tiny"], latent_size=32),
                            dataclasses.replace(CONDITION_PRESETS["tiny"], patch_size=2)).eval()
    assert [tuple(f.shape[-2:]) for f in model.condition_features(torch.zeros(1, 3, 64, 64))] == [
        (32, 32), (16, 16), (8, 8), (4, 4)]
    g = torch.Generator().manual_seed(1)
    z_t, t = torch.randn(1, 3, 32, 32, generator=g), torch.full((1,), 0.9)
    cond = -torch.ones(1, 3, 64, 64)
    moved = cond.clone()
    cond[0, 1, 10, 11], moved[0, 1, 11, 11] = 1.0, 1.0  # the transmitter one pixel apart: the same 2x2 cell
    with torch.no_grad():
        c_hat, eps_hat = model(z_t, t, cond)
        c_moved, _ = model(z_t, t, moved)
    assert c_hat.shape == eps_hat.shape == (1, 3, 32, 32)
    assert (c_hat - c_moved).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="stride-2 condition feature is \\(16, 16\\).*2x the latent"):
        model(z_t, t, cond[..., :32, :32])  # a condition of the latent's size (as with a factor-1 VAE)


def test_time_and_condition_change_the_output() -> None:
    z_t, t, cond = tiny_inputs()
    model = tiny_unet().eval()
    with torch.no_grad():
        base = model(z_t, t, cond)[0]
        other_t = model(z_t, t.flip(0), cond)[0]
        other_cond = model(z_t, t, cond.flip(0))[0]
    assert not torch.allclose(base, other_t)
    assert not torch.allclose(base, other_cond)


def test_wrong_latent_size_is_a_clear_error() -> None:
    model = tiny_unet().eval()
    with pytest.raises(ValueError, match="latent_size=16"):
        model(torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="stride-4 condition feature is \\(32, 32\\).*4x the latent"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="sized for a 8x8"):
        FrequencyFilter(4, 8)(torch.randn(1, 4, 4, 4))


def test_frequency_filter_matches_numpy() -> None:
    torch.manual_seed(0)
    filt = FrequencyFilter(2, 6)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w = filt.weight.detach().double().numpy()
    spectrum = np.fft.rfft2(x.numpy(), norm="ortho") * (w[..., 0] + 1j * w[..., 1])
    expected = x.numpy() + np.fft.irfft2(spectrum, s=(6, 6), norm="ortho")
    with torch.no_grad():
        out = filt(x.float()).double().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_gradients_reach_both_heads_and_the_condition_encoder() -> None:
    model = tiny_unet()
    z_t, t, cond = tiny_inputs()
    c_hat, eps_hat = model(z_t, t, cond)
    loss, _ = constant_sde_loss(c_hat, eps_hat, torch.zeros_like(c_hat), torch.zeros_like(eps_hat), t)
    loss.backward()
    for name in ("decoder_c", "decoder_eps", "cond_encoder", "time_embed", "encoder"):
        assert _grad_norm(getattr(model, name)) > 0, name
    assert model.decoder_c.filter.weight.grad.abs().sum() > 0
    # Every level of the encoder and of both heads fuses the condition densely and through tokens.
    for level in [*model.encoder, *model.decoder_c.levels, *model.decoder_eps.levels]:
        assert _grad_norm(level.fusion.dense) > 0 and _grad_norm(level.fusion.tokens) > 0
    # The stride-32 stage reaches the U-Net only through the level-3 fusions.
    assert _grad_norm(model.cond_encoder.layers[3]) > 0


def test_heads_are_separate() -> None:
    model = tiny_unet()
    z_t, t, cond = tiny_inputs()
    c_hat, _ = model(z_t, t, cond)
    c_hat.square().mean().backward()
    assert _grad_norm(model.decoder_c) > 0
    assert _grad_norm(model.decoder_eps) == 0


def test_checkpointing_gives_the_same_gradients() -> None:
    z_t, t, cond = tiny_inputs(batch=1)
    grads = []
    for flag in (False, True):
        model = tiny_unet(seed=9, grad_checkpointing=flag)
        c_hat, eps_hat = model(z_t, t, cond)
        (c_hat.square().mean() + eps_hat.abs().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_reference_parameter_counts_and_shapes() -> None:
    # The meta device gives shapes without allocating or computing: the reference model is 226M parameters.
    with torch.device("meta"):
        model = ConditionalUNet(UNET_PRESETS["reference"], CONDITION_PRESETS["swin_b"]).eval()
        c_hat, eps_hat = model(torch.randn(2, 3, 64, 64), torch.rand(2), torch.randn(2, 3, 256, 256))
    assert c_hat.shape == eps_hat.shape == (2, 3, 64, 64)
    assert [tuple(f.shape) for f in model.cond_encoder(torch.empty(1, 3, 256, 256, device="meta"))] == [
        (1, 128, 64, 64), (1, 256, 32, 32), (1, 512, 16, 16), (1, 1024, 8, 8)
    ]
    condition = count_parameters(model.cond_encoder)
    assert condition == REFERENCE_CONDITION_PARAMETERS
    assert count_parameters(model) - condition == REFERENCE_UNET_PARAMETERS


def test_config_validation_names_key() -> None:
    with pytest.raises(ConfigError, match="unet.latent_size"):
        UNetConfig(latent_size=60)
    with pytest.raises(ConfigError, match="unet.norm_groups"):
        UNetConfig(dim=12)
