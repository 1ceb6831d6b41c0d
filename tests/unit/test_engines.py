"""The DeepSpeed config generator, the learning-rate schedule, and the exact skipped update."""

from __future__ import annotations

import math

import pytest
import torch

from radiodiff.config import DeepSpeedConfig, TrainConfig
from radiodiff.train.engines import build_engine, deepspeed_config, lr_at, set_lr, skipped_update


def test_config_for_zero2_autocast_with_accumulation() -> None:
    train = TrainConfig(micro_batch=3, grad_accum=4, lr=1e-4, betas=[0.9, 0.99], weight_decay=0.01, grad_clip=1.0)
    config = deepspeed_config(train, DeepSpeedConfig(zero_stage=2, precision="autocast"), world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 8
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 2}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in config
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
        assert config["bf16"] == {"enabled": True} and config["data_types"] == {"grad_accum_dtype": "fp32"}
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
