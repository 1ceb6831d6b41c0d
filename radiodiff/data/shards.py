"""The streaming shard reader for training and evaluation, with exact, elastic resumable state.

``ShardLoader`` wraps a ``torch.utils.data.DataLoader`` (``batch_size=None``) over a
:class:`ShardStream`: the split is one global sample stream and rank ``r`` of ``W`` gets, as its
k-th micro-batch of ``m`` samples, the positions ``start + (k*W + r)*m ...`` (``shard_stream``
explains the stream, the remainder rule and the workers). A batch is::

    key    list[str] (B)
    cond   float32 (B, 3, H, W)
    target float32 (B, 1, H, W)    or, from a latent cache (``latents=True``):
    moments float32 (B, 2Z, h, w)  the posterior's mean, then its log-variance (``data.latents``)
    map, tx, pos   int64 (B,)      pos: the samples' stream positions

Training streams (``epochs=None``) never end. With ``epochs=1`` every sample of the split is served
exactly once over all ranks (evaluation); the last chunks are partial or absent, so a rank may get
fewer samples or none at all for any split size and any number of ranks x workers.

State. ``state_dict()`` (plain JSON) holds the split, the manifest identity, the seed, shuffle,
epochs and ``position``: the stream position of the next global sample not yet consumed, counted
from the batches handed to the caller (not what workers prefetched). After the caller consumed k
micro-batches on every rank, ``position = start + k*W*m``, the same on every rank. Since the stream
does not depend on the geometry, ``load_state_dict()`` works at any world size, worker count and
micro batch: rank ``r'`` of ``W'`` continues at ``position + (k'*W' + r')*m'``.

Bytes. ``bytes_read`` counts the bytes this loader's workers read from the shard root,
``cache_bytes_read`` those read from ``data.cache_dir`` (see ``shard_source``).

``memory://`` roots live in one process only, so they work with ``num_workers=0`` only.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import fsspec.utils
import torch
from torch.utils.data import DataLoader

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.augment import augment_batch
from radiodiff.data.latents import open_cache_split
from radiodiff.data.manifest import (
    check_manifest_options,
    manifest_identity,
    read_manifest,
    split_shards,
)
from radiodiff.data.schema import (
    IMAGE_SAMPLES,
    LATENT_SAMPLES,
    cond_values,
    target_values,
)
from radiodiff.data.shard_source import ShardSource, fetch_shard, finish_prefetches, index_tar, iter_tar
from radiodiff.data.shard_stream import ShardStream, StreamPlan, chunk_count

__all__ = ["ShardLoader", "ShardStateError", "ShardStream", "StreamPlan", "fetch_shard", "index_tar",
           "iter_tar", "read_manifest"]

STATE_FORMAT = "radiodiff-shard-loader"
STATE_VERSION = 2  # 1: per-slot positions, tied to the world size and worker count
_CHECKED = ("split", "manifest", "seed", "shuffle", "epochs")


class ShardStateError(ValueError):
    """A saved loader state does not fit the loader it is restored into; the message says why."""


class ShardLoader:
    """Micro-batches of one rank's share of a split, read from ``cfg.shards``; see the module docstring.

    Uses ``cfg.shards`` (root URL), ``cfg.shuffle``, ``cfg.num_workers`` (unless overridden here) and
    ``cfg.cache_dir``, and the value options through ``schema.decode_members``. ``batch_size`` is
    the micro batch; ``rank``/``world_size`` come from the caller (no torch.distributed calls here);
    ``seed`` (>= 0) seeds shard and sample order; ``epochs=None`` streams forever (training),
    ``epochs=1`` is one exact pass (evaluation, usually with ``shuffle=False``); ``drop_last`` drops
    partial micro-batches at the end of a finite stream; ``verify`` checks each shard's size and
    sha256 against the manifest. ``latents``: read the latent cache at ``cfg.latents`` (made with
    ``cfg``'s data settings, else refused) instead of ``cfg.shards``: the same sample stream, with
    ``moments`` in place of ``target``. ``augment``: apply ``cfg.augment`` (training streams; each
    sample's reflection is keyed by its stream position, so it survives a resume at any world size).
    """

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epochs: Optional[int] = None,
                 shuffle: Optional[bool] = None, num_workers: Optional[int] = None,
                 drop_last: bool = False, verify: bool = True, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None, latents: bool = False, augment: bool = False) -> None:
        key = "data.latents" if latents else "data.shards"
        root = cfg.latents if latents else cfg.shards
        if not root:
            raise ConfigError(f"{key} is not set; it must be the folder or URL holding manifest.json")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size <= 0 or seed < 0 or (epochs is not None and epochs <= 0):
            raise ConfigError(f"batch_size={batch_size} and epochs={epochs} must be > 0, seed={seed} >= 0")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be >= 0")
        self.cfg, self.root, self.split = cfg, root, split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.epochs, self.drop_last = seed, epochs, drop_last
        self.shuffle = cfg.shuffle if shuffle is None else shuffle
        self.augment = augment and cfg.augment != "none"  # data.augment applies to training streams only
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        if self.num_workers > 0 and fsspec.utils.get_protocol(self.root) == "memory":
            raise ConfigError(f"{key}={self.root}: a memory:// filesystem exists only in this "
                              f"process, so worker processes cannot read it; use num_workers=0")
        moments_shape = None
        if latents:
            cache = open_cache_split(cfg, split)
            shards, self.identity, moments_shape = cache.shards, cache.identity, cache.moments_shape
        else:
            manifest = read_manifest(self.root)
            check_manifest_options(manifest, cfg)
            shards = split_shards(manifest, split, self.root)
            self.identity = manifest_identity(shards)
        self.plan = StreamPlan(shards, seed=seed, shuffle=self.shuffle, epochs=epochs)
        if epochs is None and self.plan.epoch_size == 0:
            raise ConfigError(f"split {split!r} of {self.root} holds no samples; a training stream needs some")
        source = ShardSource(self.root, verify, cfg.cache_dir, LATENT_SAMPLES if latents else IMAGE_SAMPLES)
        self.dataset = ShardStream(cfg, self.plan, source, rank=rank, world_size=world_size,
                                   micro_batch=batch_size, drop_last=drop_last, moments_shape=moments_shape)
        self._start = 0  # stream position the current pass of micro-batches started at
        self._consumed = 0  # micro-batches handed to the caller since
        self.bytes_read = 0
        self.cache_bytes_read = 0

    @property
    def position(self) -> int:
        """Stream position of the next global sample not yet consumed (all ranks agree on it)."""
        return self._start + self._consumed * self.world_size * self.batch_size

    def _chunks_from(self, start: int) -> int:
        assert self.plan.end is not None
        return chunk_count(self.plan.end, start, rank=self.rank, world_size=self.world_size,
                           micro_batch=self.batch_size, drop_last=self.drop_last)

    def __len__(self) -> int:
        """Micro-batches this rank gets in one whole pass of a finite loader."""
        if self.plan.end is None:
            raise TypeError("an endless training ShardLoader (epochs=None) has no length")
        return self._chunks_from(0)

    def _data_loader(self) -> DataLoader:
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            finish_prefetches()  # none of this process's threads holds a lock when the workers fork
            if self.prefetch_factor is not None:
                extra["prefetch_factor"] = self.prefetch_factor
        # Workers are not persistent: each pass pickles the dataset with its start position, which
        # persistent workers would not see.
        # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's global
        # RNG, so a resumed run would consume one more draw than the uninterrupted one.
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.seed), **extra)

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches from the current position on; a finite loader that finished starts over."""
        if self.plan.end is not None and self._chunks_from(self.position) == 0:
            self._start, self._consumed = 0, 0
        self._start, self._consumed = self.position, 0
        self.dataset.start = self._start
        for batch in self._data_loader():
            source_bytes, cache_bytes = batch.pop("io_bytes").tolist()
            self.bytes_read += source_bytes
            self.cache_bytes_read += cache_bytes
            self._consumed += 1
            if self.augment:  # on the uint8 maps at 256x256, before any resize
                augment_batch(batch, self.seed)
            # Workers send uint8 maps (a quarter of the bytes); the values are made here, per batch.
            batch["cond"] = cond_values(batch.pop("cond_u8"), self.cfg)
            if "target_u8" in batch:  # a latent cache serves float32 moments instead
                batch["target"] = target_values(batch.pop("target_u8"), self.cfg)
            yield batch
        self._start, self._consumed = 0, 0

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The stream position after the micro-batches handed out; JSON-serialisable.

        ``world_size`` and ``micro_batch`` are recorded for information only.
        """
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "split": self.split,
                "manifest": self.identity, "seed": self.seed, "shuffle": self.shuffle,
                "epochs": self.epochs, "position": self.position, "world_size": self.world_size,
                "micro_batch": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue the global stream where the loaders that saved ``state`` stopped, at any world
        size, worker count and micro batch (takes effect at the next ``iter``)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ShardStateError(f"not a ShardLoader state (format {state.get('format')!r})"
                                  if isinstance(state, dict) else "a ShardLoader state must be a dict")
        if state.get("version") != STATE_VERSION:
            raise ShardStateError(f"ShardLoader state version {state.get('version')!r} is not supported "
                                  f"(this reader restores version {STATE_VERSION})")
        missing = [name for name in (*_CHECKED, "position") if name not in state]
        if missing:
            raise ShardStateError(f"ShardLoader state lacks {', '.join(missing)}")
        for name in _CHECKED:
            mine = self.identity if name == "manifest" else getattr(self, name)
            if state[name] != mine:
                raise ShardStateError(f"the data-loader state was saved with {name}={state[name]!r} but "
                                      f"this loader has {name}={mine!r} (split {self.split!r} of {self.root})")
        position = state["position"]
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ShardStateError(f"invalid ShardLoader position {position!r}; expected an int >= 0")
        self._start, self._consumed = position, 0
