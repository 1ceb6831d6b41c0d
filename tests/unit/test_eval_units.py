"""Pure pieces of radiodiff-eval / radiodiff-sample, on CPU, against the data reader and hand values."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from radiodiff.config import ConfigError, DataConfig, EvalConfig, SampleConfig
from radiodiff.data.schema import to_tensors
from radiodiff.eval.evaluate import rank_cap
from radiodiff.eval.main import data_keys
from radiodiff.runs.predict import seconds_per_map_batch1, speed_text, to_model_size, to_native_unit
from radiodiff.runs import merge_data
from radiodiff.eval.sample import antenna_at, to_gray
from radiodiff.dist import DistInfo


@pytest.mark.parametrize("value_range", ["symmetric", "unit"])
@pytest.mark.parametrize("image_size", [64, 96, 320])
def test_to_model_size_resizes_exactly_as_the_reader(value_range: str, image_size: int) -> None:
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 256, (256, 256), dtype=np.uint8) for _ in range(3)]
    cfg = DataConfig(value_range=value_range, image_size=image_size)
    cond_ref, target_ref = to_tensors(*maps, None, cfg)
    cond, target = to_tensors(*maps, None, replace(cfg, image_size=256))
    cond, target = to_model_size(cond[None], target[None], cfg)
    assert torch.equal(cond[0], cond_ref)
    torch.testing.assert_close(target[0], target_ref, rtol=0, atol=1e-6)


def test_to_native_unit_maps_value_ranges_and_size() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert to_native_unit(x, DataConfig()).shape == (1, 1, 256, 256)
    assert to_native_unit(x.expand(1, 1, 2, 2).repeat(1, 1, 128, 128), DataConfig())[0, 0, 0, :2].tolist() == [0.0, 0.5]
    unit = to_native_unit(torch.full((1, 1, 256, 256), 0.25), DataConfig(value_range="unit"))
    assert float(unit.min()) == float(unit.max()) == 0.25


def test_merge_data_takes_the_runs_config_and_the_given_keys() -> None:
    run = DataConfig(shards="/run/shards", image_size=64, simulation="DPM")
    given = DataConfig(shards="/new/shards", simulation="IRT2")
    merged = merge_data(run, given, {"shards"})
    assert merged.shards == "/new/shards" and merged.image_size == 64 and merged.simulation == "DPM"
    with pytest.raises(ConfigError, match="data.image_size=256: the run was trained with 64"):
        merge_data(run, given, {"image_size"})


def test_data_keys_reads_data_overrides_only() -> None:
    args = ["run_dir=x", "data.shards=s3://b/x", "++data.num_tx=2", "sampler.steps=3", "data_x=1"]
    assert data_keys(args) == {"shards", "num_tx"}


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_caps_add_up_to_max_samples(world_size: int) -> None:
    caps = [rank_cap(7, DistInfo(r, world_size, r, torch.device("cpu"))) for r in range(world_size)]
    assert sum(caps) == 7 and max(caps) - min(caps) <= 1
    assert rank_cap(None, DistInfo(0, world_size, 0, torch.device("cpu"))) is None


def test_to_gray_rounds_and_masks_buildings() -> None:
    pred = torch.tensor([0.0, 0.5, 1.0, 1 / 255 * 0.49]).repeat(256 * 64).view(1, 256, 256)
    buildings = np.zeros((256, 256), dtype=np.uint8)
    gray = to_gray(pred, buildings, mask_buildings=True)
    assert gray.dtype == np.uint8 and gray[0, :4].tolist() == [0, 128, 255, 0]
    buildings[0, 2] = 255
    assert to_gray(pred, buildings, mask_buildings=True)[0, 2] == 0
    assert to_gray(pred, buildings, mask_buildings=False)[0, 2] == 255


def test_antenna_at_marks_one_pixel() -> None:
    tx = antenna_at(3, 200)
    assert tx[3, 200] == 255 and int(tx.astype(int).sum()) == 255


@pytest.mark.parametrize("kwargs, message", [
    ({"out": "o.png"}, "give buildings"),
    ({"buildings": "b.png", "out": "o.png"}, "either antenna"),
    ({"buildings": "b.png", "out": "o.png", "antenna": "a.png", "tx_row": 1, "tx_col": 1}, "either antenna"),
    ({"buildings": "b.png", "out": "o.png", "tx_row": 300, "tx_col": 1}, "tx_row=300"),
    ({"input_dir": "d"}, "folder mode"),
    ({"input_dir": "d", "out_dir": "o", "buildings": "b.png"}, "folder mode"),
])
def test_sample_config_rejects_incomplete_inputs(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SampleConfig(run_dir="r", **kwargs)


def test_batch1_timing_warms_up_once_then_times_each_map_alone() -> None:
    calls: list[int] = []

    def predict_one(index: int) -> None:
        calls.append(index)
        time.sleep(0.2 if len(calls) == 1 else 0.01 * index)  # a slow first (warm-up) call is left out

    seconds = seconds_per_map_batch1(predict_one, 3, torch.device("cpu"))
    assert calls == [0, 0, 1, 2]
    assert 0.01 <= seconds < 0.1  # mean of about 0, 0.01 and 0.02 s, without the 0.2 s warm-up


def test_speed_text_names_both_batches() -> None:
    assert speed_text(0.5, 8, 0.125) == "0.5 s/map at batch 8, 0.125 s/map at batch 1"
    assert speed_text(0.5, 8, None) == "0.5 s/map at batch 8"


def test_time_batch1_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="time_batch1"):
        SampleConfig(run_dir="r", input_dir="i", out_dir="o", time_batch1="no")
    assert EvalConfig(run_dir="r", out_dir="o").time_batch1 is True
