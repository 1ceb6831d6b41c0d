"""The latent cache: a shard set's posterior moments under the frozen VAE, in shards of their own.

``radiodiff-encode`` writes, for every shard of a source shard set, one cache shard at the same
relative path (``{split}/{split}-000000.tar`` ...) holding the same samples in the same order. A
cache sample keeps the source's condition PNGs and JSON record unchanged (so its condition decodes
to exactly the image shards' one) and replaces ``gain.png`` with ``moments.npy``: the posterior
q(z | x) of the target, (2Z, h, w) float32, the mean then the log-variance along the first axis
(what :class:`radiodiff.models.autoencoder.DiagonalGaussian` takes). ``.npy`` members are read with
``allow_pickle=False`` after their header was checked; nothing is unpickled.

``{cache}/manifest.json`` (format ``radiodiff-latents``) follows the shard manifest's conventions
(``splits`` with every shard's ``path``, ``num_samples``, ``bytes``, ``sha256`` and ``plan``; each
entry also holds its source shard's ``source_sha256``) and records what made the cache:
``moments`` (member, dtype, shape, order), ``vae`` (the checkpoint: run directory, folder, step and
the sha256 of its autoencoder weights as committed), ``data`` (the settings that shape the maps:
``CACHE_DATA_KEYS``) and ``source`` (root, and the identity of every split).

Since the cache's shards mirror the source's, a split's sample stream (``shard_stream``) is the
same in both: a cache loader reports the source split's identity, so a run may resume with or
without the cache at the same data position.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.manifest import (
    ManifestKind,
    ShardInfo,
    join_url,
    manifest_identity,
    read_manifest,
    split_shards,
)
from radiodiff.data.schema import (
    LATENT_SAMPLES,
    MOMENTS_MEMBER,
    PNG_MEMBERS,
    DataFormatError,
    check_members,
    decode_json,
    decode_members,
    decode_pngs,
    sample_fields,
    stack_cond,
    target_values,
)
from radiodiff.data.shard_format import write_tar
from radiodiff.data.shard_source import iter_tar

LATENT_MANIFEST = ManifestKind("radiodiff-latents", 1, "latent cache manifest", "data.latents")
MOMENTS_DTYPE = np.dtype("<f4")  # float32, little-endian: what a cache stores and what is accepted
NPY_MAGIC = b"\x93NUMPY"
# Data settings the cached moments and conditions depend on: a run must use the cache's values.
CACHE_DATA_KEYS = ("value_range", "threshold", "image_size", "cars_input", "simulation")
CARRIED_MEMBERS = ("buildings.png", "tx.png", "cars.png", "json")  # copied unchanged from the source


def encode_moments(moments: np.ndarray) -> bytes:
    """One sample's (2Z, h, w) posterior moments -> the bytes of a float32 ``.npy`` member."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(moments, dtype=MOMENTS_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def decode_moments(data: bytes, where: str, shape: tuple[int, ...]) -> np.ndarray:
    """A ``moments.npy`` member -> float32 ``shape``. The header is checked before any value is
    read, and the values are read with ``allow_pickle=False``: an object array is refused, never loaded."""
    stream = io.BytesIO(data)
    try:
        if not data.startswith(NPY_MAGIC):
            raise ValueError("not a .npy array")
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy version {version} is not supported")
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found, fortran, dtype = header(stream)
        if dtype != MOMENTS_DTYPE or tuple(found) != tuple(shape) or fortran:
            raise ValueError(f"expected a C-ordered float32 array of shape {tuple(shape)}, found {dtype} "
                             f"{tuple(found)}{' in Fortran order' if fortran else ''}")
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise DataFormatError(f"{where}: cannot read the moments ({err})") from err
    return array


def decode_latent_members(members: dict[str, bytes], cfg: DataConfig, prefix: str, moments_shape: tuple[int, ...],
                          *, map_cache: dict[bytes, np.ndarray] | None = None) -> dict:
    """Raw members of one cache sample -> key, map, tx, ``cond_u8`` uint8 (3, 256, 256)
    (``schema.cond_values`` finishes it, per batch) and ``moments`` float32 ``moments_shape``."""
    check_members(members, LATENT_SAMPLES, prefix)
    record = decode_json(members["json"], f"{prefix}.json")
    arrays = decode_pngs(members, {name: f"{prefix}.{name}" for name in PNG_MEMBERS}, map_cache)
    cond = stack_cond(arrays["buildings.png"], arrays["tx.png"], arrays.get("cars.png"), cfg)
    moments = decode_moments(members[MOMENTS_MEMBER], f"{prefix}.{MOMENTS_MEMBER}", moments_shape)
    return {**sample_fields(record), "cond_u8": torch.from_numpy(cond), "moments": torch.from_numpy(moments)}


def encode_shard(data: bytes, where: str, cfg: DataConfig, encode: Callable[[torch.Tensor], torch.Tensor], *,
                 batch_size: int) -> tuple[bytes, int]:
    """A source shard's bytes -> (its cache shard's bytes, the sample count): the same samples in
    the same order. ``encode`` maps (B, 1, H, W) float32 targets, made exactly as the training
    reader makes them from ``cfg``, to their (B, 2Z, h, w) float32 posterior moments."""
    samples = list(iter_tar(data, where))
    map_cache: dict[bytes, np.ndarray] = {}
    written = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        targets = []
        for key, members in chunk:
            sample = decode_members(members, cfg, f"{where}:{key}", map_cache=map_cache, raw=True)
            if sample["key"] != key:
                raise DataFormatError(f"{where}: sample {key} has a JSON record for {sample['key']}")
            targets.append(sample["target_u8"])
        moments = encode(target_values(torch.stack(targets), cfg)).float().cpu().numpy()  # (B, 2Z, h, w)
        for (key, members), sample_moments in zip(chunk, moments):
            carried = {name: members[name] for name in CARRIED_MEMBERS if name in members}
            written.append((key, {**carried, MOMENTS_MEMBER: encode_moments(sample_moments)}))
    return write_tar(written, LATENT_SAMPLES), len(written)


def cache_data(data: DataConfig) -> dict:
    """The data settings a cache records (``CACHE_DATA_KEYS``)."""
    return {key: getattr(data, key) for key in CACHE_DATA_KEYS}


def source_identities(manifest: dict, root: str) -> dict[str, str]:
    """Split -> the identity of a shard set's split (``manifest_identity``)."""
    return {split: manifest_identity(split_shards(manifest, split, root)) for split in manifest["splits"]}


def build_latent_manifest(*, moments_shape: tuple[int, ...], vae: dict, data: dict, source_root: str, source: dict,
                          shards: list[tuple[str, dict]]) -> dict:
    """The cache's manifest: ``shards`` are (split, entry) pairs in the source's order."""
    splits: dict[str, dict] = {}
    for split, entry in shards:
        record = splits.setdefault(split, {"num_samples": 0, "maps": source["splits"][split].get("maps", []),
                                           "shards": []})
        record["num_samples"] += entry["num_samples"]
        record["shards"].append(entry)
    return {"format": LATENT_MANIFEST.format, "version": LATENT_MANIFEST.version,
            "moments": {"member": MOMENTS_MEMBER, "dtype": "float32", "shape": list(moments_shape),
                        "order": "mean, then log-variance, along the first axis"},
            "vae": vae, "data": data,
            "source": {"root": source_root, "identity": source_identities(source, source_root)},
            "splits": splits}


def read_latent_manifest(root: str) -> dict:
    """Read and check ``{root}/manifest.json`` of a latent cache; raises DataFormatError naming it."""
    manifest = read_manifest(root, LATENT_MANIFEST)
    url = join_url(root, "manifest.json")
    missing = [name for name in ("moments", "vae", "data", "source") if not isinstance(manifest.get(name), dict)]
    if missing:
        raise DataFormatError(f"{url}: the latent cache manifest lacks {', '.join(missing)}")
    shape = manifest["moments"].get("shape")
    if manifest["moments"].get("dtype") != "float32" or not (
            isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise DataFormatError(f"{url}: moments must be float32 of a (2Z, h, w) shape, found {manifest['moments']!r}")
    return manifest


@dataclass(frozen=True)
class CacheSplit:
    """A split of a latent cache as the reader needs it."""

    shards: list[ShardInfo]
    identity: str  # the source split's identity: the two streams are the same
    moments_shape: tuple[int, ...]


def open_cache_split(cfg: DataConfig, split: str) -> CacheSplit:
    """The split of the cache at ``cfg.latents``, refused when made with other data settings than ``cfg``'s."""
    assert cfg.latents is not None
    manifest = read_latent_manifest(cfg.latents)
    check_cache_data(manifest, cfg)
    shards = split_shards(manifest, split, cfg.latents)
    entries = manifest["splits"][split]["shards"]
    source = [ShardInfo(s.index, s.path, s.num_samples, entry.get("source_sha256"))
              for s, entry in zip(shards, entries)]
    return CacheSplit(shards, manifest_identity(source), tuple(manifest["moments"]["shape"]))


def check_cache_data(manifest: dict, data: DataConfig) -> None:
    """The run's data settings must be those the cache was encoded with; the error names both."""
    for key in CACHE_DATA_KEYS:
        mine, theirs = getattr(data, key), manifest["data"].get(key)
        if mine != theirs:
            raise ConfigError(f"data.{key}={mine!r} but data.latents={data.latents} was encoded with "
                              f"{key}={theirs!r} ({join_url(str(data.latents), 'manifest.json')}); set "
                              f"data.{key}={theirs!r} or encode a cache for {mine!r}")
