"""Constant-SDE forward process, weights, loss and sampler against hand / numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radiodiff.diffusion.loss import constant_sde_loss
from radiodiff.diffusion.process import forward_sample, sample_time, targets
from radiodiff.diffusion.sampler import posterior_step, sample, time_schedule
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
    expected = np.stack([(1 - tb) * z0[i].numpy() + math.sqrt(tb) * noise[i].numpy()
                         for i, tb in enumerate([0.25, 0.81])])
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


@pytest.mark.parametrize("estimate", ["c_head", "reference"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_sampler_with_oracle_returns_z0(steps: int, estimate: str) -> None:
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = sample(oracle_for(z0), (2, 3, 8, 8), steps=steps, eps=EPS, estimate=estimate,
                 generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, z0, atol=1e-5, rtol=0)


def test_sampler_calls_at_the_documented_times() -> None:
    seen: list[float] = []

    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(t[0].item())
        return torch.zeros_like(z_t), torch.zeros_like(z_t)

    sample(model, (1, 3, 4, 4), steps=4, eps=EPS, estimate="c_head", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(seen, [1.0, 0.75, 0.5, 0.25, EPS], rtol=1e-6)
    schedule = time_schedule(4, EPS)
    np.testing.assert_allclose([s for _, s in schedule], [0.25, 0.25, 0.25, 0.25 - EPS, EPS], rtol=1e-9)


def test_reference_sampler_one_step_by_hand() -> None:
    """estimate="reference", N=1 with a constant model: replay the two updates with numpy and the same random draws."""
    shape = (1, 3, 2, 2)
    c_const, e_const = 0.3, -0.2

    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(z_t, c_const), torch.full_like(z_t, e_const)

    out = sample(model, shape, steps=1, eps=EPS, estimate="reference", generator=torch.Generator().manual_seed(5))
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

    def draw(seed: int, estimate: str = "c_head") -> torch.Tensor:
        return sample(model, (2, 3, 4, 4), steps=5, eps=EPS, estimate=estimate,
                      generator=torch.Generator().manual_seed(seed))

    before = torch.random.get_rng_state()
    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, draw(7, "reference"))  # the heads of this model disagree


def test_posterior_step_is_the_gaussian_conditional_of_the_forward_process() -> None:
    """z_t = (1 - t) z0 + W_t with W a Brownian motion (Var W_t = t): the law of z_{t-s} given z_t and
    z0, from the joint covariance by the Gaussian conditioning formula in numpy, is the step's."""
    g = torch.Generator().manual_seed(9)
    z_t, z0, xi = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for t, s in ((1.0, 0.2), (0.6, 0.15), (0.3, 0.3 - EPS)):
        t_next = t - s
        cov = np.array([[t_next, t_next], [t_next, t]])  # Cov(W_{t-s}, W_t) = min(t - s, t)
        gain = cov[0, 1] / cov[1, 1]
        mean = (1 - t_next) * z0.numpy() + gain * (z_t.numpy() - (1 - t) * z0.numpy())
        std = math.sqrt(cov[0, 0] - gain * cov[1, 0])
        np.testing.assert_allclose(posterior_step(z_t, z0, t, s, xi).numpy(), mean + std * xi.numpy(),
                                   rtol=1e-12, atol=1e-12)
    assert torch.equal(posterior_step(z_t, z0, EPS, EPS, None), z0)  # the last call returns the estimate


def test_c_head_sampler_one_step_by_hand() -> None:
    """estimate="c_head", N=1: the call at t = 1 gives z0_hat = -C_hat(z_1), the bridge draws z_eps from
    it, and the result is -C_hat(z_eps); replayed in numpy with the same random draws."""
    shape = (1, 3, 2, 2)

    def model(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.5 * z_t + t.view(-1, 1, 1, 1), torch.full_like(z_t, 7.0)  # eps_hat is unused

    out = sample(model, shape, steps=1, eps=EPS, estimate="c_head", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(shape, generator=g).double().numpy()
    xi = torch.randn(shape, generator=g).double().numpy()
    z0_hat = -(0.5 * z1 + 1.0)
    z_eps = (1 - EPS) * z0_hat + EPS * z1 + math.sqrt((1 - EPS) * EPS) * xi  # t = 1: the bridge from z_1 = W_1
    np.testing.assert_allclose(out.numpy(), -(0.5 * z_eps + EPS), rtol=1e-5, atol=1e-6)


def test_sampler_rejects_an_unknown_estimate() -> None:
    with pytest.raises(ValueError, match="estimate='eps_head'"):
        sample(oracle_for(torch.zeros(1, 1, 2, 2)), (1, 1, 2, 2), steps=1, eps=EPS, estimate="eps_head",
               generator=torch.Generator())


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
    with pytest.raises(ConfigError, match="sampler.estimate='eps'"):
        SamplerConfig(estimate="eps")
