"""Shard files: tar parsing, fetching with checksums, the node-local cache, a worker's shards in memory.

A shard root (a folder or any fsspec URL) holds ``manifest.json`` and ``{split}/{split}-000000.tar``
... written by ``radiodiff-shard``. Each tar holds, per sample ``{map}_{tx}``, the adjacent members
``{key}.buildings.png``, ``{key}.tx.png``, ``{key}.gain.png``, optionally ``{key}.cars.png``, and
``{key}.json``; a latent cache's tars (``radiodiff-encode``) hold ``{key}.moments.npy`` instead
of the gain map. Only the member types of the shard set's ``SampleFormat`` are accepted; nothing
is ever unpickled.

Cache. With ``data.cache_dir`` set, a shard is read through ``{cache_dir}/{sha256}.tar``: when that
file exists with the manifest's size it is read from there (and, with ``verify``, its sha256
checked: a corrupt copy is fetched again and replaced, with a warning); otherwise the shard is
fetched from the root, verified, written to a temporary name and renamed, so concurrent ranks on a
node never see a partial file. Then a node reads each remote shard from the root once (ranks that
miss the cache at the same moment may each fetch it once). Shards without a sha256 in the manifest
are not cached.

Byte counts. A :class:`ShardReader` counts the bytes it read from the root (``source_bytes``,
including copies into the cache) and from the cache (``cache_bytes``).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from radiodiff.data.manifest import ShardInfo, join_url, read_bytes
from radiodiff.data.schema import IMAGE_SAMPLES, DataFormatError, SampleFormat

# Shards a worker keeps in memory besides the one it prefetches: a micro-batch may straddle two.
LRU_SHARDS = 2

# One sample inside a shard's bytes: key and {member type: (start, end)} byte spans.
TarIndex = list[tuple[str, dict[str, tuple[int, int]]]]


def index_tar(data: bytes, where: str, fmt: SampleFormat = IMAGE_SAMPLES) -> TarIndex:
    """Parse a shard held in memory into per-sample byte spans, checking every member against ``fmt``."""
    index: TarIndex = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for info in archive:
                key, kind = _check_member(info, len(data), where, fmt)
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
        missing = [kind for kind in fmt.required if kind not in spans]
        if missing:
            raise DataFormatError(f"{where}: sample {key} lacks member(s) {', '.join(missing)}")
    return index


def _check_member(info: tarfile.TarInfo, size: int, where: str, fmt: SampleFormat) -> tuple[str, str]:
    if not info.isreg():
        raise DataFormatError(f"{where}: member {info.name!r} is not a regular file")
    key, _, kind = posixpath.basename(info.name).partition(".")
    if not key or kind not in fmt.members:
        raise DataFormatError(f"{where}: member {info.name!r} is not an accepted member type; "
                              f"allowed: {', '.join(fmt.members)}")
    if info.offset_data + info.size > size:
        raise DataFormatError(f"{where}: member {info.name!r} is truncated")
    return key, kind


def iter_tar(data: bytes, where: str,
             fmt: SampleFormat = IMAGE_SAMPLES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard held in memory: (key, {member type: bytes}), in tar order."""
    for key, spans in index_tar(data, where, fmt):
        yield key, {kind: data[start:end] for kind, (start, end) in spans.items()}


def check_shard(data: bytes, shard: ShardInfo, where: str) -> None:
    """The shard's size and sha256 must be the manifest's."""
    if shard.num_bytes is not None and len(data) != shard.num_bytes:
        raise DataFormatError(f"{where}: shard has {len(data)} bytes, the manifest says {shard.num_bytes}")
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataFormatError(f"{where}: shard sha256 does not match the manifest (corrupt or replaced)")


def fetch_shard(root: str, shard: ShardInfo, *, verify: bool = True) -> bytes:
    """Read one whole shard from the root; with ``verify`` its size and sha256 are checked."""
    url = join_url(root, shard.path)
    data = read_bytes(url, "shard")
    if verify:
        check_shard(data, shard, url)
    return data


@dataclass(frozen=True)
class ShardSource:
    """Where shards are read from: the root, through the cache folder when one is set, and what
    their samples hold."""

    root: str
    verify: bool = True
    cache_dir: Optional[str] = None
    sample_format: SampleFormat = IMAGE_SAMPLES

    def read(self, shard: ShardInfo) -> tuple[bytes, str, bool]:
        """(the shard's bytes, its name for errors, whether it came from the cache)."""
        url = join_url(self.root, shard.path)
        if self.cache_dir is None or not shard.sha256:
            return fetch_shard(self.root, shard, verify=self.verify), url, False
        path = Path(self.cache_dir) / f"{shard.sha256}.tar"
        data = self._read_cached(path, shard, url)
        if data is not None:
            return data, f"{path} (cached {url})", True
        data = fetch_shard(self.root, shard, verify=self.verify)
        _write_atomic(path, data)
        return data, url, False

    def _read_cached(self, path: Path, shard: ShardInfo, url: str) -> Optional[bytes]:
        try:
            if shard.num_bytes is not None and path.stat().st_size != shard.num_bytes:
                return None  # a stale or foreign file: fetch again and replace it
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise DataFormatError(f"{path}: cannot read the cached shard ({type(err).__name__}: {err})") from err
        if self.verify and hashlib.sha256(data).hexdigest() != shard.sha256:
            warnings.warn(f"{path}: cached shard does not match the sha256 of {url}; fetching it again",
                          RuntimeWarning, stacklevel=2)
            return None
        return data


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a name no other process uses, then rename: readers see the whole file or none."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise DataFormatError(f"data.cache_dir: cannot write {path} ({type(err).__name__}: {err})") from err


@dataclass
class LoadedShard:
    data: bytes
    index: TarIndex
    where: str  # names the shard (URL, or cache file) in errors
    map_cache: dict[bytes, np.ndarray] = field(default_factory=dict)  # decoded per-map PNGs


PREFETCH_THREAD = "radiodiff-shard-prefetch"


def finish_prefetches() -> None:
    """Wait until no prefetch thread of this process is running (each reads one shard).

    A loader calls it before it forks its workers. ``fork()`` copies only the calling thread: a lock
    that a prefetch thread holds at that instant (a library's, while it reads or hashes a shard) would
    stay held in the worker for ever, and the worker, its rank and then every rank would hang. A
    loader without workers leaves such a thread behind whenever its pass is dropped mid-way.
    """
    for thread in threading.enumerate():
        if thread.name == PREFETCH_THREAD and thread is not threading.current_thread():
            thread.join()


class _Prefetch:
    """``load()`` in a daemon thread; ``result()`` waits for it and raises its error in the caller."""

    def __init__(self, load: Callable[[], LoadedShard]) -> None:
        self._value: Optional[LoadedShard] = None
        self._error: Optional[Exception] = None
        self._thread = threading.Thread(target=self._run, args=(load,), daemon=True, name=PREFETCH_THREAD)
        self._thread.start()

    def _run(self, load: Callable[[], LoadedShard]) -> None:
        try:
            self._value = load()
        except Exception as err:  # handed to the thread that needs the shard
            self._error = err

    def result(self) -> LoadedShard:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class ShardReader:
    """One worker's shards in memory: the last ``LRU_SHARDS`` it used and one it prefetches."""

    def __init__(self, source: ShardSource) -> None:
        self.source = source
        self.source_bytes = 0
        self.cache_bytes = 0
        self.planned_after = -1  # the stream position the last prefetch decision was made for
        self._loaded: OrderedDict[int, LoadedShard] = OrderedDict()
        self._pending: dict[int, _Prefetch] = {}
        self._lock = threading.Lock()  # the counters are updated by the prefetch thread too

    def get(self, shard: ShardInfo) -> LoadedShard:
        if shard.index in self._loaded:
            self._loaded.move_to_end(shard.index)
            return self._loaded[shard.index]
        pending = self._pending.pop(shard.index, None)
        loaded = pending.result() if pending is not None else self._load(shard)
        self._loaded[shard.index] = loaded
        while len(self._loaded) > LRU_SHARDS:
            self._loaded.popitem(last=False)
        return loaded

    def prefetch(self, shard: ShardInfo) -> None:
        if shard.index in self._loaded or shard.index in self._pending:
            return
        # One prefetch at a time bounds memory (LRU_SHARDS + 1 shards per worker).
        self._pending = {shard.index: _Prefetch(lambda: self._load(shard))}

    def _load(self, shard: ShardInfo) -> LoadedShard:
        data, where, cached = self.source.read(shard)
        with self._lock:
            if cached:
                self.cache_bytes += len(data)
            else:
                self.source_bytes += len(data)
        index = index_tar(data, where, self.source.sample_format)
        if len(index) != shard.num_samples:
            raise DataFormatError(f"{where}: shard holds {len(index)} samples, the manifest says "
                                  f"{shard.num_samples}")
        return LoadedShard(data, index, where)
