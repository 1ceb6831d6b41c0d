"""Slurm jobs driven from the tests: submit, inspect, wait, release a requeued job, cancel leftovers."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tests.slurm.conftest import REPO

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def slurm(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)


@contextmanager
def cancelled_at_exit(env: dict) -> Iterator[list[str]]:
    """Job ids submitted inside the block; any still queued or running at its end are cancelled."""
    ids: list[str] = []
    try:
        yield ids
    finally:
        for job_id in ids:
            if job_info(env, job_id).get("JobState") in ACTIVE:
                slurm(env, "scancel", job_id)


def submit(env: dict, log: Path, *args: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", f"--output={log}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_info(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (the controller keeps finished jobs for MinJobAge=300 s)."""
    text = slurm(env, "scontrol", "-o", "show", "job", job_id).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; log:\n"
                                 + (log.read_text()[-4000:] if log.exists() else "(none)"))
        time.sleep(0.5)


def ended(env: dict, job_id: str, on_pending: Callable[[dict], None] = lambda job: None) -> bool:
    job = job_info(env, job_id)
    if job.get("JobState") == "PENDING":
        on_pending(job)
    return job.get("JobState") not in ACTIVE


def releaser(env: dict) -> Callable[[dict], None]:
    """on_pending for a requeued job: Slurm 22.05 holds a requeued batch job until the old launch
    credential has expired (EligibleTime = requeue + cred_expire 120 s + 1 s; squeue shows
    Reason=BeginTime). That is harmless on a real cluster; here it would only add two idle minutes,
    so let it start now."""
    def release(job: dict) -> None:
        if job.get("Reason") == "BeginTime":
            slurm(env, "scontrol", "update", f"JobId={job['JobId']}", "StartTime=now")

    return release
