"""The sample format shared by the folder reader, the sharder and the shard reader.

A sample is a transmitter of a map, keyed ``{map}_{tx}``. On disk (folder or shard) it is a set of
members: PNG bytes exactly as RadioMapSeer stores them, plus a small JSON record. Only these member
types are ever decoded; nothing is unpickled.

In memory a decoded sample is a dict::

    key    str              "{map}_{tx}"
    cond   float32 (3,H,W)  [buildings, tx, cars or buildings]
    target float32 (1,H,W)  the gain map
    map    int, tx int
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from radiodiff.config import DataConfig

NATIVE_SIZE = 256
PNG_MEMBERS = ("buildings.png", "tx.png", "gain.png", "cars.png")
MEMBERS = PNG_MEMBERS + ("json",)
PER_MAP_MEMBERS = ("buildings.png", "cars.png")  # the same bytes for every transmitter of a map
JSON_FIELDS = ("map", "tx", "split", "simulation", "buildings", "tx_row", "tx_col")


class DataFormatError(ValueError):
    """A data file is missing, corrupt, or not in the expected format; the message names it."""


@dataclass(frozen=True)
class SampleId:
    map: int
    tx: int

    @property
    def key(self) -> str:
        return f"{self.map}_{self.tx}"

    @classmethod
    def from_key(cls, key: str) -> "SampleId":
        try:
            map_id, tx_id = key.split("_")
            return cls(int(map_id), int(tx_id))
        except ValueError as err:
            raise DataFormatError(f"sample key {key!r} is not of the form '{{map}}_{{tx}}'") from err


def decode_png(data: bytes, where: str) -> np.ndarray:
    """Decode a RadioMapSeer PNG, checking it is 8-bit single-channel 256x256. Returns (H, W) uint8."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise DataFormatError(f"{where}: expected a PNG file, found {image.format}")
            if image.mode != "L" or image.size != (NATIVE_SIZE, NATIVE_SIZE):
                raise DataFormatError(
                    f"{where}: expected a {NATIVE_SIZE}x{NATIVE_SIZE} 8-bit grayscale (mode L) PNG, "
                    f"found mode {image.mode} size {image.size[0]}x{image.size[1]}"
                )
            array = np.array(image)  # a writable copy: torch.from_numpy shares it
    except DataFormatError:
        raise
    except Exception as err:  # PIL raises many types for truncated or garbage files
        raise DataFormatError(f"{where}: cannot decode PNG ({type(err).__name__}: {err})") from err
    return array


def encode_json(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def decode_json(data: bytes, where: str) -> dict:
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{where}: invalid JSON record ({err})") from err
    missing = [name for name in JSON_FIELDS if name not in record]
    if missing:
        raise DataFormatError(f"{where}: JSON record lacks {', '.join(missing)}")
    return record


def resize_maps(cond: torch.Tensor, target: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 256, 256) condition and (B, 1, 256, 256) target, already in value range -> image_size.

    Binary maps resize nearest, the gain map bilinear (antialiased). The transmitter is one pixel:
    nearest sampling would drop it at most positions, so shrinking keeps it with a max over each
    output pixel's area.
    """
    size = cfg.image_size
    if size == NATIVE_SIZE:
        return cond, target
    low = -1.0 if cfg.value_range == "symmetric" else 0.0
    resized = F.interpolate(cond, size=(size, size), mode="nearest")
    if size < NATIVE_SIZE:
        resized[:, 1:2] = F.adaptive_max_pool2d(cond[:, 1:2], size)
    target = F.interpolate(target, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized, target.clamp(low, 1.0)


@functools.lru_cache(maxsize=16)
def _lookup_tables(threshold: float | None, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gray level -> float32 value for condition and target maps.

    A 256-entry table turns a uint8 map into its final values in one indexed pass, several times
    faster than converting and scaling in steps (this is the data reader's hot path).
    """
    cond = np.arange(256, dtype=np.float64) / 255.0
    target = cond.copy()
    if threshold is not None:
        target = (np.maximum(target, threshold) - threshold) / (1.0 - threshold)
    if symmetric:
        cond, target = cond * 2.0 - 1.0, target * 2.0 - 1.0
    return cond.astype(np.float32), target.astype(np.float32)


def to_tensors(
    buildings: np.ndarray, tx: np.ndarray, gain: np.ndarray, cars: np.ndarray | None, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 maps -> (cond (3,H,W), target (1,H,W)) float32, per the options in ``cfg``."""
    third = cars if cfg.cars_input else buildings
    if third is None:
        raise DataFormatError("data.cars_input=true but the sample has no cars map")
    symmetric = cfg.value_range == "symmetric"
    cond_lut, target_lut = _lookup_tables(cfg.threshold, symmetric)
    cond = torch.from_numpy(cond_lut[np.stack([buildings, tx, third])])  # (3, H, W)
    target = torch.from_numpy(target_lut[gain][None])  # (1, H, W)
    if cfg.image_size != NATIVE_SIZE:
        cond, target = (x[0] for x in resize_maps(cond[None], target[None], cfg))
    return cond, target


def decode_members(
    members: dict[str, bytes],
    cfg: DataConfig,
    where: str | Mapping[str, str],
    *,
    map_cache: dict[bytes, np.ndarray] | None = None,
) -> dict:
    """Raw members of one sample (``buildings.png`` ... ``json``) -> the in-memory sample dict.

    ``where`` names the sample in errors: a prefix (a shard and key) or, per member, its source file.
    ``map_cache`` (PNG bytes -> decoded map) lets a reader decode the per-map members (buildings,
    cars), which all transmitters of a map share, once instead of once per sample.
    """
    if isinstance(where, str):
        prefix = where
        where = {name: f"{prefix}.{name}" for name in MEMBERS}
    else:
        prefix = where.get("json", next(iter(where.values())))
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise DataFormatError(f"{prefix}: unexpected member types {unknown}; allowed: {list(MEMBERS)}")
    for name in ("buildings.png", "tx.png", "gain.png", "json"):
        if name not in members:
            raise DataFormatError(f"{prefix}: member {name} is missing")
    record = decode_json(members["json"], where.get("json", f"{prefix} (json)"))
    arrays = {}
    for name in PNG_MEMBERS:
        if name not in members:
            continue
        data = members[name]
        cached = map_cache is not None and name in PER_MAP_MEMBERS
        if cached and data in map_cache:
            arrays[name] = map_cache[data]
            continue
        arrays[name] = decode_png(data, where[name])
        if cached:
            map_cache[data] = arrays[name]
    cond, target = to_tensors(
        arrays["buildings.png"], arrays["tx.png"], arrays["gain.png"], arrays.get("cars.png"), cfg
    )
    return {"key": f"{record['map']}_{record['tx']}", "cond": cond, "target": target,
            "map": int(record["map"]), "tx": int(record["tx"])}
