"""Worker side of the shard reader: the global sample stream, one rank's micro-batches, decoding.

The stream. In epoch ``e`` a split's non-empty shards are permuted with an RNG seeded from
``(seed, e)`` (when shuffling), each shard's samples with an RNG seeded from ``(seed, e, shard
index)``, and the shards' samples concatenated; the epochs are concatenated into ONE continuous
stream of positions 0, 1, 2, ... (position ``p`` lies in epoch ``p // N``, N the split's sample
count). It is endless for training; with ``epochs=E`` it ends at ``E * N``. It depends on the seed,
the epoch and the manifest only: never on the world size, the worker count or the batch size.

Chunks. Rank ``r`` of ``W`` with micro batch ``m``, started (or restored) at position ``start``,
gets as its k-th micro-batch the positions ``start + (k*W + r)*m`` up to ``+ m``. So global batch
``s`` of an update with grad_accum ``A`` is positions ``[start + s*A*W*m, start + (s+1)*A*W*m)``,
and each rank's micro-batches within it are fixed slices of it.

Remainder rule. Chunks tile the stream without gaps or overlaps and ignore shard and epoch
boundaries: a micro-batch may straddle a shard boundary, or an epoch boundary (it then holds the
last samples of epoch e and the first of e+1). So within each epoch every sample is delivered
exactly once across all ranks and nothing is dropped; no epoch is padded. A finite stream ends
mid-chunk: its last chunks are partial or absent, so a rank may get fewer samples or none at all
(callers reduce sums and counts); ``drop_last`` drops the partial micro-batches instead.

Workers. With ``n > 0`` data-loader workers, worker ``w`` builds (reads, decodes, collates) the
micro-batches ``k = w, w+n, w+2n, ...``; a DataLoader with ``batch_size=None`` cycles its workers
in order, so it hands them out as ``k = 0, 1, 2, ...``. ``num_workers=0`` does the same in the main
process. A worker keeps its last two shards in memory (bytes and tar index; a micro-batch may
straddle two) and fetches the next shard it will need in a background thread, so that a rank does
not stall at shard boundaries. A worker reads every shard that holds one of its samples, once per
epoch: at most the whole split per epoch (the whole split when shards are larger than the stride
``n * W * m``). Shard files, caching and byte counts: ``shard_source``.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from radiodiff.config import DataConfig
from radiodiff.data.latents import decode_latent_members
from radiodiff.data.manifest import ShardInfo
from radiodiff.data.schema import DataFormatError, decode_members
from radiodiff.data.shard_source import (
    LoadedShard,
    ShardReader,
    ShardSource,
    fetch_shard,
    index_tar,
    iter_tar,
)

__all__ = ["ShardStream", "StreamPlan", "chunk_count", "fetch_shard", "index_tar", "iter_tar"]

# Tags keep the two RNG streams apart: SeedSequence pads short entropy with zeros, so without
# them (seed, e) and (seed, e, 0) would seed the same generator.
_SHARD_ORDER_TAG = 0x5348
_SAMPLE_ORDER_TAG = 0x534D
_PLAN_CACHE = 8  # epochs (and shard x epoch sample orders) whose permutations a plan keeps


class StreamPlan:
    """The global sample stream of a split: where each position lies; reads no data."""

    def __init__(self, shards: list[ShardInfo], *, seed: int, shuffle: bool, epochs: Optional[int]) -> None:
        # Empty shards contribute nothing to the stream.
        self.shards = [s for s in shards if s.num_samples > 0]
        self.seed = seed
        self.shuffle = shuffle
        self.epoch_size = sum(s.num_samples for s in self.shards)
        self.end: Optional[int] = None if epochs is None else epochs * self.epoch_size
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sample_orders: dict[tuple[int, int], np.ndarray] = {}

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices into ``self.shards`` in the order of ``epoch``, and where each starts in the epoch."""
        if epoch not in self._orders:
            if len(self._orders) >= _PLAN_CACHE:
                self._orders.clear()
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([_SHARD_ORDER_TAG, self.seed, epoch]).permutation(order)
            sizes = [self.shards[i].num_samples for i in order]
            self._orders[epoch] = order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return self._orders[epoch]

    def segments(self, lo: int, hi: int) -> Iterator[tuple[int, ShardInfo, int, int, int]]:
        """Positions ``[lo, hi)`` cut at shard boundaries: (epoch, shard, first offset, end offset,
        stream position where that shard's run ends)."""
        assert self.epoch_size > 0 and 0 <= lo <= hi
        while lo < hi:
            epoch, within = divmod(lo, self.epoch_size)
            order, starts = self.epoch_order(epoch)
            t = int(np.searchsorted(starts, within, side="right")) - 1
            first = within - int(starts[t])
            run_end = epoch * self.epoch_size + int(starts[t + 1])
            stop = min(hi, run_end)
            yield epoch, self.shards[order[t]], first, first + stop - lo, run_end
            lo = stop

    def shard_at(self, position: int) -> ShardInfo:
        return next(self.segments(position, position + 1))[1]

    def sample_order(self, shard: ShardInfo, epoch: int) -> np.ndarray:
        """Tar indices of ``shard``'s samples in the order of ``epoch``."""
        if not self.shuffle:
            return np.arange(shard.num_samples)
        if (shard.index, epoch) not in self._sample_orders:
            if len(self._sample_orders) >= _PLAN_CACHE:
                self._sample_orders.clear()
            rng = np.random.default_rng([_SAMPLE_ORDER_TAG, self.seed, epoch, shard.index])
            self._sample_orders[shard.index, epoch] = rng.permutation(shard.num_samples)
        return self._sample_orders[shard.index, epoch]


def chunk_count(end: int, start: int, *, rank: int, world_size: int, micro_batch: int,
                drop_last: bool) -> int:
    """Micro-batches rank ``rank`` gets from stream position ``start`` to ``end`` (see module docstring)."""
    room = end - start - rank * micro_batch - (micro_batch - 1 if drop_last else 0)
    return max(0, -(-room // (world_size * micro_batch)))


class ShardStream(IterableDataset):
    """One rank's micro-batches from stream position ``start`` on (set by the loader before each pass).

    Yields collated batches: ``key`` list[str] (B), ``cond_u8`` uint8 (B, 3, H, W), ``target_u8``
    uint8 (B, 1, H, W) (``schema.to_values`` finishes them per batch) or, from a latent cache
    (``moments_shape`` set), ``moments`` float32 (B, 2Z, h, w), ``map``, ``tx``, ``pos`` int64 (B,)
    (``pos``: stream positions), and ``io_bytes`` int64 (2,): the bytes this worker read from the
    shard root and from the cache since its previous batch.
    """

    def __init__(self, cfg: DataConfig, plan: StreamPlan, source: ShardSource, *, rank: int,
                 world_size: int, micro_batch: int, drop_last: bool = False,
                 moments_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.plan = plan
        self.source = source
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.drop_last = drop_last
        self.moments_shape = moments_shape
        self.start = 0

    def chunk(self, k: int) -> tuple[int, int]:
        """Stream positions [lo, hi) of this rank's k-th micro-batch; lo == hi when there is none."""
        lo = self.start + (k * self.world_size + self.rank) * self.micro_batch
        hi = lo + self.micro_batch
        if self.plan.end is not None:
            lo, hi = min(lo, self.plan.end), min(hi, self.plan.end)
        if self.drop_last and hi - lo < self.micro_batch:
            return lo, lo
        return lo, hi

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = ShardReader(self.source)  # per pass: the shards this worker holds in memory
        reported = (0, 0)
        for k in itertools.count(worker, workers):
            lo, hi = self.chunk(k)
            if lo == hi:
                return
            batch = self._batch(reader, lo, hi, worker, workers)
            counts = (reader.source_bytes, reader.cache_bytes)
            batch["io_bytes"] = torch.tensor([counts[0] - reported[0], counts[1] - reported[1]])
            reported = counts
            yield batch

    def next_shard_after(self, after: int, worker: int, workers: int) -> Optional[ShardInfo]:
        """The shard holding worker ``worker`` of ``workers``'s first sample at stream position >=
        ``after``: the one to prefetch when its current shard run ends at ``after``; None past the end."""
        stride = workers * self.world_size * self.micro_batch
        first = self.chunk(worker)[0]
        # The first of this worker's chunks (first + j*stride, of length m) reaching past ``after``.
        j = max(0, -(-(after - self.micro_batch + 1 - first) // stride))
        position = max(after, first + j * stride)
        if self.plan.end is not None and position >= self.plan.end:
            return None
        return self.plan.shard_at(position)

    def _batch(self, reader: ShardReader, lo: int, hi: int, worker: int, workers: int) -> dict:
        samples = []
        for epoch, shard, first, stop, run_end in self.plan.segments(lo, hi):
            loaded = reader.get(shard)
            if reader.planned_after != run_end:  # once per shard run: fetch the next one meanwhile
                reader.planned_after = run_end
                upcoming = self.next_shard_after(run_end, worker, workers)
                if upcoming is not None:
                    reader.prefetch(upcoming)
            order = self.plan.sample_order(shard, epoch)
            samples += [self._decode(loaded, int(i)) for i in order[first:stop]]
        served = "target_u8" if self.moments_shape is None else "moments"
        return {
            "key": [s["key"] for s in samples],
            "cond_u8": torch.stack([s["cond_u8"] for s in samples]),  # (B, 3, H, W)
            served: torch.stack([s[served] for s in samples]),  # (B, 1, H, W) uint8 | (B, 2Z, h, w) float32
            "map": torch.tensor([s["map"] for s in samples], dtype=torch.int64),
            "tx": torch.tensor([s["tx"] for s in samples], dtype=torch.int64),
            "pos": torch.arange(lo, hi, dtype=torch.int64),
        }

    def _decode(self, loaded: LoadedShard, i: int) -> dict:
        key, spans = loaded.index[i]
        members = {kind: loaded.data[start:end] for kind, (start, end) in spans.items()}
        where = f"{loaded.where}:{key}"
        if self.moments_shape is None:
            sample = decode_members(members, self.cfg, where, map_cache=loaded.map_cache, raw=True)
        else:
            sample = decode_latent_members(members, self.cfg, where, self.moments_shape, map_cache=loaded.map_cache)
        if sample["key"] != key:
            raise DataFormatError(f"{loaded.where}: sample {key} has a JSON record for {sample['key']}")
        return sample
