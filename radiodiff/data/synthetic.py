"""Synthetic RadioMapSeer: city generation, real-city reuse, and the on-disk layout.

The output folder is laid out exactly like the real dataset (see the README's data section), so the
same reader opens both. Cities are street grids (optionally rotated) whose blocks are split into
lots carrying rectangular or L-shaped buildings; cars are short rectangles along the roads;
transmitters stand in streets at least ``TX_MARGIN_PX`` from the border. Gains come from
``radiodiff.data.propagation``. Every random choice is drawn from a generator seeded by
``(seed, map, purpose...)``, so a map does not depend on how many maps are written.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from radiodiff.data.schema import DataFormatError, decode_png

SIZE = 256
TX_MARGIN_PX = 50
MISSING_LEVELS = (1, 2, 3, 4)
# Draws of a street grid used to steer coverage towards the real maps' ~21% building pixels.
TARGET_BUILDING_FRACTION = 0.21


@dataclass(frozen=True)
class City:
    """One map's static geometry. All (256,256) bool."""

    buildings: np.ndarray
    roads: np.ndarray
    cars: np.ndarray


def map_rng(seed: int, map_id: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, map_id, *purpose])


# --- reading real roots ------------------------------------------------------------------------


def read_mask(path: Path) -> np.ndarray:
    """A RadioMapSeer binary PNG -> (256,256) bool."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return decode_png(path.read_bytes(), str(path)) > 0


def _tx_from_antenna_png(path: Path) -> tuple[int, int]:
    image = decode_png(path.read_bytes(), str(path))
    rows, cols = np.nonzero(image == 255)
    if rows.size != 1:
        raise DataFormatError(f"{path}: expected exactly one 255 pixel, found {rows.size}")
    return int(rows[0]), int(cols[0])


def _tx_from_json(path: Path, tx_id: int) -> tuple[int, int]:
    try:
        pairs = json.loads(path.read_text())
        x, y = pairs[tx_id]
    except (json.JSONDecodeError, IndexError, TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: cannot read [x, y] of tx {tx_id} ({err})") from err
    return int(round(255 - y)), int(round(x))  # column = x, row = 255 - y


def read_positions_csv(root: Path) -> dict[tuple[int, int], tuple[int, int]]:
    """``antenna_positions.csv`` (map,tx,row,col) -> {(map, tx): (row, col)}; {} when absent."""
    path = root / "antenna_positions.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"map", "tx", "row", "col"} - set(reader.fieldnames or ())
        if missing:
            raise DataFormatError(f"{path}: missing columns {sorted(missing)}")
        return {(int(r["map"]), int(r["tx"])): (int(r["row"]), int(r["col"])) for r in reader}


def read_tx_rc(root: Path, map_id: int, tx_id: int,
               csv_positions: dict[tuple[int, int], tuple[int, int]] | None = None) -> tuple[int, int]:
    """A real transmitter's (row, col): antenna PNG, else antenna JSON, else antenna_positions.csv."""
    png = root / "png" / "antennas" / f"{map_id}_{tx_id}.png"
    if png.is_file():
        return _tx_from_antenna_png(png)
    js = root / "antenna" / f"{map_id}.json"
    if js.is_file():
        return _tx_from_json(js, tx_id)
    positions = read_positions_csv(root) if csv_positions is None else csv_positions
    if (map_id, tx_id) in positions:
        return positions[(map_id, tx_id)]
    raise FileNotFoundError(
        f"no position for tx {map_id}_{tx_id} in {root}: looked for {png}, {js} and antenna_positions.csv"
    )


# --- synthetic cities --------------------------------------------------------------------------


def _street_grid(rng: np.random.Generator, extent: float) -> list[tuple[float, float, float]]:
    """Blocks along one axis as (start, end, width of the street before it), covering +-extent."""
    blocks = []
    pos = -extent - rng.uniform(0, 40)
    while pos < extent:
        street_w = rng.uniform(6.0, 16.0)
        length = rng.uniform(32.0, 80.0)
        blocks.append((pos + street_w, pos + street_w + length, street_w))
        pos += street_w + length
    return blocks


def _lot_buildings(rng: np.random.Generator, u0: float, u1: float, v0: float, v1: float) -> list[tuple]:
    """Buildings of one block in rotated coordinates: (u0, u1, v0, v1, cut) with an optional
    corner rectangle ``cut`` removed to make an L shape."""
    long_u = (u1 - u0) >= (v1 - v0)
    length, depth = (u1 - u0, v1 - v0) if long_u else (v1 - v0, u1 - u0)
    n_long = max(1, int(round(length / rng.uniform(16.0, 34.0))))
    n_deep = 2 if depth > 40 and rng.random() < 0.6 else 1
    out = []
    for i in range(n_long):
        for j in range(n_deep):
            if rng.random() > 0.55:  # empty lot: yards, parking, squares
                continue
            a0, a1 = length * i / n_long, length * (i + 1) / n_long
            b0, b1 = depth * j / n_deep, depth * (j + 1) / n_deep
            m = rng.uniform(1.0, 5.0, size=4)  # setbacks from the lot edges
            a0, a1, b0, b1 = a0 + m[0], a1 - m[1], b0 + m[2], b1 - m[3]
            if a1 - a0 < 5 or b1 - b0 < 5:
                continue
            box = (u0 + a0, u0 + a1, v0 + b0, v0 + b1) if long_u else (u0 + b0, u0 + b1, v0 + a0, v0 + a1)
            cut = None
            if rng.random() < 0.3:
                fu, fv = rng.uniform(0.3, 0.6, size=2)
                cu = box[0] if rng.random() < 0.5 else box[1] - fu * (box[1] - box[0])
                cv = box[2] if rng.random() < 0.5 else box[3] - fv * (box[3] - box[2])
                cut = (cu, cu + fu * (box[1] - box[0]), cv, cv + fv * (box[3] - box[2]))
            out.append((*box, cut))
    return out


def _inside(u: np.ndarray, v: np.ndarray, box: tuple) -> np.ndarray:
    return (u >= box[0]) & (u < box[1]) & (v >= box[2]) & (v < box[3])


def generate_city(seed: int, map_id: int) -> City:
    """A synthetic city: rotated street grid, buildings in lots, road centrelines, parked cars."""
    rng = map_rng(seed, map_id, 0)
    angle = 0.0 if rng.random() < 0.4 else rng.uniform(0.0, np.pi / 2)
    centre = (SIZE - 1) / 2.0
    rr, cc = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) - centre  # (H, W) each
    u = cc * np.cos(angle) + rr * np.sin(angle)  # rotated coordinates of every pixel
    v = -cc * np.sin(angle) + rr * np.cos(angle)
    extent = centre * np.sqrt(2.0) + 2.0
    cols, rows = _street_grid(rng, extent), _street_grid(rng, extent)
    buildings = np.zeros((SIZE, SIZE), dtype=bool)
    for u0, u1, _ in cols:
        for v0, v1, _ in rows:
            for *box, cut in _lot_buildings(rng, u0, u1, v0, v1):
                inside = _inside(u, v, box)
                if cut is not None:
                    inside &= ~_inside(u, v, cut)
                buildings |= inside
    roads = np.zeros_like(buildings)
    cars = np.zeros_like(buildings)
    for axis_coord, other, blocks in ((u, v, cols), (v, u, rows)):
        for start, _, street_w in blocks:
            mid = start - street_w / 2.0  # the street centreline
            roads |= np.abs(axis_coord - mid) < 0.75
            for along in rng.uniform(-extent, extent, size=int(rng.integers(6, 20))):
                side = mid + rng.choice([-1.0, 1.0]) * street_w / 4.0
                cars |= (np.abs(axis_coord - side) < 1.0) & (np.abs(other - along) < 2.2)
    return City(buildings=buildings, roads=roads & ~buildings, cars=cars & ~buildings)


def choose_transmitters(city: City, num_tx: int, seed: int, map_id: int) -> list[tuple[int, int]]:
    """``num_tx`` street pixels (not building, not car) >= TX_MARGIN_PX from the border."""
    free = ~(city.buildings | city.cars)
    inner = np.zeros_like(free)
    inner[TX_MARGIN_PX:SIZE - TX_MARGIN_PX, TX_MARGIN_PX:SIZE - TX_MARGIN_PX] = True
    rows, cols = np.nonzero(free & inner)
    if rows.size < num_tx:
        raise ValueError(f"map {map_id} has only {rows.size} free street pixels for {num_tx} transmitters")
    pick = map_rng(seed, map_id, 1).choice(rows.size, size=num_tx, replace=False)
    return [(int(rows[i]), int(cols[i])) for i in pick]


def remove_buildings(complete: np.ndarray, k: int, seed: int, map_id: int, version: int) -> np.ndarray:
    """The complete map with ``k`` buildings (4-connected components) deleted. (256,256) bool."""
    labels, count = ndimage.label(complete)
    rng = map_rng(seed, map_id, 100 + k, version)
    drop = rng.choice(np.arange(1, count + 1), size=min(k, count), replace=False)
    return complete & ~np.isin(labels, drop)


# --- writing the layout ------------------------------------------------------------------------


class OutputExistsError(FileExistsError, ValueError):
    """The output folder already holds files and overwrite was not requested."""


def prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output folder {out} is not empty; set overwrite=true to replace it")
        import shutil

        for name in ("png", "gain", "antenna"):  # only what this writer owns
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a (256,256) uint8 (or bool -> 0/255) map as an 8-bit grayscale PNG."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8, (path, image.shape, image.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)  # 2-D uint8 -> mode "L"


def write_antennas(out: Path, map_id: int, positions: list[tuple[int, int]]) -> int:
    """Antenna PNGs and JSON of one map ([x, y] with x = column, y = 255 - row). Returns files written."""
    for tx_id, (row, col) in enumerate(positions):
        image = np.zeros((SIZE, SIZE), dtype=np.uint8)
        image[row, col] = 255
        write_png(out / "png" / "antennas" / f"{map_id}_{tx_id}.png", image)
    (out / "antenna").mkdir(parents=True, exist_ok=True)
    pairs = [[col, SIZE - 1 - row] for row, col in positions]
    (out / "antenna" / f"{map_id}.json").write_text(json.dumps(pairs))
    return len(positions) + 1


def write_missing(out: Path, complete: np.ndarray, versions: int, seed: int, map_id: int) -> int:
    for k in MISSING_LEVELS:
        for version in range(1, versions + 1):
            reduced = remove_buildings(complete, k, seed, map_id, version)
            write_png(out / "png" / f"buildings_missing{k}" / str(version) / f"{map_id}.png", reduced)
    return len(MISSING_LEVELS) * versions


def write_gains(out: Path, city: City, map_id: int, positions: list[tuple[int, int]],
                simulations: list[str]) -> tuple[int, float]:
    """Gain maps of every simulation and tx of one map. Returns (files written, seconds simulating)."""
    from time import perf_counter

    from radiodiff.config import SIMULATION_TX_LIMIT
    from radiodiff.data.propagation import gain_from_features, ray_features

    files, seconds = 0, 0.0
    need_cars = any(sim.startswith("cars") for sim in simulations)
    for tx_id, tx_rc in enumerate(positions):
        sims = [s for s in simulations if tx_id < SIMULATION_TX_LIMIT.get(s, len(positions))]
        if not sims:
            continue
        start = perf_counter()
        # The ray geometry is shared by all simulations of a tx; non-cars models ignore the cars.
        features = ray_features(city.buildings, tx_rc, city.cars if need_cars else None)
        gains = {sim: gain_from_features(features, sim) for sim in sims}
        seconds += perf_counter() - start
        for sim, gain in gains.items():
            write_png(out / "gain" / sim / f"{map_id}_{tx_id}.png", gain)
            files += 1
    return files, seconds


def copy_real_city(source: Path, out: Path, map_id: int, need_cars: bool) -> City:
    """Copy a real map's building, car and road PNGs byte for byte and return its geometry."""
    arrays = {}
    for name in ("buildings_complete", "cars", "roads"):
        src = source / "png" / name / f"{map_id}.png"
        if not src.is_file():
            if name == "buildings_complete" or (name == "cars" and need_cars):
                raise FileNotFoundError(f"city_from: {src} does not exist")
            arrays[name] = np.zeros((SIZE, SIZE), dtype=bool)
            continue
        arrays[name] = read_mask(src)
        dst = out / "png" / name / f"{map_id}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return City(buildings=arrays["buildings_complete"], roads=arrays["roads"], cars=arrays["cars"])


def write_map(out: Path, map_id: int, num_tx: int, seed: int, simulations: list[str],
              missing_versions: int, city_from: Path | None,
              csv_positions: dict[tuple[int, int], tuple[int, int]] | None = None) -> tuple[int, int, float]:
    """Everything of one map. Returns (files written, gain maps simulated, seconds simulating)."""
    need_cars = any(sim.startswith("cars") for sim in simulations)
    if city_from is None:
        city = generate_city(seed, map_id)
        for name, mask in (("buildings_complete", city.buildings), ("cars", city.cars), ("roads", city.roads)):
            write_png(out / "png" / name / f"{map_id}.png", mask)
        positions = choose_transmitters(city, num_tx, seed, map_id)
    else:
        city = copy_real_city(city_from, out, map_id, need_cars)
        positions = [read_tx_rc(city_from, map_id, tx, csv_positions) for tx in range(num_tx)]
    files = 3 + write_antennas(out, map_id, positions)
    files += write_missing(out, city.buildings, missing_versions, seed, map_id)
    gain_files, seconds = write_gains(out, city, map_id, positions, simulations)
    return files + gain_files, gain_files, seconds
