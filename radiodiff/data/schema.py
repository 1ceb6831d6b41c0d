"""The sample format shared by the folder reader, the sharder and the shard reader.

A sample is a transmitter of a map, keyed ``{map}_{tx}``. On disk (folder or shard) it is a set of
members: PNG bytes exactly as RadioMapSeer stores them, plus a small JSON record. A latent cache's
samples (``radiodiff-encode``) hold the condition PNGs and the record unchanged and, instead of the
gain map, ``moments.npy``: the frozen VAE's posterior moments as a float32 ``.npy`` array, read with
``allow_pickle=False``. Only these member types are ever decoded; nothing is unpickled.

In memory a decoded sample is a dict::

    key     str                 "{map}_{tx}"
    cond    float32 (3,H,W)     [buildings, tx, cars or buildings]
    target  float32 (1,H,W)     the gain map (image shards)
    moments float32 (2Z,h,w)    the posterior's mean, then its log-variance (latent caches)
    map     int, tx int
"""

from __future__ import annotations

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
MOMENTS_MEMBER = "moments.npy"  # a latent cache's float32 .npy array (radiodiff.data.latents)


@dataclass(frozen=True)
class SampleFormat:
    """The member types a shard set's samples may hold (in tar order) and those each must hold."""

    members: tuple[str, ...]
    required: tuple[str, ...]


IMAGE_SAMPLES = SampleFormat(MEMBERS, ("buildings.png", "tx.png", "gain.png", "json"))
LATENT_SAMPLES = SampleFormat(("buildings.png", "tx.png", "cars.png", "json", MOMENTS_MEMBER),
                              ("buildings.png", "tx.png", "json", MOMENTS_MEMBER))


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


def check_antenna(tx: np.ndarray, where: str) -> tuple[int, int]:
    """The (row, col) of the transmitter: the one 255 pixel of an antenna map (the sharder and
    radiodiff-sample both read positions through this). Raises DataFormatError naming ``where``."""
    rows, cols = np.nonzero(tx == 255)
    if len(rows) != 1:
        found = ", ".join(f"({r}, {c})" for r, c in zip(rows[:3].tolist(), cols[:3].tolist()))
        more = ", ..." if len(rows) > 3 else ""
        raise DataFormatError(f"{where}: expected exactly one transmitter pixel (value 255), found "
                              f"{len(rows)}{f' at {found}{more}' if len(rows) else ''}")
    return int(rows[0]), int(cols[0])


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


def resize_cond(cond: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(B, 3, 256, 256) condition, already in value range -> image_size.

    Binary maps resize nearest, or when shrinking with ``data.cond_resize=area`` to each output
    pixel's mean: the share of it that buildings (or cars) cover, where nearest keeps one native
    pixel of it (its first row and column: a quarter of a 4-pixel block off centre). The transmitter
    is one pixel: nearest sampling would drop it at most positions, so shrinking keeps it with a max
    over each output pixel's area.
    """
    size = cfg.image_size
    if size == NATIVE_SIZE:
        return cond
    if size < NATIVE_SIZE and cfg.cond_resize == "area":
        resized = F.adaptive_avg_pool2d(cond, size)
    else:
        resized = F.interpolate(cond, size=(size, size), mode="nearest")
    if size < NATIVE_SIZE:
        resized[:, 1:2] = F.adaptive_max_pool2d(cond[:, 1:2], size)
    return resized


def resize_target(target: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(B, 1, 256, 256) gain map, already in value range -> image_size, bilinear (antialiased)."""
    size = cfg.image_size
    if size == NATIVE_SIZE:
        return target
    low = -1.0 if cfg.value_range == "symmetric" else 0.0
    target = F.interpolate(target, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return target.clamp(low, 1.0)


def resize_maps(cond: torch.Tensor, target: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 256, 256) condition and (B, 1, 256, 256) target, already in value range -> image_size."""
    return resize_cond(cond, cfg), resize_target(target, cfg)


def _gray_to_values(raw: np.ndarray, symmetric: bool, threshold: float | None) -> np.ndarray:
    """uint8 gray levels -> float32: /255, the optional threshold, then [-1, 1] if symmetric.

    In place on one float32 copy: several times faster than a table lookup on a batch (this runs
    in the data loader's main process for every batch).
    """
    values = raw.astype(np.float32)
    np.divide(values, np.float32(255.0), out=values)
    if threshold is not None:  # RadioUNet: (max(g, t) - t) / (1 - t)
        np.maximum(values, np.float32(threshold), out=values)
        np.subtract(values, np.float32(threshold), out=values)
        np.divide(values, np.float32(1.0 - threshold), out=values)
    if symmetric:
        np.multiply(values, np.float32(2.0), out=values)
        np.subtract(values, np.float32(1.0), out=values)
    return values


def stack_cond(buildings: np.ndarray, tx: np.ndarray, cars: np.ndarray | None, cfg: DataConfig) -> np.ndarray:
    """uint8 maps -> the uint8 condition (3,H,W) = [buildings, tx, cars or buildings]."""
    third = cars if cfg.cars_input else buildings
    if third is None:
        raise DataFormatError("data.cars_input=true but the sample has no cars map")
    return np.stack([buildings, tx, third])


def stack_maps(
    buildings: np.ndarray, tx: np.ndarray, gain: np.ndarray, cars: np.ndarray | None, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 maps -> uint8 (cond (3,H,W) = [buildings, tx, cars or buildings], target (1,H,W))."""
    return stack_cond(buildings, tx, cars, cfg), gain[None]


def cond_values(cond: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (B, 3, 256, 256) condition -> float32 at ``data.image_size`` ([0,1] or [-1,1], resized)."""
    symmetric = cfg.value_range == "symmetric"
    raw = cond.numpy()
    if cfg.cars_input:
        values = _gray_to_values(raw, symmetric, None)
    else:  # the third channel is the buildings again: convert two channels, copy the first
        values = np.empty(raw.shape, np.float32)
        values[:, :2] = _gray_to_values(raw[:, :2], symmetric, None)
        values[:, 2] = values[:, 0]
    return resize_cond(torch.from_numpy(values), cfg)


def target_values(target: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (B, 1, 256, 256) gain map -> float32 at ``data.image_size`` (with the optional threshold)."""
    values = _gray_to_values(target.numpy(), cfg.value_range == "symmetric", cfg.threshold)
    return resize_target(torch.from_numpy(values), cfg)


def to_values(cond: torch.Tensor, target: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, 256, 256) condition and (B, 1, 256, 256) target -> float32 at ``data.image_size``.

    Per pixel ([0,1] or [-1,1], the optional threshold on the target), then resized. Each sample's
    values depend on that sample only, so the latent cache encodes exactly what training sees.
    Done once per batch: the shard reader's workers send uint8 maps, a quarter of the bytes.
    """
    return cond_values(cond, cfg), target_values(target, cfg)


def to_tensors(
    buildings: np.ndarray, tx: np.ndarray, gain: np.ndarray, cars: np.ndarray | None, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 maps -> (cond (3,H,W), target (1,H,W)) float32, per the options in ``cfg``."""
    cond, target = stack_maps(buildings, tx, gain, cars, cfg)
    cond, target = to_values(torch.from_numpy(cond)[None], torch.from_numpy(target)[None], cfg)
    return cond[0], target[0]


def check_members(members: Mapping[str, bytes], fmt: SampleFormat, prefix: str) -> None:
    """Only ``fmt``'s member types, and every one it requires."""
    unknown = sorted(set(members) - set(fmt.members))
    if unknown:
        raise DataFormatError(f"{prefix}: unexpected member types {unknown}; allowed: {list(fmt.members)}")
    for name in fmt.required:
        if name not in members:
            raise DataFormatError(f"{prefix}: member {name} is missing")


def decode_pngs(members: Mapping[str, bytes], where: Mapping[str, str],
                map_cache: dict[bytes, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The sample's PNG members -> (H, W) uint8 maps; per-map members through ``map_cache``."""
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
    return arrays


def sample_fields(record: dict) -> dict:
    """key, map and tx of a sample from its JSON record."""
    return {"key": f"{record['map']}_{record['tx']}", "map": int(record["map"]), "tx": int(record["tx"])}


def decode_members(
    members: dict[str, bytes],
    cfg: DataConfig,
    where: str | Mapping[str, str],
    *,
    map_cache: dict[bytes, np.ndarray] | None = None,
    raw: bool = False,
) -> dict:
    """Raw members of one sample (``buildings.png`` ... ``json``) -> the in-memory sample dict.

    ``where`` names the sample in errors: a prefix (a shard and key) or, per member, its source file.
    ``map_cache`` (PNG bytes -> decoded map) lets a reader decode the per-map members (buildings,
    cars), which all transmitters of a map share, once instead of once per sample. ``raw``: the
    maps stay uint8 (``cond_u8``, ``target_u8``; ``to_values`` finishes them, per batch).
    """
    if isinstance(where, str):
        prefix = where
        where = {name: f"{prefix}.{name}" for name in MEMBERS}
    else:
        prefix = where.get("json", next(iter(where.values())))
    check_members(members, IMAGE_SAMPLES, prefix)
    record = decode_json(members["json"], where.get("json", f"{prefix} (json)"))
    arrays = decode_pngs(members, where, map_cache)
    maps = (arrays["buildings.png"], arrays["tx.png"], arrays["gain.png"], arrays.get("cars.png"))
    sample = sample_fields(record)
    if raw:
        cond, target = stack_maps(*maps, cfg)
        return {**sample, "cond_u8": torch.from_numpy(cond), "target_u8": torch.from_numpy(target)}
    cond, target = to_tensors(*maps, cfg)
    return {**sample, "cond": cond, "target": target}
