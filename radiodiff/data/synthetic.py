"""Synthetic RadioMapSeer: city generation, real-city reuse, and the on-disk layout.

The output folder is laid out exactly like the real dataset (see REFERENCE.md section 1), so the
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
