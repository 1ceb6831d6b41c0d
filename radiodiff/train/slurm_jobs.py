"""What Slurm says about another job: whether it has ended, so that its run-directory lock can go.

A lock left by a killed job on another host would otherwise stand until its heartbeat is stale (5
minutes by default), and a job submitted in that time stops at once. ``squeue`` answers for the jobs
of the cluster it talks to, so a lock is only judged this way by a job of the same cluster (the lock
records ``SLURM_CLUSTER_NAME``): a lock on a filesystem shared with another cluster names a job id
this controller may not know, or knows as another job.
"""

from __future__ import annotations

import subprocess

# States after which a job runs nothing more (a requeued job is PENDING again under the same id).
ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "TIMEOUT"})
UNKNOWN_JOB = "Invalid job id"  # squeue's error for a job the controller has purged (MinJobAge after it ended)


def job_ended(job_id: str, timeout_s: float = 60.0) -> bool | None:
    """True when Slurm says job ``job_id`` has ended (or no longer knows it), False while it may still
    run (queued, running, completing, requeued, suspended, ...), None when Slurm cannot tell (no
    ``squeue`` here, the controller unreachable or too slow): only True lets a lock go early."""
    try:
        done = subprocess.run(["squeue", "--noheader", "--jobs", str(job_id), "--states=all", "--format=%T"],
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return True if UNKNOWN_JOB in done.stderr else None
    states = set(done.stdout.split())  # one line per component of a heterogeneous job
    if not states:
        return None
    return states <= ENDED_STATES
