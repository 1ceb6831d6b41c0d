"""Reading RadioMapSeer as it lies on disk: layout, validation, splits, samples.

The folder layout and value conventions are those of the public dataset (see the README's data
section). ``RadioMapSeer`` indexes a root for one data configuration and validates it on opening;
``read_members`` returns a sample's raw members exactly as a shard stores them, so the folder
reader and the shard reader decode the same bytes through ``schema.decode_members``.

Splits follow the seeded map permutation of the two published protocols. On the full dataset
(maps 1..700 present) the published position ranges are used exactly; on a smaller set (a
synthetic one) the same fractions are applied to the seeded permutation of the maps present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from radiodiff.config import SIMULATION_TX_LIMIT, DataConfig
from radiodiff.data.schema import (
    NATIVE_SIZE,
    DataFormatError,
    SampleId,
    check_antenna,
    decode_members,
    decode_png,
    encode_json,
)

FULL_MAPS = 700  # the protocols permute maps 0..699 and read file id perm[i] + 1
# Published cut positions in the permutation of the full 700 maps: split i holds positions
# [cut_{i-1}, cut_i). The RadioDiff protocol's train split also takes the map at its cut (position
# 600), which is therefore in train and test; the disjoint variant keeps the same 100 test maps.
PROTOCOL_CUTS = {
    "radiounet": (("train", "val", "test"), (501, 601)),
    "radiodiff": (("train", "test"), (600,)),
    "radiodiff_disjoint": (("train", "test"), (600,)),
}


def protocol_order(map_ids: Sequence[int], seed: int) -> list[int]:
    """Maps in the protocol's seeded order (numpy's legacy RNG, as the published loaders use)."""
    present = sorted(set(int(m) for m in map_ids))
    if set(range(1, FULL_MAPS + 1)) <= set(present):
        perm = np.arange(FULL_MAPS)
        np.random.RandomState(seed).shuffle(perm)
        return [int(p) + 1 for p in perm]
    perm = np.arange(len(present))
    np.random.RandomState(seed).shuffle(perm)
    return [present[i] for i in perm]


def split_maps(map_ids: Sequence[int], protocol: str, seed: int) -> dict[str, list[int]]:
    """split name -> map ids, per ``protocol`` over the maps present."""
    if protocol not in PROTOCOL_CUTS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOL_CUTS)}")
    names, cuts = PROTOCOL_CUTS[protocol]
    order = protocol_order(map_ids, seed)
    n = len(order)
    if n < len(names):
        raise DataFormatError(f"{n} maps are too few for the {protocol} protocol's {len(names)} splits")
    scaled: list[int] = []
    for i, cut in enumerate(cuts):  # scale to n maps, keeping at least one map in every split
        lowest = (scaled[-1] if scaled else 0) + 1
        scaled.append(min(max(round(cut * n / FULL_MAPS), lowest), n - (len(cuts) - i)))
    bounds = [0, *scaled, n]
    splits = {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
    if protocol == "radiodiff":
        splits["train"] = order[: bounds[1] + 1]
    return splits


@dataclass(frozen=True)
class Layout:
    """Paths of one RadioMapSeer root (names are case-sensitive, ids are not zero-padded)."""

    root: Path

    def buildings(self, map_id: int, variant: str, version: int) -> Path:
        if variant == "complete":
            return self.root / "png" / "buildings_complete" / f"{map_id}.png"
        return self.root / "png" / f"buildings_{variant}" / str(version) / f"{map_id}.png"

    def antenna(self, map_id: int, tx: int) -> Path:
        return self.root / "png" / "antennas" / f"{map_id}_{tx}.png"

    def cars(self, map_id: int) -> Path:
        return self.root / "png" / "cars" / f"{map_id}.png"

    def gain(self, simulation: str, map_id: int, tx: int) -> Path:
        return self.root / "gain" / simulation / f"{map_id}_{tx}.png"


def _list_pngs(folder: Path) -> set[str]:
    if not folder.is_dir():
        raise DataFormatError(f"RadioMapSeer folder {folder} is missing")
    return {name[:-4] for name in os.listdir(folder) if name.endswith(".png")}


def _check_png_header(path: Path) -> None:
    try:
        with Image.open(path) as image:
            ok = image.format == "PNG" and image.mode == "L" and image.size == (NATIVE_SIZE, NATIVE_SIZE)
            found = f"{image.format} mode {image.mode} size {image.size[0]}x{image.size[1]}"
    except Exception as err:
        raise DataFormatError(f"{path}: cannot read PNG ({type(err).__name__}: {err})") from err
    if not ok:
        raise DataFormatError(f"{path}: expected a {NATIVE_SIZE}x{NATIVE_SIZE} mode L PNG, found {found}")


class RadioMapSeer:
    """An opened, validated RadioMapSeer root for one data configuration.

    ``full_check=True`` reads every PNG header of the indexed samples; otherwise one file per
    folder is header-checked and every file is still checked for existence (each read validates
    the file it decodes anyway; ``validate=False`` skips all of this). ``only`` restricts the index
    to the given samples (a partial copy of the dataset); splits are still those of the full set of
    maps present.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        root: str | None = None,
        full_check: bool = False,
        only: Sequence[SampleId] | None = None,
        validate: bool = True,
    ) -> None:
        root = root or cfg.root
        if not root:
            raise DataFormatError("no RadioMapSeer root given: set data.root=<folder>")
        self.cfg = cfg
        self.layout = Layout(Path(root).expanduser())
        if not self.layout.root.is_dir():
            raise DataFormatError(f"RadioMapSeer root {self.layout.root} is not a folder")
        self.map_ids = sorted(int(name) for name in _list_pngs(self.layout.root / "png" / "buildings_complete"))
        self.splits = split_maps(self.map_ids, cfg.protocol, cfg.split_seed)
        self.only = None if only is None else set(only)
        self.tx_ids = self._tx_ids() if only is None else sorted({s.tx for s in only})
        self.missing_versions = self._missing_versions()
        if validate:  # the sharder skips this: it decodes and reports every file itself
            self._validate(full_check)

    def _tx_ids(self) -> list[int]:
        gains = _list_pngs(self.layout.root / "gain" / self.cfg.simulation)
        present = sorted({SampleId.from_key(k).tx for k in gains if k.split("_")[0].isdigit()})
        limit = SIMULATION_TX_LIMIT.get(self.cfg.simulation)
        if limit is not None and self.cfg.num_tx is not None and self.cfg.num_tx > limit:
            raise DataFormatError(f"simulation {self.cfg.simulation} exists only for tx 0..{limit - 1}")
        wanted = self.cfg.num_tx or len(present)
        if present[:wanted] != list(range(wanted)):
            raise DataFormatError(
                f"data.num_tx={wanted} but {self.layout.root / 'gain' / self.cfg.simulation} "
                f"holds transmitters {present[:5]}{'...' if len(present) > 5 else ''}"
            )
        return list(range(wanted))

    def _missing_versions(self) -> list[int]:
        """Version folders of buildings_missing{k} (6 in the real dataset); [] for complete buildings."""
        if self.cfg.buildings == "complete":
            return []
        folder = self.layout.root / "png" / f"buildings_{self.cfg.buildings}"
        versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
        if not versions:
            raise DataFormatError(f"RadioMapSeer folder {folder} is missing or holds no version folders 1..6")
        return versions

    def building_version(self, map_id: int) -> int:
        """The buildings_missing version of a map: fixed by split_seed and map id, not per item."""
        if not self.missing_versions:
            return 0
        pick = np.random.default_rng([self.cfg.split_seed, map_id]).integers(len(self.missing_versions))
        return self.missing_versions[int(pick)]

    def sample_ids(self, split: str) -> list[SampleId]:
        if split not in self.splits:
            raise DataFormatError(f"split {split!r} is not part of protocol {self.cfg.protocol}: {sorted(self.splits)}")
        samples = [SampleId(m, t) for m in self.splits[split] for t in self.tx_ids]
        return samples if self.only is None else [s for s in samples if s in self.only]

    def paths(self, sample: SampleId) -> dict[str, Path]:
        """Member name -> source file of one sample."""
        paths = {
            "buildings.png": self.layout.buildings(sample.map, self.cfg.buildings, self.building_version(sample.map)),
            "tx.png": self.layout.antenna(sample.map, sample.tx),
            "gain.png": self.layout.gain(self.cfg.simulation, sample.map, sample.tx),
        }
        if self.cfg.cars_input:
            paths["cars.png"] = self.layout.cars(sample.map)
        return paths

    def _validate(self, full_check: bool) -> None:
        all_samples = [s for split in self.splits for s in self.sample_ids(split)]
        missing: list[str] = []
        checked_folders: set[Path] = set()
        listings: dict[Path, set[str]] = {}
        for sample in all_samples:
            for path in self.paths(sample).values():
                if path.parent not in listings:
                    listings[path.parent] = _list_pngs(path.parent)
                if path.stem not in listings[path.parent]:
                    missing.append(str(path))
                elif full_check or path.parent not in checked_folders:
                    _check_png_header(path)
                    checked_folders.add(path.parent)
        if missing:
            shown = "\n  ".join(sorted(set(missing))[:10])
            raise DataFormatError(f"{len(set(missing))} RadioMapSeer files are missing, e.g.:\n  {shown}")

    def record(self, sample: SampleId, split: str, tx_map: np.ndarray) -> bytes:
        """The sample's JSON member; the transmitter position is read from its decoded antenna map."""
        row, col = check_antenna(tx_map, str(self.paths(sample)["tx.png"]))
        return encode_json({
            "map": sample.map, "tx": sample.tx, "split": split, "simulation": self.cfg.simulation,
            "buildings": self.cfg.buildings, "tx_row": row, "tx_col": col,
        })

    def read_members(self, sample: SampleId, split: str) -> dict[str, bytes]:
        """The raw members of a sample, as a shard stores them: source PNG bytes and a JSON record."""
        paths = self.paths(sample)
        members = {name: path.read_bytes() for name, path in paths.items()}
        members["json"] = self.record(sample, split, decode_png(members["tx.png"], str(paths["tx.png"])))
        return members


class RadioMapSeerDataset(torch.utils.data.Dataset):
    """Map-style dataset over one split of a RadioMapSeer folder (the per-file reader)."""

    def __init__(self, cfg: DataConfig, split: str, *, root: str | None = None,
                 only: Sequence[SampleId] | None = None) -> None:
        self.source = RadioMapSeer(cfg, root=root, only=only)
        self.split = split
        self.samples = self.source.sample_ids(split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        members = self.source.read_members(sample, self.split)
        where = {name: str(path) for name, path in self.source.paths(sample).items()}
        where["json"] = f"{self.source.layout.root} sample {sample.key}"
        return decode_members(members, self.source.cfg, where=where)
