"""The RadioMapSeer folder reader: splits, real files, options, and bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.radiomapseer import RadioMapSeer, RadioMapSeerDataset, split_maps
from radiodiff.data.schema import DataFormatError, SampleId


def published_permutation() -> np.ndarray:
    """The published loaders' map order, computed their way: numpy's global RNG seeded 42."""
    saved = np.random.get_state()
    try:
        np.random.seed(42)
        maps = np.arange(0, 700, 1, dtype=np.int16)
        np.random.shuffle(maps)
    finally:
        np.random.set_state(saved)
    return maps.astype(int) + 1  # the loaders read file id perm[i] + 1


def real_samples(real_root: Path) -> list[SampleId]:
    with open(real_root / "SAMPLES.tsv") as f:
        return [SampleId(int(r["map"]), int(r["tx"])) for r in csv.DictReader(f, delimiter="\t")]


def test_radiounet_protocol_matches_published_ranges() -> None:
    perm = published_permutation()
    splits = split_maps(range(701), "radiounet", 42)
    assert splits["train"] == list(perm[0:501])
    assert splits["val"] == list(perm[501:601])
    assert splits["test"] == list(perm[601:700])
    assert [len(v) for v in splits.values()] == [501, 100, 99]
    assert 0 not in sum(splits.values(), [])


def test_radiodiff_protocol_overlap_and_disjoint_variant() -> None:
    perm = published_permutation()
    published = split_maps(range(701), "radiodiff", 42)
    assert published["train"] == list(perm[0:601]) and published["test"] == list(perm[600:700])
    assert set(published["train"]) & set(published["test"]) == {perm[600]}
    disjoint = split_maps(range(701), "radiodiff_disjoint", 42)
    assert disjoint["test"] == published["test"]
    assert not set(disjoint["train"]) & set(disjoint["test"])
    assert len(disjoint["train"]) == 600


@pytest.mark.parametrize("num_maps", [5, 12, 40])
def test_small_sets_keep_protocol_fractions(num_maps: int) -> None:
    splits = split_maps(range(num_maps), "radiounet", 7)
    everything = sorted(sum(splits.values(), []))
    assert everything == list(range(num_maps))  # disjoint and covering
    assert all(len(v) >= 1 for v in splits.values())
    assert abs(len(splits["train"]) / num_maps - 501 / 700) <= 1.0 / num_maps + 1e-9
    assert split_maps(range(num_maps), "radiounet", 7) == splits
    assert split_maps(range(num_maps), "radiounet", 8) != splits
    overlap = split_maps(range(num_maps), "radiodiff", 7)
    assert len(set(overlap["train"]) & set(overlap["test"])) == 1


def test_too_few_maps_is_a_clear_error() -> None:
    with pytest.raises(DataFormatError, match="too few"):
        split_maps([1, 2], "radiounet", 42)


def test_real_dpm_sample_values(real_root: Path) -> None:
    only = real_samples(real_root)
    data = RadioMapSeerDataset(DataConfig(value_range="unit"), "train", root=str(real_root), only=only)
    sample = data.samples[0]
    item = data[0]
    gain = np.asarray(Image.open(real_root / f"gain/DPM/{sample.key}.png"), dtype=np.float32) / 255
    buildings = np.asarray(Image.open(real_root / f"png/buildings_complete/{sample.map}.png"), np.float32) / 255
    positions = {(int(r["map"]), int(r["tx"])): (int(r["row"]), int(r["col"]))
                 for r in csv.DictReader(open(real_root / "antenna_positions.csv"))}
    row, col = positions[(sample.map, sample.tx)]
    assert item["key"] == sample.key and item["cond"].shape == (3, 256, 256) and item["target"].shape == (1, 256, 256)
    np.testing.assert_array_equal(item["target"][0].numpy(), gain)
    np.testing.assert_array_equal(item["cond"][0].numpy(), buildings)
    np.testing.assert_array_equal(item["cond"][2].numpy(), buildings)  # no cars: buildings again
    assert item["cond"][1].sum() == 1 and item["cond"][1, row, col] == 1
    assert item["target"][0, row, col] == 1.0  # DPM is 255 at the transmitter


def test_value_range_threshold_and_resize(real_root: Path) -> None:
    only = [SampleId(46, 23)]
    gain = np.asarray(Image.open(real_root / "gain/DPM/46_23.png"), dtype=np.float32) / 255
    sym = RadioMapSeerDataset(DataConfig(), "train", root=str(real_root), only=only)[0]
    assert sym["cond"].min() == -1 and sym["cond"].max() == 1
    np.testing.assert_allclose(sym["target"][0].numpy(), gain * 2 - 1, atol=1e-6)
    thr = RadioMapSeerDataset(DataConfig(value_range="unit", threshold=0.2), "train",
                              root=str(real_root), only=only)[0]
    np.testing.assert_allclose(thr["target"][0].numpy(), (np.maximum(gain, 0.2) - 0.2) / 0.8, atol=1e-6)
    big = RadioMapSeerDataset(DataConfig(value_range="unit", image_size=320), "train",
                              root=str(real_root), only=only)[0]
    assert big["cond"].shape == (3, 320, 320) and big["target"].shape == (1, 320, 320)
    assert set(torch.unique(big["cond"]).tolist()) <= {0.0, 1.0}  # nearest keeps binary maps binary
    assert 0.0 <= big["target"].min() and big["target"].max() <= 1.0


def test_irt4_has_only_two_transmitters(synth_root: Path) -> None:
    with pytest.raises(ConfigError, match="IRT4"):
        DataConfig(simulation="IRT4", num_tx=3)
    source = RadioMapSeer(DataConfig(root=str(synth_root), simulation="IRT4"))
    assert source.tx_ids == [0, 1]


def test_missing_buildings_version_is_fixed_per_map(synth_root: Path) -> None:
    versions = {m: RadioMapSeer(DataConfig(root=str(synth_root), buildings="missing2")).building_version(m)
                for m in range(12)}
    again = RadioMapSeer(DataConfig(root=str(synth_root), buildings="missing2"))
    assert all(again.building_version(m) == v for m, v in versions.items())
    other = RadioMapSeer(DataConfig(root=str(synth_root), buildings="missing2", split_seed=1))
    assert any(other.building_version(m) != v for m, v in versions.items())
    assert set(versions.values()) <= {1, 2}  # the synthetic root holds 2 versions
    path = again.paths(SampleId(3, 1))["buildings.png"]
    assert path.parts[-3:] == ("buildings_missing2", str(again.building_version(3)), "3.png")
    assert path.exists()


def test_cars_input_channel(synth_root: Path) -> None:
    cfg = DataConfig(root=str(synth_root), simulation="carsDPM", cars_input=True, value_range="unit")
    data = RadioMapSeerDataset(cfg, "train")
    item = data[0]
    cars = np.asarray(Image.open(synth_root / f"png/cars/{item['map']}.png"), dtype=np.float32) / 255
    np.testing.assert_array_equal(item["cond"][2].numpy(), cars)


def test_missing_folder_names_it(synth_copy: Path) -> None:
    shutil.rmtree(synth_copy / "gain" / "DPM")
    with pytest.raises(DataFormatError, match=r"gain/DPM is missing"):
        RadioMapSeer(DataConfig(root=str(synth_copy)))


def test_missing_file_names_it(synth_copy: Path) -> None:
    (synth_copy / "png" / "antennas" / "5_2.png").unlink()
    with pytest.raises(DataFormatError, match=r"png/antennas/5_2.png"):
        RadioMapSeer(DataConfig(root=str(synth_copy)))


@pytest.mark.parametrize("bad", ["size", "mode"])
def test_wrong_png_format_names_file_and_expectation(synth_copy: Path, bad: str) -> None:
    target = synth_copy / "gain" / "DPM" / "0_0.png"
    image = Image.new("L", (128, 128)) if bad == "size" else Image.new("RGB", (256, 256))
    for path in sorted((synth_copy / "gain" / "DPM").iterdir()):  # every file, so the header check sees one
        image.save(path)
    with pytest.raises(DataFormatError, match=r"gain/DPM/.*\.png: expected a 256x256 mode L PNG"):
        RadioMapSeer(DataConfig(root=str(synth_copy)))
    assert target.exists()


def test_corrupt_png_is_named_on_read(synth_copy: Path) -> None:
    data = RadioMapSeerDataset(DataConfig(root=str(synth_copy)), "train")
    victim = data.source.paths(data.samples[0])["gain.png"]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataFormatError, match=str(victim)):
        data[0]


def test_not_a_root() -> None:
    with pytest.raises(DataFormatError, match="no RadioMapSeer root"):
        RadioMapSeer(DataConfig())
    with pytest.raises(DataFormatError, match="is not a folder"):
        RadioMapSeer(DataConfig(root="/nonexistent/radiomapseer"))


@pytest.mark.parametrize("value_range", ["unit", "symmetric"])
def test_shrinking_keeps_the_one_pixel_transmitter(value_range: str) -> None:
    from radiodiff.data.schema import to_tensors

    cfg = DataConfig(value_range=value_range, image_size=64)
    empty = np.zeros((256, 256), np.uint8)
    on = 1.0
    for row, col in [(0, 0), (1, 2), (77, 130), (255, 255), (128, 3)]:
        tx = empty.copy()
        tx[row, col] = 255
        cond, _ = to_tensors(empty, tx, empty, None, cfg)
        hits = (cond[1] == on).nonzero().tolist()
        assert hits == [[row // 4, col // 4]]  # exactly one pixel, in the cell that holds the transmitter
