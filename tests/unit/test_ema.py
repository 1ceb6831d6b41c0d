"""EMA schedule and values against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radiodiff.config import ConfigError, EMAConfig
from radiodiff.models.ema import EMA


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 10.0]))
        self.register_buffer("count", torch.tensor(0.0))


def set_weights(model: Tiny, values: list[float], count: float) -> None:
    with torch.no_grad():
        model.w.copy_(torch.tensor(values))
        model.count.fill_(count)


def test_copies_before_start_then_averages_every_n() -> None:
    model = Tiny()
    ema = EMA(model, EMAConfig(beta=0.5, start_step=2, update_every=2))
    set_weights(model, [1.0, 1.0], 1)
    ema.update(model, step=1)  # before start: copy
    assert ema.params["w"].tolist() == [1.0, 1.0]
    set_weights(model, [3.0, 5.0], 2)
    ema.update(model, step=2)  # 0.5 * [1, 1] + 0.5 * [3, 5]
    assert ema.params["w"].tolist() == [2.0, 3.0]
    set_weights(model, [100.0, 100.0], 3)
    ema.update(model, step=3)  # not a multiple of 2: params unchanged, buffers copied
    assert ema.params["w"].tolist() == [2.0, 3.0]
    assert ema.buffers["count"].item() == 3.0
    set_weights(model, [6.0, 7.0], 4)
    ema.update(model, step=4)  # 0.5 * [2, 3] + 0.5 * [6, 7]
    assert ema.params["w"].tolist() == [4.0, 5.0]
    assert ema.num_averaged == 2


def test_beta_0999_by_hand() -> None:
    model = Tiny()
    ema = EMA(model, EMAConfig(beta=0.999, start_step=0, update_every=1))
    expected = [0.0, 10.0]
    for step in range(3):
        set_weights(model, [float(step + 1), -1.0], 0)
        ema.update(model, step)
        expected = [0.999 * e + 0.001 * p for e, p in zip(expected, [step + 1, -1.0])]
    torch.testing.assert_close(ema.params["w"], torch.tensor(expected), rtol=0, atol=1e-6)


def test_warmup_decays_by_hand() -> None:
    """With power 2/3 the n-th average's decay is 1 - (1 + n) ** (-2/3): 0.75 at n = 7, 8/9 at n = 26,
    capped at beta; the weights follow ema = d * ema + (1 - d) * p with those decays."""
    cfg = EMAConfig(beta=0.95, start_step=3, update_every=1, warmup_power=2 / 3)
    model = Tiny()
    ema = EMA(model, cfg)
    assert ema.decay(7) == pytest.approx(0.75, abs=1e-12)
    assert ema.decay(26) == pytest.approx(8 / 9, abs=1e-12)
    assert ema.decay(1000) == 0.95  # 1 - 1001 ** (-2/3) = 0.99 is above beta
    assert EMA(model, EMAConfig(beta=0.95)).decay(7) == 0.95  # no warmup: beta from the first average
    expected = None
    for step in range(1, 40):
        set_weights(model, [float(step), 2.0 * step], 0)
        ema.update(model, step)
        if step < 3:
            expected = [float(step), 2.0 * step]  # copied before start_step
        else:
            n = step - 2
            d = min(0.95, 1 - (1 + n) ** (-2 / 3))
            expected = [d * e + (1 - d) * p for e, p in zip(expected, [step, 2.0 * step])]
    assert ema.num_averaged == 37
    torch.testing.assert_close(ema.params["w"], torch.tensor(expected), rtol=1e-6, atol=1e-5)
    # A constant 0.95 from the first average would lag further behind the latest weights (39, 78).
    assert 39.0 - ema.params["w"][0].item() < 39.0 - 20.0


def test_warmup_resumes_exactly() -> None:
    """num_averaged (the warmup's position) travels with the state: a resumed EMA continues the schedule."""
    cfg = EMAConfig(beta=0.999, start_step=0, update_every=1, warmup_power=2 / 3)
    model = Tiny()
    ema = EMA(model, cfg)
    for step in range(5):
        set_weights(model, [float(step), 1.0], 0)
        ema.update(model, step)
    resumed = EMA(Tiny(), cfg)
    resumed.load_state_dict(ema.state_dict())
    for e in (ema, resumed):
        for step in range(5, 9):
            set_weights(model, [float(step) ** 2, 1.0], 0)
            e.update(model, step)
    assert torch.equal(ema.params["w"], resumed.params["w"]) and resumed.num_averaged == 9


def test_state_dict_round_trip_resumes_exactly() -> None:
    model = Tiny()
    cfg = EMAConfig(beta=0.9, start_step=1, update_every=1)
    ema = EMA(model, cfg)
    set_weights(model, [5.0, 6.0], 1)
    ema.update(model, 1)
    state = ema.state_dict()
    resumed = EMA(Tiny(), cfg)
    resumed.load_state_dict(state)
    for e in (ema, resumed):
        set_weights(model, [7.0, 8.0], 2)
        e.update(model, 2)
    assert torch.equal(ema.params["w"], resumed.params["w"])
    assert resumed.num_averaged == ema.num_averaged == 2
    state["params"]["w"].add_(1.0)  # the saved state is a copy, not a view of the live EMA
    assert torch.equal(ema.params["w"], resumed.params["w"])


def test_load_state_dict_rejects_other_model() -> None:
    ema = EMA(Tiny(), EMAConfig())
    with pytest.raises(ValueError, match="params"):
        ema.load_state_dict({"params": {"v": torch.zeros(2)}, "buffers": {"count": torch.zeros(())}, "num_averaged": 0})


def test_swapped_into_uses_ema_weights_and_restores() -> None:
    model = Tiny()
    ema = EMA(model, EMAConfig(beta=0.5, start_step=0, update_every=1))
    set_weights(model, [2.0, 2.0], 4)
    ema.update(model, 0)  # ema = [1, 6]
    set_weights(model, [9.0, 9.0], 5)
    with ema.swapped_into(model):
        assert model.w.tolist() == [1.0, 6.0]
        assert model.count.item() == 4.0
    assert model.w.tolist() == [9.0, 9.0] and model.count.item() == 5.0


def test_config_validation_names_key() -> None:
    with pytest.raises(ConfigError, match="ema.beta"):
        EMAConfig(beta=1.0)
    with pytest.raises(ConfigError, match="ema.update_every"):
        EMAConfig(update_every=0)
    with pytest.raises(ConfigError, match="ema.warmup_power"):
        EMAConfig(warmup_power=0.0)


def test_average_is_fp32_for_bf16_parameters() -> None:
    """0.999 * w + 0.001 * p moves a bf16 number by less than its resolution; the fp32 average does not."""
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, EMAConfig(beta=0.999, start_step=0, update_every=1))
    assert all(v.dtype == torch.float32 for v in ema.params.values())
    start = ema.params["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    expected = 0.999 * start + 0.001 * model.weight.detach().float()
    assert torch.allclose(ema.params["weight"], expected, atol=1e-6)
    assert not torch.equal(ema.params["weight"], start)
