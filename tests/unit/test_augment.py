"""data.augment=antidiagonal: an exact symmetry of the data, applied per sample by stream position."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.augment import antidiagonal, reflected
from radiodiff.data.propagation import simulate_gain
from radiodiff.data.shards import ShardLoader
from radiodiff.data.synthetic import choose_transmitters, generate_city


def test_antidiagonal_is_the_reflection_by_index():
    maps = torch.arange(2 * 5 * 5).reshape(2, 5, 5)
    out = antidiagonal(maps)
    for r in range(5):
        for c in range(5):
            assert torch.equal(out[:, r, c], maps[:, 4 - c, 4 - r])
    assert torch.equal(antidiagonal(out), maps)  # an involution
    with pytest.raises(ValueError, match="square"):
        antidiagonal(torch.zeros(4, 6))


def _reflect_np(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[::-1, ::-1].T)


@pytest.mark.parametrize("model", ["DPM", "IRT2"])
def test_simulator_maps_the_reflected_city_to_the_reflected_map(model):
    """The augmentation is exact: the reflected city and transmitter get the reflected map (up to the
    ray casting's rounding), while a plain transpose, which moves the DPM edge ring onto the other
    faces of the buildings, does not."""
    city = generate_city(5, 0)
    (row, col), = choose_transmitters(city, 1, 5, 0)
    gain = simulate_gain(city.buildings, (row, col), model).astype(np.int16)
    mirrored = simulate_gain(_reflect_np(city.buildings), (255 - col, 255 - row), model).astype(np.int16)
    error = np.abs(_reflect_np(gain) - mirrored)
    assert error.mean() < 0.05 and (error > 0).mean() < 0.01  # gray levels 0..255
    if model == "DPM":
        transposed = simulate_gain(np.ascontiguousarray(city.buildings.T), (col, row), model).astype(np.int16)
        assert (np.abs(gain.T - transposed) > 0).mean() > 0.01


def test_real_edge_ring_is_symmetric_under_the_reflection(real_root: Path):
    """On real DPM training maps, the street pixels with a building only to their south (the
    reflection's image of those with one only to their west) are 0 about as often as those; the
    faces a flip would move the ring to (north, east) almost never are."""
    rates = {side: [0, 0] for side in "SWNE"}
    for path in sorted((real_root / "gain" / "DPM").glob("*.png")):
        map_id = int(path.stem.split("_")[0])
        if map_id > 500:  # the radiounet protocol's training maps only
            continue
        solid = np.array(Image.open(real_root / "png" / "buildings_complete" / f"{map_id}.png")) > 0
        gain = np.array(Image.open(path))
        near = {side: np.zeros_like(solid) for side in "SWNE"}
        near["S"][:-1], near["N"][1:] = solid[1:], solid[:-1]
        near["W"][:, 1:], near["E"][:, :-1] = solid[:, :-1], solid[:, 1:]
        for side in "SWNE":
            only = ~solid & near[side] & ~np.logical_or.reduce([near[o] for o in "SWNE" if o != side])
            rates[side][0] += int((gain[only] == 0).sum())
            rates[side][1] += int(only.sum())
    share = {side: zeros / total for side, (zeros, total) in rates.items()}
    assert share["S"] > 0.15 and share["W"] > 0.15
    assert abs(share["S"] - share["W"]) < 0.05
    assert share["N"] < 0.05 and share["E"] < 0.05


def test_reflection_choice_is_keyed_by_position_and_seed():
    positions = list(range(400))
    chosen = reflected(positions, seed=7)
    assert 150 < int(chosen.sum()) < 250
    assert torch.equal(reflected(positions[100:200], seed=7), chosen[100:200])  # any batching
    assert not torch.equal(reflected(positions, seed=8), chosen)


def test_training_stream_reflects_half_the_samples_and_nothing_else(train_shards: Path):
    plain_cfg = DataConfig(shards=str(train_shards), num_workers=0)  # native 256x256: no resize
    aug_cfg = replace(plain_cfg, augment="antidiagonal")
    plain = next(iter(ShardLoader(plain_cfg, "train", batch_size=16, seed=3, augment=True)))
    augmented = next(iter(ShardLoader(aug_cfg, "train", batch_size=16, seed=3, augment=True)))
    unused = next(iter(ShardLoader(aug_cfg, "train", batch_size=16, seed=3)))  # augment=False: validation
    assert plain["key"] == augmented["key"] == unused["key"]
    assert torch.equal(unused["cond"], plain["cond"]) and torch.equal(unused["target"], plain["target"])
    chosen = reflected(plain["pos"].tolist(), seed=3)
    assert 0 < int(chosen.sum()) < 16
    for name in ("cond", "target"):
        expected = torch.where(chosen[:, None, None, None], antidiagonal(plain[name]), plain[name])
        assert torch.equal(augmented[name], expected)


def test_augment_config_is_checked():
    with pytest.raises(ConfigError, match="data.augment"):
        DataConfig(augment="flip")
    with pytest.raises(ConfigError, match="data.latents"):
        DataConfig(augment="antidiagonal", latents="/somewhere/latents")


def test_reflections_do_not_depend_on_the_world_size_or_a_resume(train_shards: Path):
    """Two ranks of 4 samples, and a loader resumed from a saved position, serve each sample exactly
    as one rank of 8 does: the reflection follows the sample's stream position."""
    cfg = DataConfig(shards=str(train_shards), num_workers=0, augment="antidiagonal", image_size=64)
    one = ShardLoader(cfg, "train", batch_size=8, seed=5, augment=True)
    stream = iter(one)
    whole = [next(stream) for _ in range(2)]
    by_key = {key: cond for batch in whole for key, cond in zip(batch["key"], batch["cond"])}
    for rank in (0, 1):
        loader = ShardLoader(cfg, "train", batch_size=4, rank=rank, world_size=2, seed=5, augment=True)
        for batch, _ in zip(loader, range(2)):
            for key, cond in zip(batch["key"], batch["cond"]):
                assert torch.equal(cond, by_key[key])
    resumed = ShardLoader(cfg, "train", batch_size=8, seed=5, augment=True)
    state = one.state_dict()
    state["position"] = 8  # as if saved after the first batch
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    assert batch["key"] == whole[1]["key"] and torch.equal(batch["cond"], whole[1]["cond"])
