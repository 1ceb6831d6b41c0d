"""DeepSpeed engines built from our typed config.

``deepspeed_config`` is the one place that turns our config into DeepSpeed's JSON; it is a pure
function and tested as such. The learning rate is not a DeepSpeed scheduler: ``lr_at(step)`` is
set on the optimizer before every update, so it follows our step counter exactly, also across a
resume. ``skipped_update`` turns an update into an exact no-op (the non-finite guard).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch

from radiodiff.config import DeepSpeedConfig, TrainConfig
from radiodiff.precision import require_resolved

NEVER_PRINT_STEPS = 2**31 - 1


def zero_config(ds: DeepSpeedConfig, *, on_gpu: bool) -> dict[str, Any]:
    """ZeRO's section: the stage and, from stage 1 on, the reduction buckets and their overlap."""
    config: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        overlap = on_gpu if ds.overlap_comm is None else ds.overlap_comm
        config.update(reduce_bucket_size=ds.reduce_bucket_size, allgather_bucket_size=ds.allgather_bucket_size,
                      overlap_comm=overlap, contiguous_gradients=ds.contiguous_gradients)
    if ds.zero_stage == 3:
        config["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, *, world_size: int,
                     load_universal: bool = False, on_gpu: bool = False) -> dict[str, Any]:
    """DeepSpeed's config for one engine: ZeRO stage, precision, batch geometry, clipping, AdamW.

    ``load_universal``: the engine will load a universal checkpoint (a resume at another world size).
    ``on_gpu``: the engine trains on GPUs (communication overlaps the backward there).
    """
    require_resolved(ds.precision)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum(world_size),
        "train_batch_size": train.global_batch,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero_config(ds, on_gpu=on_gpu),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                       "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "steps_per_print": NEVER_PRINT_STEPS,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        # bf16 parameters; gradients accumulate in fp32 so that micro-batches add up exactly.
        # check_grad_overflow off: DeepSpeed's own overflow test costs a collective and a host read
        # per engine and update; the training step already agrees on non-finite losses on all ranks
        # (steps.agree) in the micro-batch's one all-reduce, and skips such updates itself.
        config["bf16"] = {"enabled": True, "check_grad_overflow": False}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif ds.precision == "autocast":
        # fp32 master parameters, ops in bf16 under torch.autocast (works with BatchNorm buffers).
        # No "lower precision safe" modules: DeepSpeed would otherwise all-reduce the gradients of
        # every Conv/Linear in bf16, a silent loss of precision summed over many ranks.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then decay to ``min_lr``."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_decay == "constant":
        return train.lr
    span = max((train.lr_decay_steps or train.max_steps) - train.warmup_steps, 1)
    progress = min(max(step - train.warmup_steps, 0) / span, 1.0)
    if train.lr_decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif train.lr_decay == "linear":
        shape = 1.0 - progress
    else:  # poly
        shape = (1.0 - progress) ** train.lr_power
    return train.min_lr + (train.lr - train.min_lr) * shape


def build_engine(model: torch.nn.Module, train: TrainConfig, ds: DeepSpeedConfig, *, world_size: int,
                 load_universal: bool = False):
    """A DeepSpeed engine (with its AdamW) over the trainable parameters of ``model``."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(train, ds, world_size=world_size, load_universal=load_universal,
                              on_gpu=torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    if ds.precision == "bf16":
        _buffers_to_bf16(engine.module)
    return engine


def _buffers_to_bf16(module: torch.nn.Module) -> None:
    """DeepSpeed's bf16 mode casts parameters only; floating buffers (BatchNorm's running
    statistics) must follow, or normalisation layers fail on mixed dtypes. Parameters are left
    alone: they are views into DeepSpeed's flat buffers."""
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                submodule._buffers[name] = buffer.to(torch.bfloat16)


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrappers."""
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _clone_state(state: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


@contextlib.contextmanager
def skipped_update(engine) -> Iterator[None]:
    """Make the next ``engine.step()`` at an accumulation boundary change nothing.

    DeepSpeed has no "skip this update" for bf16/fp32 (only fp16 loss scaling skips), and its
    counters and collectives must still run in step on every rank. So the step runs with lr 0,
    which leaves the parameters exactly as they are (AdamW's decoupled weight decay is scaled by
    the lr too; the accumulated gradients are finite because bad micro-batches contribute zero),
    and this rank's optimizer state (moments, step counts) is put back afterwards.
    """
    base = _base_optimizer(engine)
    saved_lrs = [g["lr"] for g in base.param_groups]
    saved_state = {p: _clone_state(state) for p, state in base.state.items()}
    for group in base.param_groups:
        group["lr"] = 0.0
    try:
        yield
    finally:
        for group, lr in zip(base.param_groups, saved_lrs):
            group["lr"] = lr
        for p in list(base.state):
            if p in saved_state:
                base.state[p] = saved_state[p]
            else:  # state created lazily by this (first) step
                del base.state[p]
