"""Writing a shard set (the sharder's and the latent cache's) so that a failed run changes nothing.

Staged, then published. Tasks write each new shard whole (under a temporary name renamed when
complete) as ``{path}.staged-{token}``, a name no reader looks at, so that while they run the
previous set stays valid and readable, trainings included. Only when every task has succeeded does
the driver publish: it sets the old manifest aside (``manifest.json.previous``: no reader trusts a
half-updated set), renames each staged shard over its path (metadata only on a local filesystem, so
a full disk cannot stop it half-way) and writes the new manifest last. A run that fails (bad source
files, a task's error, a full disk, Ctrl-C) removes its staged files and leaves the previous set as
it was (``run_tasks`` raises a task's error once the other tasks have ended). A killed driver
leaves its staged files; the next run on that folder removes them.

One run at a time. A run holds ``{out}/LOCK`` from before it reads the previous manifest until it
has committed the new one: a second run on the same folder stops with a one-line error naming the
owner. On a local folder the lock is created exclusively (``radiodiff.train.lock``); on a URL
(``s3://``) it is claimed by writing and reading back (``radiodiff.train.remote_lock``), and a run
checks that it still holds it right before publishing, so two runs never both publish.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np

from radiodiff.data.manifest import MANIFEST_NAME
from radiodiff.data.shard_format import sha256
from radiodiff.train.lock import RunLock
from radiodiff.train.remote_lock import RemoteLock

LOCAL_PROTOCOLS = {"file", "local"}
# Filesystems that live inside one process: Ray workers cannot see the driver's, so tasks hand
# their bytes back and the driver writes them (and checks kept shards itself).
PROCESS_LOCAL_PROTOCOLS = {"memory"}
STAGED = ".staged-"


def write_atomically(fs: fsspec.AbstractFileSystem, target: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees a partial file."""
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    temporary = f"{target}.tmp-{time.time_ns()}"
    try:
        fs.pipe_file(temporary, data)
        fs.mv(temporary, target)
    except BaseException:
        try:  # a full disk or a kill: leave no partial file behind
            fs.rm(temporary)
        except OSError:
            pass
        raise


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a corrupt manifest only means nothing can be skipped


def manifest_paths(root: str) -> tuple[str, str]:
    """The manifest of the set at ``root`` and the place it is kept aside while shards change."""
    return f"{root}/{MANIFEST_NAME}", f"{root}/{MANIFEST_NAME}.previous"


def previous_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    """The last committed manifest, or the one kept aside by a run that did not finish."""
    manifest_path, previous_path = manifest_paths(root)
    return read_json(fs, manifest_path) or read_json(fs, previous_path)


def set_manifest_aside(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Before shards change: the old manifest no longer describes the set, so no reader may trust it."""
    fs.makedirs(root, exist_ok=True)
    manifest_path, previous_path = manifest_paths(root)
    if fs.exists(manifest_path):
        fs.mv(manifest_path, previous_path)


def commit_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> None:
    """Write the manifest last (an unchanged set keeps its file untouched), then drop the aside copy."""
    manifest_path, previous_path = manifest_paths(root)
    encoded = json.dumps(manifest, indent=1).encode()
    if not (fs.exists(manifest_path) and fs.cat_file(manifest_path) == encoded):
        write_atomically(fs, manifest_path, encoded)
    if fs.exists(previous_path):
        fs.rm(previous_path)


def is_intact(out: str, entry: dict) -> bool:
    """Whether the shard of a previous manifest's ``entry`` is still at its path with its sha256."""
    fs, root = fsspec.core.url_to_fs(out)
    target = f"{root.rstrip('/')}/{entry['path']}"
    return fs.exists(target) and sha256(fs.cat_file(target)) == entry["sha256"]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(LOCAL_PROTOCOLS & set(np.atleast_1d(fs.protocol)))


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(PROCESS_LOCAL_PROTOCOLS & set(np.atleast_1d(fs.protocol)))


class ShardSetWriter:
    """One run's writes into the shard set at ``out``: stage shards, then publish or discard them."""

    def __init__(self, out: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(out)
        self.out = out.rstrip("/")
        self.root = root.rstrip("/")
        self.process_local = is_process_local(self.fs)  # Ray tasks cannot stage here: the driver does
        self.token = uuid.uuid4().hex[:12]
        self.lock: RunLock | None = None  # the driver's, during run()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "lock": None}  # tasks get the writer, not the driver's lock and its thread

    def staged_path(self, path: str) -> str:
        return f"{self.root}/{path}{STAGED}{self.token}"

    def stage(self, path: str, data: bytes) -> None:
        """One new shard, whole, where no reader looks (a task may call this: the writer pickles)."""
        write_atomically(self.fs, self.staged_path(path), data)

    def leftovers(self, token: str = "") -> list[str]:
        """Staged files of a run's ``token`` (of any run: ""), with their temporary files."""
        return sorted(self.fs.glob(f"{self.root}/*/*{STAGED}{token}*"))

    def discard(self, token: str | None = None) -> None:
        """Remove the staged files of ``token`` (this run's: None; any run's: ""), and their folders if
        now empty."""
        folders = set()
        for path in self.leftovers(self.token if token is None else token):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path)
            folders.add(path.rsplit("/", 1)[0])
        for folder in folders:
            with contextlib.suppress(OSError):
                if not self.fs.ls(folder):
                    self.fs.rmdir(folder)

    def publish(self, written: list[str], manifest: dict) -> None:
        """Swap the staged shards in at ``written`` (their paths) and commit ``manifest``."""
        if self.lock is not None:
            self.lock.check_owned("publishing")
        if written:
            set_manifest_aside(self.fs, self.root)
            for path in written:
                self.fs.mv(self.staged_path(path), f"{self.root}/{path}")
        commit_manifest(self.fs, self.root, manifest)

    def previous_manifest(self) -> dict | None:
        return previous_manifest(self.fs, self.root)

    @contextlib.contextmanager
    def run(self, owner: str) -> Iterator[ShardSetWriter]:
        """The run's span: the folder's lock and, on any failure, no staged file left."""
        lock = (RunLock(Path(self.root), name="out", owner=owner) if is_local(self.fs)
                else RemoteLock(self.fs, self.root, where=self.out, name="out", owner=owner))
        with lock:
            self.lock = lock
            self.discard("")  # of earlier runs that were killed: the lock says none is running
            try:
                yield self
            except BaseException:
                self.discard()
                raise
            finally:
                self.lock = None
