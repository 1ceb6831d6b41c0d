"""Worker side of the shard reader: manifest, tar parsing, shard plan and the per-slot sample stream.

A shard root (a folder or any fsspec URL) holds ``manifest.json`` and ``{split}/{split}-000000.tar``
... written by ``radiodiff-shard``. Each tar holds, per sample ``{map}_{tx}``, the adjacent members
``{key}.buildings.png``, ``{key}.tx.png``, ``{key}.gain.png``, optionally ``{key}.cars.png``, and
``{key}.json``. Only those member types are accepted; nothing is ever unpickled.

Slots. Every (rank, data-loader worker) pair is a *slot*: ``num_slots = world_size * max(num_workers, 1)``
and the global slot id is ``rank * max(num_workers, 1) + worker``. In epoch ``e`` the split's shards
are permuted with an RNG seeded from ``(seed, e)`` and slot ``s`` reads ``perm[s::num_slots]``, one
shard at a time, fully into memory, its samples permuted with an RNG seeded from
``(seed, e, shard index)``. A slot's *position* counts the samples it has produced since the start,
across epochs; :meth:`SlotPlan.locate` turns a position into (epoch, shard, offset) from the
manifest's per-shard sample counts alone, which is what makes a resume cheap and exact.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from typing import Iterator, Optional

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from radiodiff.config import DataConfig
from radiodiff.data.manifest import ShardInfo, join_url, read_bytes
from radiodiff.data.schema import MEMBERS, DataFormatError, decode_members

REQUIRED_MEMBERS = ("buildings.png", "tx.png", "gain.png", "json")
# Tags keep the two RNG streams apart: SeedSequence pads short entropy with zeros, so without
# them (seed, e) and (seed, e, 0) would seed the same generator.
_SHARD_ORDER_TAG = 0x5348
_SAMPLE_ORDER_TAG = 0x534D

# One sample inside a shard's bytes: key and {member type: (start, end)} byte spans.
TarIndex = list[tuple[str, dict[str, tuple[int, int]]]]


def index_tar(data: bytes, where: str) -> TarIndex:
    """Parse a shard held in memory into per-sample byte spans, checking every member."""
    index: TarIndex = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for info in archive:
                key, kind = _check_member(info, len(data), where)
                if not index or index[-1][0] != key:
                    if key in seen:
                        raise DataFormatError(f"{where}: members of sample {key} are not adjacent")
                    seen.add(key)
                    index.append((key, {}))
                spans = index[-1][1]
                if kind in spans:
                    raise DataFormatError(f"{where}: member {info.name} appears twice")
                spans[kind] = (info.offset_data, info.offset_data + info.size)
    except (tarfile.TarError, EOFError) as err:
        raise DataFormatError(f"{where}: not a readable tar file ({type(err).__name__}: {err})") from err
    for key, spans in index:
        missing = [kind for kind in REQUIRED_MEMBERS if kind not in spans]
        if missing:
            raise DataFormatError(f"{where}: sample {key} lacks member(s) {', '.join(missing)}")
    return index


def _check_member(info: tarfile.TarInfo, size: int, where: str) -> tuple[str, str]:
    if not info.isreg():
        raise DataFormatError(f"{where}: member {info.name!r} is not a regular file")
    key, _, kind = posixpath.basename(info.name).partition(".")
    if not key or kind not in MEMBERS:
        raise DataFormatError(f"{where}: member {info.name!r} is not an accepted member type; "
                              f"allowed: {', '.join(MEMBERS)}")
    if info.offset_data + info.size > size:
        raise DataFormatError(f"{where}: member {info.name!r} is truncated")
    return key, kind


def iter_tar(data: bytes, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard held in memory: (key, {member type: bytes}), in tar order."""
    for key, spans in index_tar(data, where):
        yield key, {kind: data[start:end] for kind, (start, end) in spans.items()}


def fetch_shard(root: str, shard: ShardInfo, *, verify: bool = True) -> bytes:
    """Read one whole shard; with ``verify`` its size and sha256 are checked against the manifest."""
    url = join_url(root, shard.path)
    data = read_bytes(url, "shard")
    if verify and shard.num_bytes is not None and len(data) != shard.num_bytes:
        raise DataFormatError(f"{url}: shard has {len(data)} bytes, the manifest says {shard.num_bytes}")
    if verify and shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataFormatError(f"{url}: shard sha256 does not match the manifest (corrupt or replaced)")
    return data


class SlotPlan:
    """Which shards each slot reads in each epoch, and where a slot position lies; reads no data."""

    def __init__(self, shards: list[ShardInfo], *, num_slots: int, seed: int, shuffle: bool,
                 epochs: Optional[int]) -> None:
        # Empty shards contribute nothing and would leave a slot with nothing to read.
        self.shards = [s for s in shards if s.num_samples > 0]
        self.num_slots = num_slots
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self._sizes: dict[tuple[int, int], int] = {}

    def shards_of(self, slot: int, epoch: int) -> list[ShardInfo]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([_SHARD_ORDER_TAG, self.seed, epoch]).permutation(order)
        return [self.shards[i] for i in order[slot::self.num_slots]]

    def slot_size(self, slot: int, epoch: int) -> int:
        """Samples slot ``slot`` produces in epoch ``epoch``."""
        if (slot, epoch) not in self._sizes:
            self._sizes[slot, epoch] = sum(s.num_samples for s in self.shards_of(slot, epoch))
        return self._sizes[slot, epoch]

    def slot_total(self, slot: int) -> Optional[int]:
        """Samples a slot produces over all epochs; None for an endless stream."""
        if self.epochs is None:
            return None
        return sum(self.slot_size(slot, e) for e in range(self.epochs))

    def locate(self, slot: int, pos: int) -> Optional[tuple[int, int, int]]:
        """Position -> (epoch, shard number within the slot's epoch, sample offset); None past the end."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            size = self.slot_size(slot, epoch)
            if pos < size:
                for k, shard in enumerate(self.shards_of(slot, epoch)):
                    if pos < shard.num_samples:
                        return epoch, k, pos
                    pos -= shard.num_samples
            pos -= size
            epoch += 1
        return None

    def sample_order(self, shard: ShardInfo, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(shard.num_samples)
        rng = np.random.default_rng([_SAMPLE_ORDER_TAG, self.seed, epoch, shard.index])
        return rng.permutation(shard.num_samples)


class ShardStream(IterableDataset):
    """The samples of one rank's slots; each data-loader worker (or the main process) plays one slot.

    ``start_positions[j]`` is where local slot ``j`` starts and physical worker ``w`` plays local
    slot ``(w + rotation) % slots_per_rank``; the consumer side sets both before each pass.
    Yields ``schema.decode_members(raw=True)`` dicts (uint8 maps, finished per batch by the loader)
    plus ``slot`` (global slot id) and ``pos``.
    """

    def __init__(self, cfg: DataConfig, root: str, plan: SlotPlan, *, rank: int, num_workers: int,
                 verify: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.root = root
        self.plan = plan
        self.rank = rank
        self.num_workers = num_workers
        self.slots_per_rank = max(num_workers, 1)
        self.verify = verify
        self.start_positions = [0] * self.slots_per_rank
        self.rotation = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.slots_per_rank:
            raise RuntimeError(f"ShardStream built for {self.num_workers} workers runs in a loader "
                               f"with {workers}; build the DataLoader through ShardLoader")
        local = (worker + self.rotation) % self.slots_per_rank
        slot = self.rank * self.slots_per_rank + local
        return self.iter_slot(slot, self.start_positions[local])

    def iter_slot(self, slot: int, start: int) -> Iterator[dict]:
        located = self.plan.locate(slot, start)
        if located is None:
            return
        epoch, first_shard, offset = located
        pos = start
        while self.plan.epochs is None or epoch < self.plan.epochs:
            for shard in self.plan.shards_of(slot, epoch)[first_shard:]:
                for sample in self._read_shard(shard, epoch, offset):
                    sample["slot"] = slot
                    sample["pos"] = pos
                    pos += 1
                    yield sample
                offset = 0
            first_shard = 0
            epoch += 1

    def _read_shard(self, shard: ShardInfo, epoch: int, skip: int) -> Iterator[dict]:
        url = join_url(self.root, shard.path)
        data = fetch_shard(self.root, shard, verify=self.verify)
        index = index_tar(data, url)
        if len(index) != shard.num_samples:
            raise DataFormatError(f"{url}: shard holds {len(index)} samples, the manifest says "
                                  f"{shard.num_samples}")
        map_cache: dict[bytes, np.ndarray] = {}  # a shard holds a few samples of each of its maps
        # Skipping happens on the index, so a resume mid-shard decodes no skipped sample.
        for i in self.plan.sample_order(shard, epoch)[skip:]:
            key, spans = index[i]
            members = {kind: data[start:end] for kind, (start, end) in spans.items()}
            sample = decode_members(members, self.cfg, f"{url}:{key}", map_cache=map_cache, raw=True)
            if sample["key"] != key:
                raise DataFormatError(f"{url}: sample {key} has a JSON record for {sample['key']}")
            yield sample
