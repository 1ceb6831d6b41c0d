"""A folder's lock on an fsspec URL (``s3://``, ``gs://``, ``memory://``): ``RunLock`` without O_EXCL.

Object stores have no exclusive create, so every acquisition is a claim: write the lock (whole:
under a temporary name, then moved), wait, read it back; of runs claiming at once, the one whose
write landed last owns the folder and the others stop with the one-line error, as on a local
folder. A lock held by another run is refused or taken over by the same rules (heartbeat age, same
Slurm job, a Slurm job that has ended, a dead process on this host). Clocks differ between hosts:
keep ``stale_s`` well above any skew. The residual race (a claimer whose write lands after the
winner's read-back) is caught by ``check_owned`` before the step that needs one writer (publishing a
shard set), which then stops.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec

from radiodiff.runs.layout import LOCK_FILE
from radiodiff.train.lock import RunLock


class RemoteLock(RunLock):
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, where: str | None = None, **kwargs: object) -> None:
        """``root``: the folder as ``fs`` names it; ``where``: as messages name it (the user's URL)."""
        super().__init__(Path(root), **kwargs)  # type: ignore[arg-type]  # (self.path is never used here)
        self.fs = fs
        self.url = f"{root.rstrip('/')}/{LOCK_FILE}"
        self.where = where or fs.unstrip_protocol(root.rstrip("/"))

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.url))
        except (OSError, ValueError):  # FileNotFoundError included
            return None

    def _replace(self) -> None:
        temporary = f"{self.url}.{self.token}.tmp"
        self.fs.pipe_file(temporary, json.dumps(self._record()).encode())
        self.fs.mv(temporary, self.url)

    def acquire(self) -> str:
        """Own the folder or raise RunDirLocked; returns how it was acquired."""
        self.fs.makedirs(self.url.rsplit("/", 1)[0], exist_ok=True)
        if self._read() is None:  # no lock, or an unreadable one: claim it
            return self._claim("acquired")
        return self._take_over()

    def _unlink(self) -> None:
        try:
            self.fs.rm(self.url)
        except FileNotFoundError:
            pass
