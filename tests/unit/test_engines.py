"""The DeepSpeed config generator, the learning-rate schedule, and the exact skipped update."""

from __future__ import annotations

import math

import pytest
import torch

from radiodiff.config import DeepSpeedConfig, TrainConfig
from radiodiff.train.engines import build_engine, deepspeed_config, lr_at, set_lr, skipped_update


def test_config_for_zero2_autocast_with_accumulation() -> None:
    train = TrainConfig(global_batch=96, micro_batch=3, lr=1e-4, betas=[0.9, 0.99], weight_decay=0.01, grad_clip=1.0)
    config = deepspeed_config(train, DeepSpeedConfig(zero_stage=2, precision="autocast"), world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 8
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50_000_000,
                                           "allgather_bucket_size": 50_000_000, "overlap_comm": False,
                                           "contiguous_gradients": True}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in config
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.99], "eps": 1e-8,
                                                               "weight_decay": 0.01, "torch_adam": True}}
    assert "checkpoint" not in config


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_config_precision_and_stage(precision: str, stage: int) -> None:
    config = deepspeed_config(TrainConfig(), DeepSpeedConfig(zero_stage=stage, precision=precision), world_size=1,
                              load_universal=True)
    assert config["zero_optimization"]["stage"] == stage
    assert ("bf16" in config) == (precision == "bf16") and "torch_autocast" not in config
    if precision == "bf16":
        assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["checkpoint"] == {"load_universal": True}


def test_lr_schedules_by_hand() -> None:
    cos = TrainConfig(max_steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10, lr_decay="cosine")
    assert lr_at(0, cos) == pytest.approx(1e-4) and lr_at(9, cos) == pytest.approx(1e-3)
    assert lr_at(55, cos) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # halfway through the decay
    assert lr_at(100, cos) == pytest.approx(1e-5) and lr_at(500, cos) == pytest.approx(1e-5)
    lin = TrainConfig(max_steps=10, lr=1.0, min_lr=0.0, lr_decay="linear")
    assert [lr_at(s, lin) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    poly = TrainConfig(max_steps=10, lr=1.0, min_lr=0.1, lr_decay="poly", lr_power=0.96)
    assert lr_at(5, poly) == pytest.approx(0.1 + 0.9 * 0.5**0.96)
    const = TrainConfig(lr=3e-4, min_lr=1e-5, lr_decay="constant")
    assert lr_at(12345, const) == 3e-4
    horizon = TrainConfig(max_steps=4, lr=1.0, min_lr=0.0, lr_decay="cosine", lr_decay_steps=8)
    assert lr_at(2, horizon) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_skipped_update_changes_nothing(world_of_one, zero_stage: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    train = TrainConfig(micro_batch=2, lr=1e-2, min_lr=0.0, weight_decay=0.1)
    engine = build_engine(model, train, DeepSpeedConfig(zero_stage=zero_stage, precision="fp32"), world_size=1)

    def update(skip: bool) -> None:
        loss = engine(torch.randn(2, 4)).square().mean()
        engine.backward(loss * 0.0 if skip else loss)
        if skip:
            with skipped_update(engine):
                engine.step()
        else:
            engine.step()

    update(False)  # creates the optimizer state
    params = [p.detach().clone() for p in engine.module.parameters()]
    state = {k: v.clone() for s in engine.optimizer.state_dict()["state"].values() if isinstance(s, dict)
             for k, v in s.items() if torch.is_tensor(v)} if zero_stage == 0 else None
    lr = engine.optimizer.param_groups[0]["lr"]
    update(True)
    assert all(torch.equal(a, b) for a, b in zip(params, engine.module.parameters()))
    assert engine.optimizer.param_groups[0]["lr"] == lr
    if state is not None:
        after = {k: v for s in engine.optimizer.state_dict()["state"].values() if isinstance(s, dict)
                 for k, v in s.items() if torch.is_tensor(v)}
        assert all(torch.equal(state[k], after[k]) for k in state)  # moments and step counts restored
    set_lr(engine, 1e-2)
    update(False)
    assert any(not torch.equal(a, b) for a, b in zip(params, engine.module.parameters()))


@pytest.mark.parametrize("world_size, micro_batch, accum", [(1, 16, 8), (2, 16, 4), (8, 16, 1), (32, 4, 1), (4, 2, 16)])
def test_grad_accum_is_derived_from_the_global_batch(world_size: int, micro_batch: int, accum: int) -> None:
    train = TrainConfig(global_batch=128, micro_batch=micro_batch)
    assert train.grad_accum(world_size) == accum
    assert micro_batch * accum * world_size == 128


def test_a_global_batch_that_does_not_fit_says_what_works() -> None:
    from radiodiff.config import ConfigError

    with pytest.raises(ConfigError, match=r"on 32 rank\(s\) use train.micro_batch in \[1, 2, 4\]"):
        TrainConfig(global_batch=128, micro_batch=16).grad_accum(32)
    with pytest.raises(ConfigError, match="smaller than the number of ranks.*multiple of 32.*scale"):
        TrainConfig(global_batch=2, micro_batch=2).grad_accum(32)
    with pytest.raises(ConfigError, match=r"use train.micro_batch in \[1, 2, 3, 6\]"):
        TrainConfig(global_batch=12, micro_batch=4).grad_accum(2)


def test_autocast_engines_reduce_gradients_in_fp32(world_of_one) -> None:
    """DeepSpeed tags Conv/Linear parameters of a torch_autocast engine with a bf16 communication
    dtype unless its lower-precision-safe list is emptied; ours is."""
    from deepspeed.runtime.torch_autocast import get_all_comm_dtypes

    module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    module(torch.zeros(1, 1, 8, 8))
    engine = build_engine(module, TrainConfig(micro_batch=1, global_batch=1),
                          DeepSpeedConfig(zero_stage=2, precision="autocast"), world_size=1)
    assert engine.torch_autocast_enabled()
    assert get_all_comm_dtypes(engine.module.parameters()) == {torch.float32}


def test_plain_srun_without_torchrun_is_refused() -> None:
    from radiodiff.dist import LaunchError, check_launch

    with pytest.raises(LaunchError, match="SLURM_NTASKS=8 but RANK is not set"):
        check_launch({"SLURM_NTASKS": "8"})
    check_launch({"SLURM_NTASKS": "8", "RANK": "3"})
    check_launch({"SLURM_NTASKS": "1"})
    check_launch({})


def test_communication_settings() -> None:
    ds = DeepSpeedConfig(zero_stage=2, precision="fp32", reduce_bucket_size=10**7)
    on_gpu = deepspeed_config(TrainConfig(), ds, world_size=1, on_gpu=True)["zero_optimization"]
    assert on_gpu["overlap_comm"] is True and on_gpu["reduce_bucket_size"] == 10**7
    forced = DeepSpeedConfig(zero_stage=1, precision="fp32", overlap_comm=False)
    on_gpu = deepspeed_config(TrainConfig(), forced, world_size=1, on_gpu=True)
    assert on_gpu["zero_optimization"]["overlap_comm"] is False
    stage_0 = deepspeed_config(TrainConfig(), DeepSpeedConfig(zero_stage=0, precision="fp32"), world_size=1)
    assert stage_0["zero_optimization"] == {"stage": 0}
