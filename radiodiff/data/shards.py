"""The streaming shard reader for training and evaluation, with exact resumable state.

``ShardLoader`` wraps a ``torch.utils.data.DataLoader`` over a :class:`ShardStream`. Each worker
process plays one *slot* (see ``shard_stream``) and batches within itself with the default collate,
so a batch is::

    key    list[str] (B)
    cond   float32 (B, 3, H, W)
    target float32 (B, 1, H, W)
    map, tx, slot, pos   int64 (B,)

Training streams (``epochs=None``) never end: every slot goes on epoch after epoch. With
``epochs=1`` every sample of the split is served exactly once over all ranks and slots (evaluation);
then a rank may get no samples at all when the split has fewer shards than slots.

State. The loader tracks, from the batches it handed to the training loop (not what workers have
prefetched), each local slot's position and the slot the round-robin serves next. ``state_dict()``
is plain JSON; ``load_state_dict()`` restores it in O(1) data read, because a position maps to
(epoch, shard, offset) through the manifest's per-shard sample counts. A DataLoader always serves
worker 0 first, so on restore the worker -> slot assignment is rotated to make worker 0 play the
slot that is next in line.

``memory://`` roots live in one process only, so they work with ``num_workers=0`` only.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import fsspec.utils
import torch
from torch.utils.data import DataLoader

from radiodiff.config import ConfigError, DataConfig
from radiodiff.data.schema import to_values
from radiodiff.data.manifest import check_manifest_options, manifest_identity, read_manifest, split_shards
from radiodiff.data.shard_stream import ShardStream, SlotPlan, fetch_shard, index_tar, iter_tar

__all__ = ["ShardLoader", "ShardStateError", "ShardStream", "SlotPlan", "fetch_shard", "index_tar",
           "iter_tar", "read_manifest", "remap_positions"]

STATE_FORMAT = "radiodiff-shard-loader"
STATE_VERSION = 1


class ShardStateError(ValueError):
    """A saved loader state does not fit the loader it is restored into; the message says why."""


def remap_positions(state: dict, *, world_size: int, num_workers: int) -> list[int]:
    """Positions of a state saved at another world size or worker count, for this geometry.

    The hook for resharding on a world-size change; not supported yet, so it always raises.
    """
    raise ShardStateError(
        f"the data-loader state was saved with world_size={state['world_size']} x "
        f"num_workers={state['num_workers']}; resuming with world_size={world_size} x "
        f"num_workers={num_workers} is not supported: keep the data-loader geometry of the run"
    )


def check_slot_count(num_shards: int, num_slots: int, *, world_size: int, num_workers: int,
                     where: str) -> None:
    if num_shards < num_slots:
        raise ConfigError(
            f"{where} has {num_shards} non-empty shards, but world_size={world_size} x "
            f"max(num_workers, 1)={max(num_workers, 1)} needs at least {num_slots} (one per data-loader "
            f"slot); re-shard with min_shards_per_split >= {num_slots}, or lower data.num_workers"
        )


class ShardLoader:
    """Batches of one rank's share of a split, read from ``cfg.shards``; see the module docstring.

    Uses ``cfg.shards`` (root URL), ``cfg.shuffle`` and ``cfg.num_workers`` unless overridden here,
    and the value options through ``schema.decode_members``. ``rank``/``world_size`` come from the
    caller (no torch.distributed calls here); ``seed`` (>= 0) seeds shard and sample order;
    ``epochs=None`` streams forever (training), ``epochs=1`` is one exact pass (evaluation, usually
    with ``shuffle=False``); ``verify`` checks each shard's size and sha256 against the manifest.
    """

    def __init__(self, cfg: DataConfig, split: str, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epochs: Optional[int] = None,
                 shuffle: Optional[bool] = None, num_workers: Optional[int] = None,
                 drop_last: bool = False, verify: bool = True, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None) -> None:
        if not cfg.shards:
            raise ConfigError("data.shards is not set; it must be the folder or URL holding manifest.json")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size <= 0 or seed < 0 or (epochs is not None and epochs <= 0):
            raise ConfigError(f"batch_size={batch_size} and epochs={epochs} must be > 0, seed={seed} >= 0")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be >= 0")
        self.cfg = cfg
        self.root = cfg.shards
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed, self.epochs = rank, world_size, seed, epochs
        self.shuffle = cfg.shuffle if shuffle is None else shuffle
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        self.slots_per_rank = max(self.num_workers, 1)
        self.drop_last, self.pin_memory, self.prefetch_factor = drop_last, pin_memory, prefetch_factor
        if self.num_workers > 0 and fsspec.utils.get_protocol(self.root) == "memory":
            raise ConfigError(f"data.shards={self.root}: a memory:// filesystem exists only in this "
                              f"process, so worker processes cannot read it; use num_workers=0")
        self.manifest = read_manifest(self.root)
        check_manifest_options(self.manifest, cfg)
        shards = split_shards(self.manifest, split, self.root)
        self.identity = manifest_identity(shards)
        num_slots = world_size * self.slots_per_rank
        self.plan = SlotPlan(shards, num_slots=num_slots, seed=seed, shuffle=self.shuffle, epochs=epochs)
        if epochs is None:
            check_slot_count(len(self.plan.shards), num_slots, world_size=world_size,
                             num_workers=self.num_workers, where=f"split {split!r} of {self.root}")
        self.dataset = ShardStream(cfg, self.root, self.plan, rank=rank, num_workers=self.num_workers,
                                   verify=verify)
        self._positions = [0] * self.slots_per_rank
        self._next_slot = 0

    # --- slots of this rank -------------------------------------------------------------------

    def _global_slot(self, local: int) -> int:
        return self.rank * self.slots_per_rank + local

    def _is_live(self, local: int) -> bool:
        """Whether local slot ``local`` still has a batch to give (always, for endless streams)."""
        total = self.plan.slot_total(self._global_slot(local))
        if total is None:
            return True
        remaining = total - self._positions[local]
        return remaining >= (self.batch_size if self.drop_last else 1)

    def _advance_from(self, local: int) -> int:
        # The DataLoader serves its workers round-robin and drops a worker once it is exhausted,
        # so after slot ``local`` comes the next slot in cyclic order that still has a batch.
        for step in range(1, self.slots_per_rank + 1):
            candidate = (local + step) % self.slots_per_rank
            if self._is_live(candidate):
                return candidate
        return 0

    def __len__(self) -> int:
        """Batches in one pass of a finite loader (this rank)."""
        if self.epochs is None:
            raise TypeError("an endless training ShardLoader (epochs=None) has no length")
        count = 0
        for local in range(self.slots_per_rank):
            total = self.plan.slot_total(self._global_slot(local)) or 0
            count += total // self.batch_size if self.drop_last else -(-total // self.batch_size)
        return count

    # --- iteration ----------------------------------------------------------------------------

    def _record(self, batch: dict) -> None:
        local = int(batch["slot"][0]) - self.rank * self.slots_per_rank
        # Our invariant: a batch comes from one worker, and workers are served in the cyclic
        # order predicted above; otherwise the saved state would not resume exactly.
        assert local == self._next_slot, f"batch from slot {local}, expected {self._next_slot}"
        assert bool((batch["slot"] == batch["slot"][0]).all())
        self._positions[local] = int(batch["pos"][-1]) + 1
        self._next_slot = self._advance_from(local)

    def _data_loader(self) -> DataLoader:
        self.dataset.start_positions = list(self._positions)
        self.dataset.rotation = self._next_slot
        extra: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            extra["prefetch_factor"] = self.prefetch_factor
        # Workers are not persistent: each pass pickles the dataset with the positions above, which
        # persistent workers would not see.
        # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's global
        # RNG, so a resumed run would consume one more draw than the uninterrupted one.
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          drop_last=self.drop_last, pin_memory=self.pin_memory,
                          persistent_workers=False, generator=torch.Generator().manual_seed(self.seed), **extra)

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current state on; a finite loader starts a new pass once it finished one."""
        if not any(self._is_live(j) for j in range(self.slots_per_rank)):
            self._reset()
        elif not self._is_live(self._next_slot):
            self._next_slot = self._advance_from(self._next_slot)
        for batch in self._data_loader():
            self._record(batch)
            # Workers send uint8 maps (a quarter of the bytes); the values are made here, per batch.
            batch["cond"], batch["target"] = to_values(batch.pop("cond_u8"), batch.pop("target_u8"), self.cfg)
            yield batch
        self._reset()

    def _reset(self) -> None:
        self._positions = [0] * self.slots_per_rank
        self._next_slot = 0

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position after the last batch handed out; JSON-serialisable."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "split": self.split,
                "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "seed": self.seed, "shuffle": self.shuffle, "epochs": self.epochs,
                "manifest": self.identity, "positions": list(self._positions),
                "next_slot": self._next_slot}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved ``state`` stopped (takes effect at ``iter``)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ShardStateError(f"not a ShardLoader state (format {state.get('format')!r})"
                                  if isinstance(state, dict) else "a ShardLoader state must be a dict")
        if state.get("version") != STATE_VERSION:
            raise ShardStateError(f"ShardLoader state version {state.get('version')!r} is not supported")
        missing = [name for name in self.state_dict() if name not in state]
        if missing:
            raise ShardStateError(f"ShardLoader state lacks {', '.join(missing)}")
        for name in ("split", "seed", "shuffle", "epochs", "rank", "manifest"):
            mine = self.identity if name == "manifest" else getattr(self, name)
            if state.get(name) != mine:
                raise ShardStateError(f"the data-loader state was saved with {name}={state.get(name)!r}"
                                      f" but this loader has {name}={mine!r} (shards {self.root})")
        same = (state["world_size"] == self.world_size
                and max(state["num_workers"], 1) == self.slots_per_rank)
        positions = state["positions"] if same else remap_positions(
            state, world_size=self.world_size, num_workers=self.num_workers)
        next_slot = state["next_slot"]
        valid = (len(positions) == self.slots_per_rank and 0 <= next_slot < self.slots_per_rank
                 and all(isinstance(p, int) and p >= 0 for p in positions))
        if not valid:
            raise ShardStateError(f"invalid ShardLoader positions {positions!r} / next_slot {next_slot!r}")
        self._positions = list(positions)
        self._next_slot = next_slot
