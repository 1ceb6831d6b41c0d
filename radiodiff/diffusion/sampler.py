"""N-step bridge sampler of the constant SDE, from z_1 ~ N(0, I) to z_0.

Times: N uniform steps of size 1/N from t = 1, with the last one split at ``eps`` so that the network
is never called at t = 0 (its time embedding takes log t):

    t_0 = 1, t_1 = 1 - 1/N, ..., t_{N-1} = 1/N, t_N = eps      (N + 1 network calls)

At a time t with step s to the next time (s = t - t_next; s = t at the last call):

    (C_hat, eps_hat) = model(z_t, t)
    z0_hat = z_t - C_hat * t - sqrt(t) * eps_hat,   C = -z0_hat
    z_{t-s} = z_t - C * s - (s / sqrt(t)) * eps_hat + sqrt(s (t - s) / t) * xi,   xi ~ N(0, I)

How eps enters the end: the last call is made at t = eps with s = t = eps. Its noise coefficient
sqrt(s (t - s) / t) is exactly 0, so no xi is drawn, and the update becomes
    z_0 = z_eps + eps * z0_hat - sqrt(eps) * eps_hat = z0_hat + eps * (C_hat + z0_hat),
i.e. the network's clean estimate at t = eps plus eps times the disagreement of the two heads
(C_hat should equal -z0_hat). We keep the reference's update rather than returning z0_hat, so that
results match it; the two differ by O(eps) = 1e-4 times that disagreement, and agree exactly for a
consistent (e.g. oracle) network.
With N = 1 the calls are at t = 1 (step 1 - eps, with noise) and t = eps.

That is ``estimate="reference"``. The default, ``estimate="c_head"``, takes the C head alone as the
clean estimate, z0_hat = -C_hat (at t = 1 the C head is a direct regressor of z0), and draws z_{t-s}
from the forward process's exact posterior given z_t and that z0_hat. z_t - (1 - t) z0 is a
Brownian motion at time t, so the posterior is a Brownian bridge:

    z_{t-s} = (1 - (t - s)) z0_hat + ((t - s) / t) (z_t - (1 - t) z0_hat) + sqrt(s (t - s) / t) * xi

with the same noise variance as the reference's step (the two agree exactly for a consistent
network, C_hat = -z0_hat); the last call (s = t) returns z0_hat = -C_hat. The reference's update
mixes the two heads' estimates, and where the heads disagree (a trained network's do at middle t)
that costs PSNR at more than one step: measured in ``radiodiff/models/README.md``.

Randomness comes only from the given generator: z_1 first, then one xi per non-final step.
"""

from __future__ import annotations

from typing import Callable

import torch

from radiodiff.config import SAMPLER_ESTIMATES

Model = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def time_schedule(steps: int, eps: float) -> list[tuple[float, float]]:
    """[(t, s)] for each network call: the time and the step to the next time (s = t at the end)."""
    if steps < 1:
        raise ValueError(f"sampler steps={steps} must be >= 1")
    if not 0.0 < eps < 1.0 / steps:
        raise ValueError(f"eps={eps} must be in (0, 1/steps={1.0 / steps}) so that every step is positive")
    # Computed from k / N rather than by repeated subtraction, so no rounding accumulates.
    times = [1.0 - k / steps for k in range(steps)] + [eps]
    return [(t, t - t_next) for t, t_next in zip(times, times[1:])] + [(eps, eps)]


def bridge_step(
    z_t: torch.Tensor, c_hat: torch.Tensor, eps_hat: torch.Tensor, t: float, s: float, xi: torch.Tensor | None
) -> torch.Tensor:
    """One update z_t -> z_{t-s}; ``xi`` is None exactly when s == t (the last step)."""
    z0_hat = z_t - c_hat * t - (t**0.5) * eps_hat
    c = -z0_hat
    z_next = z_t - c * s - (s / t**0.5) * eps_hat
    if xi is not None:
        z_next = z_next + (s * (t - s) / t) ** 0.5 * xi
    return z_next


def posterior_step(
    z_t: torch.Tensor, z0_hat: torch.Tensor, t: float, s: float, xi: torch.Tensor | None
) -> torch.Tensor:
    """One draw z_{t-s} ~ q(z_{t-s} | z_t, z0 = z0_hat); ``xi`` is None exactly when s == t (returns z0_hat)."""
    if xi is None:
        return z0_hat
    t_next = t - s
    mean = (1.0 - t_next) * z0_hat + (t_next / t) * (z_t - (1.0 - t) * z0_hat)
    return mean + (s * t_next / t) ** 0.5 * xi


@torch.no_grad()
def sample(
    model: Model,
    shape: tuple[int, ...],
    *,
    steps: int,
    eps: float,
    estimate: str,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw z_0 of ``shape`` (B, C, h, w) on the generator's device.

    ``model(z_t, t)`` takes t as a (B,) tensor and returns (C_hat, eps_hat); the caller binds the
    condition. ``estimate``: "c_head" or "reference" (module docstring). The result is the scaled
    latent: divide by the scale factor before decoding.
    """
    if estimate not in SAMPLER_ESTIMATES:
        raise ValueError(f"sampler estimate={estimate!r}: expected one of {', '.join(SAMPLER_ESTIMATES)}")
    device = generator.device
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)  # z_1
    schedule = time_schedule(steps, eps)
    for i, (t, s) in enumerate(schedule):
        t_batch = torch.full((shape[0],), t, device=device, dtype=dtype)
        c_hat, eps_hat = model(z, t_batch)
        last = i == len(schedule) - 1
        xi = None if last else torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if estimate == "c_head":
            z = posterior_step(z, -c_hat.to(dtype), t, s, xi)
        else:
            z = bridge_step(z, c_hat.to(dtype), eps_hat.to(dtype), t, s, xi)
    return z
