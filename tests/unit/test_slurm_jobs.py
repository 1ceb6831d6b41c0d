"""Without an answer from Slurm a lock stands until its heartbeat is stale (the cluster cases are in
tests/slurm/test_lock_sbatch.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from radiodiff.train.lock import RunDirLocked, RunLock
from radiodiff.train.slurm_jobs import job_ended


def test_without_squeue_a_lock_of_this_cluster_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "cluster")
    assert job_ended("7") is None
    record = {"host": "node-elsewhere", "pid": 1, "slurm_job_id": "7", "slurm_cluster": "cluster",
              "since": time.time(), "heartbeat": time.time(), "token": "theirs"}
    (tmp_path / "LOCK").write_text(json.dumps(record))
    with pytest.raises(RunDirLocked, match="Slurm job 7, since .* or whose Slurm job has ended, is taken over"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "LOCK").read_text()) == record
