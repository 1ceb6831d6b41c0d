"""Compare simulated DPM gain maps with the real RadioMapSeer DPM maps of a root.

usage: python tools/sim_fidelity.py <root>

For every ``gain/DPM/{map}_{tx}.png`` in the root, simulates DPM from the root's buildings and tx
position and prints, per split (RadioUNet protocol) and overall, over non-building pixels:
RMSE in dB (pixels pooled; gray 0 counts as -147 dB) and NMSE on the [0, 1] gray scale
(``sum (sim - real)^2 / sum real^2``, pooled). Splits come from the root's SAMPLES.tsv when present,
else from ``radiodiff.data.radiomapseer.split_maps``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radiodiff.data.propagation import PropagationParams, gray_to_db, simulate_gain
from radiodiff.data.synthetic import read_mask, read_positions_csv, read_tx_rc
from radiodiff.data.schema import decode_png

SPLIT_COLUMN = "RadioUNet_split(train<=500,val501-600,test601-699)"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RealSample:
    key: str
    map_id: int
    tx_id: int
    split: str
    buildings: np.ndarray  # (256,256) bool
    tx_rc: tuple[int, int]
    gain: np.ndarray  # (256,256) uint8


def sample_splits(root: Path, keys: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """(map, tx) -> RadioUNet split, from SAMPLES.tsv or the protocol's split function."""
    table = root / "SAMPLES.tsv"
    if table.is_file():
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if rows and SPLIT_COLUMN not in rows[0]:
            raise ValueError(f"{table}: column {SPLIT_COLUMN!r} is missing")
        known = {(int(r["map"]), int(r["tx"])): r[SPLIT_COLUMN] for r in rows}
        return {key: known.get(key, "unknown") for key in keys}
    from radiodiff.data.radiomapseer import split_maps  # only needed without SAMPLES.tsv

    by_map = {m: split for split, ids in split_maps(sorted({m for m, _ in keys}), protocol="radiounet",
                                                    seed=42).items() for m in ids}
    return {key: by_map.get(key[0], "unknown") for key in keys}


def load_real_samples(root: Path, splits: tuple[str, ...] | None = None) -> list[RealSample]:
    """Every real DPM sample of ``root`` (optionally only those in ``splits``), sorted by key."""
    folder = root / "gain" / "DPM"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: not a RadioMapSeer root with DPM gains")
    keys = sorted(tuple(int(v) for v in p.stem.split("_")) for p in folder.glob("*_*.png"))
    split_of = sample_splits(root, keys)
    positions = read_positions_csv(root)
    samples = []
    for map_id, tx_id in keys:
        split = split_of[(map_id, tx_id)]
        if splits is not None and split not in splits:
            continue  # never even read held-out gains when fitting
        path = folder / f"{map_id}_{tx_id}.png"
        samples.append(RealSample(
            key=f"{map_id}_{tx_id}", map_id=map_id, tx_id=tx_id, split=split,
            buildings=read_mask(root / "png" / "buildings_complete" / f"{map_id}.png"),
            tx_rc=read_tx_rc(root, map_id, tx_id, positions),
            gain=decode_png(path.read_bytes(), str(path)),
        ))
    return samples


def error_sums(sim: np.ndarray, real: np.ndarray, buildings: np.ndarray) -> np.ndarray:
    """[pixels, sum dB^2 error, sum gray^2 error, sum gray^2 real] over non-building pixels."""
    keep = ~buildings
    err_db = gray_to_db(sim[keep]) - gray_to_db(real[keep])
    sim_u = sim[keep] / 255.0
    real_u = real[keep] / 255.0
    return np.array([keep.sum(), np.sum(err_db ** 2), np.sum((sim_u - real_u) ** 2), np.sum(real_u ** 2)])


def fidelity_table(samples: list[RealSample], params: PropagationParams | None = None) -> dict[str, tuple]:
    """split -> (num samples, RMSE dB, NMSE), plus 'all'."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for s in samples:
        sim = simulate_gain(s.buildings, s.tx_rc, "DPM", params=params)
        part = error_sums(sim, s.gain, s.buildings)
        for name in (s.split, "all"):
            sums[name] = sums.get(name, 0) + part
            counts[name] = counts.get(name, 0) + 1
    order = [n for n in (*SPLITS, "unknown") if n in sums] + ["all"]
    return {n: (counts[n], float(np.sqrt(sums[n][1] / sums[n][0])), float(sums[n][2] / sums[n][3]))
            for n in order if n in sums}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a RadioMapSeer root with gain/DPM maps")
    args = parser.parse_args(argv)
    samples = load_real_samples(args.root)
    if not samples:
        print(f"error: no gain/DPM/*.png in {args.root}", file=sys.stderr)
        return 2
    print(f"{'split':<8}{'samples':>8}{'RMSE dB':>10}{'NMSE':>10}")
    for name, (count, rmse_db, nmse) in fidelity_table(samples).items():
        print(f"{name:<8}{count:>8}{rmse_db:>10.2f}{nmse:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
