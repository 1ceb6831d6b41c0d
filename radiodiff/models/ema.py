"""Exponential moving average of a model's parameters, for evaluation and sampling.

Schedule (given the optimizer step after which ``update`` is called):
- step < start_step: the EMA copies the weights, so it starts from a trained model, not from init;
- otherwise, every ``update_every`` steps: ema = d * ema + (1 - d) * param, where the n-th average
  (n = 1, 2, ...) uses d = beta, or with ``warmup_power`` p: d = min(beta, 1 - (1 + n) ** -p).
  Without warmup, an EMA started late in a short run is mostly the weights it copied at start_step
  (0.999 ** 350 = 0.70 after 350 averages); with p = 2/3 the decay grows 0.37, 0.52, ... 0.99 (n =
  1,000) and the average follows the recent weights. ``num_averaged`` is saved, so resume is exact.
Buffers (norm statistics, fixed frequencies) are copied at every call: averaging them means nothing.
The average is kept in fp32 whatever the parameters' dtype (bf16 cannot hold 0.001 steps), and
updated with foreach operations: a few kernels for all tensors instead of one per tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from radiodiff.config import EMAConfig


class EMA:
    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.num_averaged = 0  # updates that averaged (not copied); for logging and checks

    @property
    def started(self) -> bool:
        """Whether the EMA has averaged (before that it is a copy of the trained weights)."""
        return self.num_averaged > 0

    def decay(self, n: int) -> float:
        """The decay of the n-th average (n >= 1)."""
        if self.cfg.warmup_power is None:
            return self.cfg.beta
        return min(self.cfg.beta, 1.0 - (1.0 + n) ** -self.cfg.warmup_power)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call once after optimizer step ``step`` (counting from 1 or 0, as the loop does)."""
        named = list(model.named_parameters())
        current = [p.detach().float() for _, p in named]  # the parameters themselves when already fp32
        averaged = [self.params[name] for name, _ in named]
        if step < self.cfg.start_step:
            torch._foreach_copy_(averaged, current)
        elif step % self.cfg.update_every == 0:
            self.num_averaged += 1
            # lerp: ema + (1 - d) * (p - ema) = d * ema + (1 - d) * p
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay(self.num_averaged))
        for name, b in model.named_buffers():
            self.buffers[name].copy_(b.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (and buffers) into ``model``."""
        for name, p in model.named_parameters():
            p.copy_(self.params[name].to(p.dtype))
        for name, b in model.named_buffers():
            b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swapped_into(model):`` evaluates with EMA weights; the trained ones come back after."""
        tensors = [*model.parameters(), *model.buffers()]
        saved = [t.detach().clone() for t in tensors]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, value in zip(tensors, saved):
                    t.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.clone() for k, v in self.params.items()},
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
            "num_averaged": self.num_averaged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind in ("params", "buffers"):
            own, other = getattr(self, kind), state[kind]
            if set(own) != set(other):
                diff = sorted(set(own) ^ set(other))
                raise ValueError(f"EMA state does not match the model; differing {kind}: {diff[:5]}")
            for name, value in other.items():
                own[name].copy_(value)
        self.num_averaged = int(state["num_averaged"])
