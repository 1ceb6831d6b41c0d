"""The shard set's manifest: its constants, reading and checking, identity, summary and building.

``{root}/manifest.json`` (written last by ``radiodiff-shard``) is what makes a shard set valid. It
holds ``format``, ``version``, the source settings (``protocol``, ``split_seed``, ``simulation``,
``buildings``, ``cars``, ``num_tx``), ``source_root``, ``order_seed``, ``splits`` (per split:
``num_samples``, ``maps``, ``shards`` with ``path``, ``num_samples``, ``bytes``, ``sha256``, ``plan``)
and ``skipped`` (the bad source files left out). The sharder, the reader and
``tools/inspect_shards.py`` all go through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import fsspec

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.schema import DataFormatError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "radiodiff-shards"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ManifestKind:
    """Which kind of shard set a root must hold: its manifest's format and version, named in errors."""

    format: str
    version: int
    what: str  # "shard manifest"
    key: str  # the config key that names the root


SHARD_MANIFEST = ManifestKind(FORMAT_NAME, FORMAT_VERSION, "shard manifest", "data.shards")


def join_url(root: str, relative: str) -> str:
    return root.rstrip("/") + "/" + relative.lstrip("/")


def read_bytes(url: str, what: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise DataFormatError(f"{url}: {what} not found") from err
    except OSError as err:
        raise DataFormatError(f"{url}: cannot read {what} ({type(err).__name__}: {err})") from err


def _check_split_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
        raise DataFormatError(f"{where}: expected an object with a 'shards' list")
    for i, shard in enumerate(entry["shards"]):
        ok = (isinstance(shard, dict) and isinstance(shard.get("path"), str) and shard["path"]
              and not shard["path"].startswith("/") and ".." not in shard["path"].split("/")
              and isinstance(shard.get("num_samples"), int) and shard["num_samples"] >= 0)
        if not ok:
            raise DataFormatError(
                f"{where}.shards[{i}]: expected {{'path': relative path, 'num_samples': int >= 0, ...}}, "
                f"found {shard!r}"
            )


def read_manifest(root: str, kind: ManifestKind = SHARD_MANIFEST) -> dict:
    """Read and check ``{root}/manifest.json`` (of a shard set, or another ``kind``); raises
    DataFormatError naming the URL."""
    url = join_url(root, MANIFEST_NAME)
    raw = read_bytes(url, f"{kind.what} ({kind.key} must be the folder or URL holding it)")
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{url}: {kind.what} is not valid JSON ({err})") from err
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != kind.format:
        raise DataFormatError(f"{url}: not a radiodiff {kind.what} (format {found!r}, expected "
                              f"{kind.format!r})")
    if manifest.get("version") != kind.version:
        raise DataFormatError(f"{url}: manifest version {manifest.get('version')!r} is not supported "
                              f"(this reader reads version {kind.version})")
    if not isinstance(manifest.get("splits"), dict):
        raise DataFormatError(f"{url}: manifest lacks the 'splits' object")
    for name, entry in manifest["splits"].items():
        _check_split_entry(entry, f"{url}: splits.{name}")
    return manifest


@dataclass(frozen=True)
class ShardInfo:
    index: int  # position in the manifest's shard list of the split (seeds the sample order)
    path: str  # relative to the root
    num_samples: int
    sha256: Optional[str] = None
    num_bytes: Optional[int] = None


def split_shards(manifest: dict, split: str, root: str) -> list[ShardInfo]:
    splits = manifest["splits"]
    if split not in splits:
        raise DataFormatError(f"{join_url(root, MANIFEST_NAME)}: no split {split!r}; the shards "
                              f"hold {', '.join(sorted(splits)) or 'no splits'}")
    return [ShardInfo(i, s["path"], s["num_samples"], s.get("sha256"), s.get("bytes"))
            for i, s in enumerate(splits[split]["shards"])]


def manifest_identity(shards: list[ShardInfo]) -> str:
    """A hash of a split's shard list: a state is only valid for the shards it was taken on."""
    listing = [[s.path, s.num_samples, s.sha256] for s in shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def check_manifest_options(manifest: dict, cfg: DataConfig) -> None:
    """The shards must hold what the config asks for: the gain simulation and, if used, cars."""
    where = f"{cfg.shards}/manifest.json"
    if manifest.get("simulation", cfg.simulation) != cfg.simulation:
        raise ConfigError(f"data.simulation={cfg.simulation} but {where} holds simulation "
                          f"{manifest['simulation']}; set data.simulation or re-shard")
    if cfg.cars_input and manifest.get("cars") is False:
        raise ConfigError(f"data.cars_input=true but {where} was written without cars maps")


def plan_digest(settings: dict, keys: list[str]) -> str:
    """Identity of a shard's planned content: the source settings and the ordered sample keys."""
    return hashlib.sha256(json.dumps({"settings": settings, "keys": keys}, sort_keys=True).encode()).hexdigest()


def manifest_summary(manifest: dict) -> list[str]:
    """Lines describing a shard set: settings, then maps, samples, shards and size per split."""
    lines = [f"protocol {manifest['protocol']} (split seed {manifest['split_seed']}), simulation "
             f"{manifest['simulation']}, buildings {manifest['buildings']}, cars {manifest['cars']}, "
             f"source {manifest['source_root']}"]
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"]) / 1e6
        lines.append(f"  {split:5s} {len(entry['maps']):4d} maps {entry['num_samples']:7d} samples "
                     f"{len(entry['shards']):4d} shards {size:10.1f} MB")
    if manifest["skipped"]:
        lines.append(f"  skipped {len(manifest['skipped'])} bad source files (listed in manifest.json):")
        lines += [f"    {bad['path']}: {bad['error']}" for bad in manifest["skipped"]]
    return lines


def build_manifest(settings: dict, *, source_root: str, order_seed: int, split_maps: dict[str, list[int]],
                   shards: list[tuple[str, dict]], skipped: list[dict]) -> dict:
    """The manifest of a shard set: ``shards`` are (split, entry) pairs in plan order."""
    splits: dict[str, dict] = {}
    for split, entry in shards:
        record = splits.setdefault(split, {"num_samples": 0, "maps": split_maps[split], "shards": []})
        record["num_samples"] += entry["num_samples"]
        record["shards"].append(entry)
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **settings, "source_root": source_root,
            "order_seed": order_seed, "splits": splits, "skipped": skipped}
