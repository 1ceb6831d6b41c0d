"""Without an answer from Slurm a lock stands until its heartbeat is stale (the cluster cases are in
tests/slurm/test_lock_sbatch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from radiodiff.train.lock import RunDirLocked, RunLock
from radiodiff.train.slurm_jobs import job_ended
from tests.conftest import foreign_lock


def test_without_squeue_a_lock_of_this_cluster_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "cluster")
    assert job_ended("7") is None
    record = foreign_lock(tmp_path, "7", "cluster")
    with pytest.raises(RunDirLocked, match="Slurm job 7, since .* or whose Slurm job has ended, is taken over"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / "LOCK").read_text() == record
