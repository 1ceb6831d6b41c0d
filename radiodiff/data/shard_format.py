"""Writing the shard format: deterministic WebDataset tars and the manifest's shard entries.

A shard is a plain POSIX tar of samples, each sample's members adjacent and named
``{key}.{member}`` (see ``schema.MEMBERS``). Tar headers carry no time, owner or mode variation,
so the same samples always produce the same bytes and the same sha256: a re-run can tell an
intact shard from a stale or corrupt one by its checksum alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Iterable

from radiodiff.data.schema import MEMBERS

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "radiodiff-shards"
FORMAT_VERSION = 1


def shard_path(split: str, index: int) -> str:
    """Path of a shard relative to the shard root."""
    return f"{split}/{split}-{index:06d}.tar"


def write_tar(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """(key, members) pairs -> tar bytes; members in the fixed order of ``schema.MEMBERS``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for member in MEMBERS:
                if member not in members:
                    continue
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(members[member])
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(members[member]))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plan_digest(settings: dict, keys: list[str]) -> str:
    """Identity of a shard's planned content: the source settings and the ordered sample keys."""
    return sha256(json.dumps({"settings": settings, "keys": keys}, sort_keys=True).encode())


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
