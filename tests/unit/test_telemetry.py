"""Throughput telemetry: rates consistent with the step time, FLOPs against a hand count, peaks."""

from __future__ import annotations

import pytest
import torch

from radiodiff.train.telemetry import Telemetry, count_flops, peak_tflops


def test_rates_follow_the_step_time() -> None:
    telemetry = Telemetry(global_batch=128, rank_maps_per_update=16, device=torch.device("cpu"), peak=100.0)
    telemetry.flops_per_update = 3e12
    telemetry.waited_for_data(0.0)
    telemetry.update_done()
    telemetry.update_done()
    out = telemetry.window()
    step = out["perf/step_time_s"]
    assert out["perf/maps_per_s"] == pytest.approx(128 / step)
    assert out["perf/maps_per_s_rank"] == pytest.approx(16 / step)
    assert out["perf/tflops_rank"] == pytest.approx(3.0 / step)
    assert out["perf/mfu"] == pytest.approx(out["perf/tflops_rank"] / 100.0)
    assert 0.0 <= out["perf/data_wait_frac"] <= 1.0
    assert telemetry.window() == {}  # a new window without updates reports nothing


def test_flop_counter_matches_a_hand_count() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    with count_flops() as counter:
        layer(x).sum().backward()
    # forward 2*B*in*out = 48; backward: input and weight gradients, 48 each
    assert counter.get_total_flops() == 144


def test_peak_comes_from_the_config_or_the_gpu_name() -> None:
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 42.0) == 42.0
