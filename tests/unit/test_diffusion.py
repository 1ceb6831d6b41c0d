"""Constant-SDE forward process, weights, loss and sampler against hand / numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radiodiff.diffusion.loss import constant_sde_loss
from radiodiff.diffusion.process import forward_sample, sample_time, targets
from radiodiff.diffusion.sampler import sample, time_schedule
from radiodiff.diffusion.weights import weight_c, weight_eps

EPS = 1e-4


def test_forward_at_t1_is_exactly_the_noise() -> None:
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    z_t = forward_sample(z0, torch.ones(3), noise)
    assert torch.equal(z_t, noise)


def test_forward_matches_numpy_per_example() -> None:
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0.25, 0.81])
    expected = np.stack([(1 - tb) * z0[i].numpy() + math.sqrt(tb) * noise[i].numpy() for i, tb in enumerate([0.25, 0.81])])
    np.testing.assert_allclose(forward_sample(z0, t, noise).numpy(), expected, rtol=1e-6, atol=1e-6)
    c, eps = targets(z0, noise)
    assert torch.equal(c, -z0) and torch.equal(eps, noise)


def test_sample_time_range_and_generator() -> None:
    t = sample_time(10_000, EPS, torch.Generator().manual_seed(0))
    assert t.min() >= EPS and t.max() < 1.0
    assert abs(t.mean().item() - 0.5) < 0.02
    assert torch.equal(t[:5], sample_time(10_000, EPS, torch.Generator().manual_seed(0))[:5])


@pytest.mark.parametrize("power", [1.0, 3.0])
def test_sample_time_power_follows_its_density(power: float) -> None:
    """density ~ t^p on [0, 1): CDF t^(p + 1); checked at a few quantiles and by the mean (p + 1) / (p + 2)."""
    t = sample_time(200_000, EPS, torch.Generator().manual_seed(0), power=power).double()
    assert t.min() >= EPS and t.max() < 1.0
    for x in (0.2, 0.5, 0.8, 0.95):
        assert abs((t < x).double().mean().item() - x ** (power + 1)) < 0.005
    assert abs(t.mean().item() - (power + 1) / (power + 2)) < 0.003


def oracle_for(z0: torch.Tensor):
    """A 'network' that returns the true C and the noise implied by z_t, t and the known z0."""

    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tb = t.view(-1, 1, 1, 1)
        true_eps = (z_t - (1 - tb) * z0) / tb.sqrt()
        return -z0, true_eps

    return model


def test_oracle_gives_exact_z0_hat() -> None:
    g = torch.Generator().manual_seed(2)
    z0, noise = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t_value in (EPS, 0.3, 1.0):
        t = torch.full((2,), t_value)
        z_t = forward_sample(z0, t, noise)
        c_hat, eps_hat = oracle_for(z0)(z_t, t)
        z0_hat = z_t - c_hat * t_value - math.sqrt(t_value) * eps_hat
        torch.testing.assert_close(z0_hat, z0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_sampler_with_oracle_returns_z0(steps: int) -> None:
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = sample(oracle_for(z0), (2, 3, 8, 8), steps=steps, eps=EPS, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, z0, atol=1e-5, rtol=0)


def test_sampler_calls_at_the_documented_times() -> None:
    seen: list[float] = []

    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(t[0].item())
        return torch.zeros_like(z_t), torch.zeros_like(z_t)

    sample(model, (1, 3, 4, 4), steps=4, eps=EPS, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(seen, [1.0, 0.75, 0.5, 0.25, EPS], rtol=1e-6)
    schedule = time_schedule(4, EPS)
    np.testing.assert_allclose([s for _, s in schedule], [0.25, 0.25, 0.25, 0.25 - EPS, EPS], rtol=1e-9)


def test_sampler_one_step_by_hand() -> None:
    """N=1 with a constant model: replay the two updates with numpy and the same random draws."""
    shape = (1, 3, 2, 2)
    c_const, e_const = 0.3, -0.2

    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(z_t, c_const), torch.full_like(z_t, e_const)

    out = sample(model, shape, steps=1, eps=EPS, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(shape, generator=g).double().numpy()
    xi = torch.randn(shape, generator=g).double().numpy()
    t, s = 1.0, 1.0 - EPS
    z0_hat = z - c_const * t - math.sqrt(t) * e_const
    z = z + z0_hat * s - s / math.sqrt(t) * e_const + math.sqrt(s * (t - s) / t) * xi
    t = s = EPS  # last call: s = t, no noise term
    z0_hat = z - c_const * t - math.sqrt(t) * e_const
    z = z + z0_hat * s - s / math.sqrt(t) * e_const
    np.testing.assert_allclose(out.numpy(), z, rtol=1e-6, atol=1e-6)
    # The documented closed form of the last step: z0_hat + eps * (C_hat + z0_hat).
    np.testing.assert_allclose(z, z0_hat + EPS * (c_const + z0_hat), rtol=1e-12, atol=1e-12)


def test_sampler_is_deterministic_and_leaves_global_rng_alone() -> None:
    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.1 * z_t, 0.5 * z_t

    before = torch.random.get_rng_state()
    a = sample(model, (2, 3, 4, 4), steps=5, eps=EPS, generator=torch.Generator().manual_seed(7))
    b = sample(model, (2, 3, 4, 4), steps=5, eps=EPS, generator=torch.Generator().manual_seed(7))
    c = sample(model, (2, 3, 4, 4), steps=5, eps=EPS, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_schedule_rejects_eps_not_below_step() -> None:
    with pytest.raises(ValueError, match="eps"):
        time_schedule(10, 0.1)


def test_weights_by_hand() -> None:
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(weight_c(t).numpy(), [2 * math.e, 2 * math.exp(0.75), 2.0], rtol=1e-12)
    np.testing.assert_allclose(weight_eps(t).numpy(), [1.0, math.exp(0.5), math.e], rtol=1e-12)
    assert torch.equal(weight_c(t, weighting=False), torch.ones(3, dtype=torch.float64))
    assert torch.equal(weight_eps(t, weighting=False), torch.ones(3, dtype=torch.float64))


def numpy_loss(c_hat, eps_hat, c, eps, t, weighting: bool) -> float:
    total = 0.0
    for i in range(len(t)):
        w_c = 2 * math.exp(1 - t[i]) if weighting else 1.0
        w_e = math.exp(math.sqrt(t[i])) if weighting else 1.0
        d_c, d_e = c_hat[i] - c[i], eps_hat[i] - eps[i]
        total += w_c * ((d_c**2).mean() + np.abs(d_c).mean()) + w_e * ((d_e**2).mean() + np.abs(d_e).mean())
    return 0.5 * total / len(t)


@pytest.mark.parametrize("weighting", [True, False])
def test_loss_matches_numpy(weighting: bool) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 2, 3, 3)) for _ in range(4)]
    t = np.array([0.1, 0.5, 0.9])
    total, terms = constant_sde_loss(*(torch.from_numpy(a) for a in arrays), torch.from_numpy(t), weighting)
    assert total.item() == pytest.approx(numpy_loss(*arrays, t, weighting), rel=1e-5)
    assert 0.5 * (terms["loss_c"] + terms["loss_eps"]).item() == pytest.approx(total.item(), rel=1e-6)


def test_loss_zero_for_perfect_prediction_and_has_gradient() -> None:
    c, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    c_hat = c.clone().requires_grad_()
    total, _ = constant_sde_loss(c_hat, eps, c, eps, torch.rand(2))
    assert total.item() == 0.0
    total2, _ = constant_sde_loss(c_hat + 1.0, eps, c, eps, torch.rand(2))
    total2.backward()
    assert c_hat.grad is not None and c_hat.grad.abs().sum() > 0


def test_config_validation_names_key() -> None:
    from radiodiff.config import ConfigError, DiffusionConfig, SamplerConfig

    with pytest.raises(ConfigError, match="diffusion.eps"):
        DiffusionConfig(eps=0.0)
    with pytest.raises(ConfigError, match="diffusion.scale_factor"):
        DiffusionConfig(scale_factor=-1.0)
    with pytest.raises(ConfigError, match="diffusion.time_power"):
        DiffusionConfig(time_power=-1.0)
    with pytest.raises(ConfigError, match="sampler.steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ConfigError, match="sampler.draws"):
        SamplerConfig(draws=0)
