"""Entry points radiodiff-train-vae and radiodiff-train-ldm.

One process on a laptop, or one per GPU under torchrun / srun + torchrun: the same code. A run
directory with committed checkpoints resumes from the newest one; exit code 75 means "stopped by a
preemption signal after saving a checkpoint".
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from radiodiff.cli import run_app
from radiodiff.config import TrainLdmConfig, TrainVaeConfig
from radiodiff.data.shards import ShardLoader
from radiodiff.runs.layout import CONFIG_FILE, read_meta
from radiodiff.train import checkpoint
from radiodiff.dist import DistInfo, print0, setup, teardown
from radiodiff.train.logger import NullLogger, RunLogger, new_run_id
from radiodiff.train.loop import LoopConfig, NonFiniteLossError, OnLog, RunState, Stage, train
from radiodiff.train.preemption import PreemptionFlag
from radiodiff.train.stages import build_ldm_stage, build_vae_stage

TrainConfigs = TrainVaeConfig | TrainLdmConfig


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(cfg: TrainConfigs, dist: DistInfo, seed: int) -> ShardLoader:
    return ShardLoader(cfg.data, "train", batch_size=cfg.train.micro_batch, rank=dist.rank,
                       world_size=dist.world_size, seed=seed)


def resume(stage: Stage, cfg: TrainConfigs, dist: DistInfo, folder: Path | None) -> tuple[RunState, ShardLoader]:
    """Restore the checkpoint ``folder`` if there is one; otherwise a fresh state."""
    if folder is None:
        seed_all(cfg.seed * 1000 + dist.rank + 1)  # training randomness differs across ranks
        return RunState(wandb_run_id=new_run_id()), make_loader(cfg, dist, cfg.seed)
    meta, rank_state = checkpoint.load(folder, stage.engines, dist)
    stage.restore(folder)
    state = RunState()
    state.load_state_dict(meta)
    state.resumed_from.append(state.step)
    if rank_state is not None:
        checkpoint.set_rng_state(rank_state["rng"])
        loader = make_loader(cfg, dist, cfg.seed)
        loader.load_state_dict(rank_state["loader"])
    else:
        # Another world size: weights and optimizer are exact; data order and RNG start anew,
        # seeded by the step so that they do not repeat the first steps' order.
        print0(f"resuming {meta['world_size']} -> {dist.world_size} ranks: data order restarts at step {state.step}")
        seed_all(cfg.seed * 1000 + dist.rank + 1 + state.step * 7919)
        loader = make_loader(cfg, dist, cfg.seed + state.step)
    print0(f"resumed from {folder} (step {state.step})")
    return state, loader


def run_training(cfg: TrainConfigs, build_stage: Callable[..., Stage], name: str, on_log: OnLog | None = None) -> int:
    """Train one stage in this process (one rank); returns the exit code. ``on_log``: see ``loop.train``."""
    flag = PreemptionFlag().install()  # from the start: a signal during set-up is not lost
    dist = setup()
    try:
        run_dir = Path(cfg.run_dir)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        folder = checkpoint.find_resume(run_dir)
        other_world = folder is not None and read_meta(folder)["world_size"] != dist.world_size
        seed_all(cfg.seed)  # identical initial weights on every rank
        stage = build_stage(cfg, dist, load_universal=other_world)
        state, loader = resume(stage, cfg, dist, folder)
        loop = LoopConfig(run_dir, cfg.train, cfg.deepspeed, name)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        logger = (RunLogger(run_dir, cfg.wandb, run_id=state.wandb_run_id, config=config, resume_step=state.step)
                  if dist.is_main else NullLogger())
        print0(f"{name}: {dist.world_size} rank(s) on {dist.device}, ZeRO {cfg.deepspeed.zero_stage}, "
               f"{cfg.deepspeed.precision}, steps {state.step} -> {cfg.train.max_steps}, run {run_dir}")
        try:
            return train(stage, loader, state, loop, dist, logger, flag, on_log)
        finally:
            logger.close()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        teardown()
        flag.uninstall()


def train_vae_command(cfg: TrainVaeConfig) -> int:
    return run_training(cfg, build_vae_stage, "vae")


def train_ldm_command(cfg: TrainLdmConfig) -> int:
    return run_training(cfg, build_ldm_stage, "ldm")


def train_vae() -> int:
    return run_app("train_vae", train_vae_command)


def train_ldm() -> int:
    return run_app("train_ldm", train_ldm_command)
