"""radiodiff-synth: layout, conventions, determinism, missing buildings, real cities, bad configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label

from radiodiff.cli import run_app
from radiodiff.config import ConfigError, SynthConfig
from radiodiff.data.synth_main import run_synth

SIMS = ["DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4"]
NUM_MAPS, NUM_TX, VERSIONS = 3, 3, 2


def real_root() -> Path:
    env = os.environ.get("RADIOMAPSEER_REAL")
    # The shared folder sits next to the repository root.
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "radiomapseer-real"


def synth(out: Path, *overrides: str) -> int:
    return run_app("synth", run_synth, [f"out={out}", f"num_maps={NUM_MAPS}", f"num_tx={NUM_TX}",
                                        f"missing_versions={VERSIONS}", f"simulations=[{','.join(SIMS)}]",
                                        *overrides])


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (256, 256) and image.format == "PNG", path
        return np.asarray(image)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "rms"
    assert synth(out) == 0
    return out


def test_every_png_is_256_mode_l_and_binary_maps_are_0_or_255(root: Path) -> None:
    pngs = sorted(root.rglob("*.png"))
    expected = NUM_MAPS * (3 + NUM_TX + 4 * VERSIONS + 4 * NUM_TX + 2 * 2)
    assert len(pngs) == expected
    for path in pngs:
        image = load(path)
        if "gain" not in path.parts:
            assert set(np.unique(image)) <= {0, 255}, path


def test_buildings_transmitters_and_json_follow_the_conventions(root: Path) -> None:
    for m in range(NUM_MAPS):
        buildings = load(root / "png" / "buildings_complete" / f"{m}.png") > 0
        assert 0.12 < buildings.mean() < 0.35
        assert label(buildings, connectivity=1).max() >= 10  # many separate buildings
        pairs = json.loads((root / "antenna" / f"{m}.json").read_text())
        assert len(pairs) == NUM_TX
        for tx, (x, y) in enumerate(pairs):
            antenna = load(root / "png" / "antennas" / f"{m}_{tx}.png")
            rows, cols = np.nonzero(antenna)
            assert rows.tolist() == [255 - y] and cols.tolist() == [x] and antenna[rows[0], cols[0]] == 255
            assert 50 <= rows[0] <= 205 and 50 <= cols[0] <= 205
            assert not buildings[rows[0], cols[0]]
        assert (load(root / "png" / "cars" / f"{m}.png") > 0).any()
        assert (load(root / "png" / "roads" / f"{m}.png") > 0).any()


def test_gains_are_zero_in_buildings_and_peak_at_the_tx(root: Path) -> None:
    for m in range(NUM_MAPS):
        buildings = load(root / "png" / "buildings_complete" / f"{m}.png") > 0
        for tx, (x, y) in enumerate(json.loads((root / "antenna" / f"{m}.json").read_text())):
            for sim in ("DPM", "IRT2", "carsDPM", "carsIRT2"):
                gain = load(root / "gain" / sim / f"{m}_{tx}.png")
                assert np.all(gain[buildings] == 0)
                peak = 255 if "DPM" in sim else 249
                assert gain[255 - y, x] == peak and gain.max() == peak
            dpm = load(root / "gain" / "DPM" / f"{m}_{tx}.png")
            assert 0.15 <= (dpm == 0).mean() <= 0.35
            assert (dpm[~buildings] > 0).mean() > 0.8  # most of the street is above the floor


def test_irt4_only_for_the_first_two_transmitters(root: Path) -> None:
    for sim in ("IRT4", "carsIRT4"):
        names = sorted(p.name for p in (root / "gain" / sim).iterdir())
        assert names == sorted(f"{m}_{tx}.png" for m in range(NUM_MAPS) for tx in (0, 1))


def test_missing_variants_remove_exactly_k_buildings(root: Path) -> None:
    for m in range(NUM_MAPS):
        complete = load(root / "png" / "buildings_complete" / f"{m}.png") > 0
        n_complete = label(complete, connectivity=1).max()
        for k in (1, 2, 3, 4):
            versions = [load(root / "png" / f"buildings_missing{k}" / str(v) / f"{m}.png") > 0
                        for v in range(1, VERSIONS + 1)]
            for reduced in versions:
                assert not np.any(reduced & ~complete)  # a subset of the complete map
                assert label(reduced, connectivity=1).max() == n_complete - k
            assert not np.array_equal(versions[0], versions[1])


def test_same_seed_same_bytes_other_seed_differs(root: Path, tmp_path: Path) -> None:
    assert synth(tmp_path / "again") == 0
    for rel in ("png/buildings_complete/1.png", "gain/DPM/2_1.png", "antenna/0.json",
                "png/buildings_missing3/2/1.png", "png/cars/2.png"):
        assert (tmp_path / "again" / rel).read_bytes() == (root / rel).read_bytes(), rel
    assert synth(tmp_path / "other", "seed=1") == 0
    assert (tmp_path / "other" / "png/buildings_complete/1.png").read_bytes() != \
        (root / "png/buildings_complete/1.png").read_bytes()


def test_existing_output_is_refused_unless_overwrite(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert synth(root) == 2
    assert str(root) in capsys.readouterr().err
    assert synth(root, "overwrite=true") == 0
    assert len(list((root / "gain" / "DPM").iterdir())) == NUM_MAPS * NUM_TX


@pytest.mark.parametrize("override, key", [
    ("num_tx=81", "num_tx"), ("num_maps=0", "num_maps"), ("simulations=[FDTD]", "simulations"),
    ("map_ids=[701]", "map_ids"), ("missing_versions=-1", "missing_versions"),
])
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path: Path, override: str, key: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert run_app("synth", run_synth, [f"out={tmp_path / 'x'}", override]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError):
        SynthConfig(out="x", **{key: {"num_tx": 81, "num_maps": 0, "simulations": ["FDTD"],
                                      "map_ids": [701], "missing_versions": -1}[key]})


def test_city_from_keeps_real_cities_and_transmitters(tmp_path: Path) -> None:
    real = real_root()
    if not (real / "png" / "buildings_complete").is_dir():
        pytest.skip(f"real RadioMapSeer subset not found at {real} (set RADIOMAPSEER_REAL)")
    out = tmp_path / "real"
    assert run_app("synth", run_synth, [f"out={out}", f"city_from={real}", "map_ids=[0,46]", "num_tx=2",
                                        "missing_versions=1", "simulations=[DPM,carsDPM]"]) == 0
    for m in (0, 46):
        for name in ("buildings_complete", "cars", "roads"):
            assert (out / "png" / name / f"{m}.png").read_bytes() == (real / "png" / name / f"{m}.png").read_bytes()
        pairs = json.loads((out / "antenna" / f"{m}.json").read_text())
        for tx, (x, y) in enumerate(pairs):
            # Independent reference: the real antenna_positions.csv, not the files the tool read.
            line = next(l for l in (real / "antenna_positions.csv").read_text().splitlines()
                        if l.startswith(f"{m},{tx},"))
            row, col = map(int, line.split(",")[2:])
            assert (255 - y, x) == (row, col)
            assert load(out / "gain" / "DPM" / f"{m}_{tx}.png")[row, col] == 255
        complete = load(real / "png" / "buildings_complete" / f"{m}.png") > 0
        reduced = load(out / "png" / "buildings_missing2" / "1" / f"{m}.png") > 0
        assert label(reduced, connectivity=1).max() == label(complete, connectivity=1).max() - 2
    real_dpm = load(real / "gain" / "DPM" / "0_0.png").astype(float)
    sim_dpm = load(out / "gain" / "DPM" / "0_0.png").astype(float)
    streets = load(real / "png" / "buildings_complete" / "0.png") == 0
    assert np.sqrt(np.mean((sim_dpm - real_dpm)[streets] ** 2)) < 20  # gray levels (~8 dB)
