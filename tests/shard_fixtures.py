"""Test helper: small shard roots in the format ``radiodiff-shard`` writes (see the README's shard format).

Samples get keys ``{map}_{tx}`` numbered across all splits, with PIL-made 256x256 mode-L PNGs
(random binary buildings, a one-pixel transmitter, random gain). Roots may be local folders or any
fsspec URL (``memory://...`` included).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Optional

import fsspec
import numpy as np
from PIL import Image

from radiodiff.data.schema import NATIVE_SIZE

NUM_TX = 4  # transmitters per synthetic map: sample n is map n // NUM_TX, tx n % NUM_TX


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample(number: int, rng: np.random.Generator, *, split: str = "train", cars: bool = False,
                simulation: str = "DPM") -> tuple[str, dict[str, bytes]]:
    """One sample's members: key and {member type: bytes}."""
    map_id, tx_id = divmod(number, NUM_TX)
    size = (NATIVE_SIZE, NATIVE_SIZE)
    buildings = (rng.random(size) < 0.3).astype(np.uint8) * 255  # (H, W)
    row, col = (int(v) for v in rng.integers(0, NATIVE_SIZE, 2))
    tx = np.zeros(size, np.uint8)
    tx[row, col] = 255
    gain = rng.integers(0, 256, size, dtype=np.uint8)
    record = {"map": map_id, "tx": tx_id, "split": split, "simulation": simulation,
              "buildings": "complete", "tx_row": row, "tx_col": col}
    members = {"buildings.png": png_bytes(buildings), "tx.png": png_bytes(tx),
               "gain.png": png_bytes(gain), "json": json.dumps(record, sort_keys=True).encode()}
    if cars:
        members["cars.png"] = png_bytes((rng.random(size) < 0.05).astype(np.uint8) * 255)
    return f"{map_id}_{tx_id}", members


def make_tar(samples: list[tuple[str, dict[str, bytes]]],
             extra: Optional[list[tuple[str, bytes]]] = None) -> bytes:
    """A plain POSIX tar of the samples' members, each sample's adjacent; ``extra`` members go last."""
    buffer = io.BytesIO()
    entries = [(f"{key}.{kind}", data) for key, members in samples for kind, data in members.items()]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in entries + list(extra or []):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_bytes(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb", auto_mkdir=True) as stream:
        stream.write(data)


def write_shards(root: str, shard_sizes: dict[str, list[int]], *, seed: int = 0, cars: bool = False,
                 simulation: str = "DPM") -> tuple[dict, dict[str, dict[str, bytes]]]:
    """Write ``shard_sizes[split][i]`` samples into shard i of each split, plus manifest.json.

    Returns the manifest and every sample's members by key, in the order written.
    """
    rng = np.random.default_rng(seed)
    root = root.rstrip("/")
    members_by_key: dict[str, dict[str, bytes]] = {}
    splits: dict[str, dict] = {}
    number = 0
    for split, sizes in shard_sizes.items():
        entries, maps = [], set()
        for i, size in enumerate(sizes):
            samples = []
            for _ in range(size):
                samples.append(make_sample(number, rng, split=split, cars=cars, simulation=simulation))
                maps.add(number // NUM_TX)
                number += 1
            data = make_tar(samples)
            path = f"{split}/{split}-{i:06d}.tar"
            write_bytes(f"{root}/{path}", data)
            members_by_key.update(samples)
            entries.append({"path": path, "num_samples": size, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"num_samples": sum(sizes), "maps": sorted(maps), "shards": entries}
    manifest = {"format": "radiodiff-shards", "version": 1, "protocol": "radiounet", "split_seed": 42,
                "simulation": simulation, "buildings": "complete", "cars": cars,
                "source_root": "synthetic", "splits": splits, "skipped": []}
    write_bytes(f"{root}/manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest, members_by_key
