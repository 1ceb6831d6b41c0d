"""One process group owns a run directory at a time: a lock file with a heartbeat.

``{run_dir}/LOCK`` holds the owner (what it is, host, pid, Slurm job id, since when) and a heartbeat
that rank 0 refreshes every ``heartbeat_s`` seconds. It is created with O_EXCL, which is atomic on
local and NFS v3+ filesystems. A second training on the directory stops with a one-line error naming
the owner; a lock whose heartbeat is older than ``stale_s`` (a killed job), whose process is gone
(same host), that belongs to this very Slurm job (a requeue), or whose Slurm job has ended (asked of
``squeue`` by a job of the same cluster: ``radiodiff.train.slurm_jobs``) is taken over. Taking over
writes a new lock through a rename and reads it back, so of two processes taking over at once one
wins and the other stops. Evaluation and sampling read a run without the lock. The sharder and the
latent encoder lock their output folder the same way (``pipeline.shard_set``); on a URL with no
exclusive create (``s3://``) with ``radiodiff.train.remote_lock``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from radiodiff.runs.layout import LOCK_FILE
from radiodiff.train.slurm_jobs import job_ended


class RunDirLocked(ValueError):
    """Another process owns the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_can_tell(owner: dict) -> bool:
    """Whether this process may ask Slurm about the owner's job: both are jobs of the same cluster."""
    cluster = os.environ.get("SLURM_CLUSTER_NAME")
    return bool(cluster and owner.get("slurm_job_id") and owner.get("slurm_cluster") == cluster)


def _kind(owner: dict) -> str:
    """What holds a lock (locks written before the record named it are trainings')."""
    return owner.get("owner", "training")


class RunLock:
    def __init__(self, run_dir: Path, *, stale_s: float = 300.0, heartbeat_s: float = 30.0,
                 name: str = "run_dir", owner: str = "training") -> None:
        self.path = run_dir / LOCK_FILE
        self.where = str(run_dir)  # the folder as messages name it
        self.name, self.owner = name, owner  # "{name}=<folder> is in use by another {owner}" (the lock's)
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.created: list[Path] = []  # the folders acquire made, deepest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME"),
                "since": self.since, "heartbeat": time.time(), "token": self.token, "owner": self.owner}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # vanished, or caught half-written by a rename-less writer: try again

    def _replace(self) -> None:
        temporary = self.path.with_name(f".{LOCK_FILE}.{self.token}")
        temporary.write_text(json.dumps(self._record()))
        os.replace(temporary, self.path)

    def _takeover_reason(self, owner: dict) -> str | None:
        job = os.environ.get("SLURM_JOB_ID")
        if job and owner.get("slurm_job_id") == job:
            return f"Slurm job {job} requeued"
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", 0))):
            return f"process {owner.get('pid')} is gone"
        age = time.time() - float(owner.get("heartbeat", 0))
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        if _slurm_can_tell(owner) and job_ended(owner["slurm_job_id"]):
            return f"Slurm job {owner['slurm_job_id']} has ended"
        return None

    def describe(self, owner: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
        job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
        age = time.time() - float(owner.get("heartbeat", 0))
        return (f"host {owner.get('host')}, pid {owner.get('pid')}{job}, since {since} "
                f"(last heartbeat {age:.0f} s ago)")

    def acquire(self) -> str:
        """Own the folder or raise RunDirLocked; returns how it was acquired."""
        folder = self.path.parent.absolute()
        self.created = [f for f in (folder, *folder.parents) if not f.exists()]
        try:
            return self._acquire(folder)
        except OSError:  # e.g. a full disk, during a mkdir or the lock's write: no empty folder stays
            self._remove_created()
            raise

    def _acquire(self, folder: Path) -> str:
        for attempt in range(3):  # a refused start elsewhere may remove the folder it made in between
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return self._take_over()
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self._record()))
        except OSError:  # an empty LOCK left here would be taken over as a stale one
            self.path.unlink(missing_ok=True)
            raise
        self._start_heartbeat()
        return "acquired"

    def _take_over(self) -> str:
        owner = self._read() or {}
        reason = self._takeover_reason(owner)
        if reason is None:
            raise RunDirLocked(f"{self.name}={self.where} is in use by another {_kind(owner)}: "
                               f"{self.describe(owner)}; "
                               f"wait for it to end (a lock without heartbeat for {self.stale_s:.0f} s"
                               f"{', or whose Slurm job has ended,' if _slurm_can_tell(owner) else ''} is taken over)")
        return self._claim(f"taken over ({reason})")

    def _claim(self, how: str) -> str:
        """Write this lock over whatever is there, then read it back after a while: of processes
        claiming at once, the one whose write landed last wins and the others stop."""
        self._replace()
        time.sleep(min(1.0, self.heartbeat_s / 10))  # a concurrent claimer's write lands in this window
        current = self._read() or {}
        if current.get("token") != self.token:
            raise RunDirLocked(f"{self.name}={self.where}: another {_kind(current)} took it over at the same "
                               f"time: {self.describe(current)}")
        self._start_heartbeat()
        return how

    def check_owned(self, before: str) -> None:
        """Raise RunDirLocked unless the lock is still this one (another process may have taken it
        over, believing this one dead): call it ``before`` a step that must have one writer."""
        current = self._read() or {}
        if current.get("token") != self.token:
            taker = f"another {_kind(current)}: {self.describe(current)}" if current else "no one (it was removed)"
            raise RunDirLocked(f"{self.name}={self.where}: its lock is now held by {taker}; stopped before {before}")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                current = self._read()
                if current is not None and current.get("token") != self.token:
                    return  # someone took it over (we were presumed dead): do not fight
                self._replace()

        self._thread = threading.Thread(target=beat, name="run-dir-lock", daemon=True)
        self._thread.start()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.get("token") == self.token:
            self._unlink()
        self._remove_created()

    def _unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def _remove_created(self) -> None:
        """A start refused before it wrote anything leaves no empty folder behind: the folders acquire
        made go again while they are empty (rmdir never removes what another wrote)."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break
