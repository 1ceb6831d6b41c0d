"""Run under torchrun by test_gradient_averaging: one real VAE-GAN step on each rank with different
data, then every rank's parameters are gathered and compared. Prints one JSON line on rank 0."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as torch_dist

from radiodiff.cli import compose
from radiodiff.data.shards import ShardLoader
from radiodiff.dist import setup, teardown
from radiodiff.train.main import seed_all, with_resolved_precision
from radiodiff.train.stages import build_vae_stage
from radiodiff.train.steps import StepContext


def flat_parameters(stage) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for e in stage.engines.values() for p in e.module.parameters()])


def main(overrides: list[str]) -> None:
    cfg = compose("train_vae", overrides)
    dist = setup()
    cfg = with_resolved_precision(cfg, dist)
    seed_all(cfg.seed)
    stage = build_vae_stage(cfg, dist)
    seed_all(1000 + dist.rank)
    batch = next(iter(ShardLoader(cfg.data, "train", batch_size=cfg.train.micro_batch, rank=dist.rank,
                                  world_size=dist.world_size)))
    before = flat_parameters(stage)
    stage.step_fn(stage.models, batch, StepContext(step=0, device=dist.device, precision=cfg.deepspeed.precision))
    after = flat_parameters(stage)
    gathered: list = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, {"keys": batch["key"], "after": after})
    if dist.is_main:
        print(json.dumps({
            "keys": [g["keys"] for g in gathered],
            "changed": bool((after != before).any()),
            "identical": all(torch.equal(gathered[0]["after"], g["after"]) for g in gathered),
        }))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
