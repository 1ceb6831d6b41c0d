"""Entry points radiodiff-train-vae and radiodiff-train-ldm.

One process on a laptop, or one per GPU under torchrun / srun + torchrun: the same code. A run
directory with committed checkpoints resumes from the newest one; exit code 75 means "stopped by a
preemption signal after saving a checkpoint".
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from radiodiff.cli import check_output_dir, run_app
from radiodiff.config import TrainLdmConfig, TrainVaeConfig
from radiodiff.data.shards import ShardLoader
from radiodiff.dist import (
    DistInfo,
    broadcast_object,
    check_launch,
    on_rank_0,
    print0,
    setup,
    teardown,
)
from radiodiff.precision import configure_math, resolve_precision
from radiodiff.runs.layout import read_meta
from radiodiff.train import checkpoint
from radiodiff.train.lock import RunDirLocked, RunLock
from radiodiff.train.logger import LogWriteError, NullLogger, RunLogger, new_run_id
from radiodiff.train.loop import (
    LoopConfig,
    NonFiniteLossError,
    OnLog,
    RunState,
    Stage,
    train,
)
from radiodiff.train.preemption import EXIT_PREEMPTED, PreemptionFlag
from radiodiff.train.run_dir import check_compatible, write_config
from radiodiff.train.stages import build_ldm_stage, build_vae_stage

TrainConfigs = TrainVaeConfig | TrainLdmConfig


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(cfg: TrainConfigs, dist: DistInfo) -> ShardLoader:
    """The train split's stream: from the latent cache when ``data.latents`` is set (stage 2 only;
    the same stream and positions as the image shards', so a resume may switch between them)."""
    return ShardLoader(cfg.data, "train", batch_size=cfg.train.micro_batch, rank=dist.rank,
                       world_size=dist.world_size, seed=cfg.seed, latents=cfg.data.latents is not None,
                       augment=True)


def resume(stage: Stage, cfg: TrainConfigs, dist: DistInfo, folder: Path | None) -> tuple[RunState, ShardLoader]:
    """Restore the checkpoint ``folder`` if there is one; otherwise a fresh state.

    The data position is global (the same on every rank), so the loader continues exactly at any
    world size; the per-sample draws are keyed by the samples' positions, not by the ranks' RNGs.
    """
    loader = make_loader(cfg, dist)
    if folder is None:
        seed_all(cfg.seed * 1000 + dist.rank + 1)  # training randomness differs across ranks
        return RunState(wandb_run_id=new_run_id()), loader
    meta, rank_state = checkpoint.load(folder, stage.engines, dist)
    stage.restore(folder)
    state = RunState()
    state.load_state_dict(meta)
    state.resumed_from.append(state.step)
    loader.load_state_dict(meta["loader"])
    if rank_state is not None:
        checkpoint.set_rng_state(rank_state["rng"])
    else:  # another world size: the ranks' own RNG streams (used by no per-sample draw) start anew
        print0(f"resuming {meta['world_size']} -> {dist.world_size} ranks at step {state.step}, "
               f"data position {loader.position}")
        seed_all(cfg.seed * 1000 + dist.rank + 1 + state.step * 7919)
    print0(f"resumed from {folder} (step {state.step})")
    return state, loader


def with_resolved_precision(cfg: TrainConfigs, dist: DistInfo) -> TrainConfigs:
    """``deepspeed.precision=auto`` resolved for this device on rank 0 and taken by every rank (the nodes of a
    mixed allocation must not train in different precisions); config.yaml then records what ran."""
    resolved = broadcast_object(resolve_precision(cfg.deepspeed.precision, dist.device) if dist.is_main else None)
    if resolved != cfg.deepspeed.precision:
        print0(f"deepspeed.precision={cfg.deepspeed.precision} -> {resolved} "
               f"({'bf16 native' if resolved == 'autocast' else 'no native bf16'} on {dist.device.type})")
    return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, precision=resolved))


def own_run_dir(run_dir: Path, cfg: TrainConfigs, dist: DistInfo) -> RunLock | None:
    """Rank 0 takes the run directory's lock for the whole process group; every rank learns the outcome."""
    lock, refusal = None, None
    if dist.is_main:
        lock = RunLock(run_dir, stale_s=cfg.train.lock_stale_s)
        try:
            check_output_dir("run_dir", str(run_dir))
            how = lock.acquire()
            if how != "acquired":
                print0(f"run_dir lock {how}")
        except (RunDirLocked, NotADirectoryError, PermissionError) as err:
            lock, refusal = None, str(err)
        except OSError as err:  # e.g. its disk is full
            lock, refusal = None, f"run_dir={run_dir}: cannot take its lock ({err})"
    refusal = broadcast_object(refusal)
    if refusal:
        raise RunDirLocked(refusal)
    return lock


def stop_file_exists(cfg: TrainConfigs, dist: DistInfo) -> bool:
    """Whether ``train.stop_file`` exists, as rank 0 sees it: every rank gets the same answer."""
    if cfg.train.stop_file is None:
        return False
    return bool(broadcast_object(dist.is_main and Path(cfg.train.stop_file).exists()))


def run_training(cfg: TrainConfigs, build_stage: Callable[..., Stage], name: str, on_log: OnLog | None = None) -> int:
    """Train one stage in this process (one rank); returns the exit code. ``on_log``: see ``loop.train``."""
    flag = PreemptionFlag(cfg.train.stop_file).install()  # from the start: a signal during set-up is not lost
    dist = setup(cfg.dist.timeout_minutes)
    configure_math(dist.device, cfg.train.deterministic)
    cfg = with_resolved_precision(cfg, dist)
    lock = None
    try:
        run_dir = Path(cfg.run_dir)
        grad_accum = cfg.train.grad_accum(dist.world_size)  # refuses a global batch that does not fit
        lock = own_run_dir(run_dir, cfg, dist)
        check_compatible(run_dir, cfg, name)
        if stop_file_exists(cfg, dist):  # not even set up: a stopping sweep's next trial ends at once
            print0(f"{name}: the stop file {cfg.train.stop_file} exists; nothing trained, exiting with "
                   f"{EXIT_PREEMPTED} (remove it to train)")
            return EXIT_PREEMPTED
        folder = checkpoint.find_resume(run_dir, dist)
        other_world = folder is not None and read_meta(folder)["world_size"] != dist.world_size
        seed_all(cfg.seed)  # identical initial weights on every rank
        stage = build_stage(cfg, dist, load_universal=other_world)
        state, loader = resume(stage, cfg, dist, folder)
        # Only now: a start refused above changed nothing in the run directory. Also the ranks' barrier.
        cause = on_rank_0(lambda: write_config(run_dir, cfg, state.step), dist)
        if cause is not None:
            raise OSError(f"writing the config of run_dir={run_dir} failed ({cause}); nothing was trained")
        loop = LoopConfig(run_dir, cfg.train, cfg.deepspeed, name, grad_accum, cfg.seed)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        logger = (RunLogger(run_dir, cfg.wandb, run_id=state.wandb_run_id, config=config, resume_step=state.step)
                  if dist.is_main else NullLogger())
        print0(f"{name}: {dist.world_size} rank(s) on {dist.device}, ZeRO {cfg.deepspeed.zero_stage}, "
               f"{cfg.deepspeed.precision}, steps {state.step} -> {cfg.train.max_steps}, run {run_dir}")
        try:
            return train(stage, loader, state, loop, dist, logger, flag, on_log)
        finally:
            logger.close()
    except (NonFiniteLossError, checkpoint.CheckpointSaveError, checkpoint.CheckpointLoadError, LogWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        teardown()
        flag.uninstall()


def train_vae_command(cfg: TrainVaeConfig) -> int:
    check_launch(dict(os.environ))  # the console script under srun; sweeps call run_training in Ray workers
    return run_training(cfg, build_vae_stage, "vae")


def train_ldm_command(cfg: TrainLdmConfig) -> int:
    check_launch(dict(os.environ))
    return run_training(cfg, build_ldm_stage, "ldm")


def train_vae() -> int:
    return run_app("train_vae", train_vae_command)


def train_ldm() -> int:
    return run_app("train_ldm", train_ldm_command)
