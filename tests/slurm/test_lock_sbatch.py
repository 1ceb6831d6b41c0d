"""A run directory's lock left by a Slurm job that has ended is taken over at once by a job of the same
cluster, not after its heartbeat goes stale (radiodiff.train.slurm_jobs): asked of the local cluster's
squeue. The locks are written as a job on another host leaves them (fresh heartbeat, a pid that is not
this host's), so only what Slurm says about their jobs decides."""

from __future__ import annotations

import json
import re
from pathlib import Path

from radiodiff.train.slurm_jobs import job_ended
from tests.conftest import foreign_lock
from tests.slurm.conftest import free_port_range, sbatch
from tests.slurm.jobs import cancelled_at_exit, ended, job_info, submit, wait_for

CLUSTER = "radiodiff-local"  # tools/local_slurm.sh
ACQUIRE = """
import sys
from pathlib import Path
from radiodiff.train.lock import RunDirLocked, RunLock
for folder in sys.argv[1:]:
    lock = RunLock(Path(folder))
    try:
        print(f"{folder}: {lock.acquire()}; now {lock.path.read_text()}", flush=True)
    except RunDirLocked as error:
        print(f"{folder}: refused: {error}", flush=True)
"""


def test_a_lock_whose_slurm_job_has_ended_is_taken_over_by_a_job_of_that_cluster(local_slurm: dict,
                                                                                  tmp_path: Path) -> None:
    env = local_slurm
    with cancelled_at_exit(env) as jobs:
        jobs.append(finished := submit(env, tmp_path / "finished.out", "--wrap", "true"))
        jobs.append(running := submit(env, tmp_path / "running.out", "--wrap", "sleep 600"))
        wait_for(lambda: ended(env, finished), 60, f"job {finished} to end", tmp_path / "finished.out")
        wait_for(lambda: job_info(env, running).get("JobState") == "RUNNING", 60, f"job {running} to run",
                 tmp_path / "running.out")
        cases = {"finished": (finished, CLUSTER), "purged": ("999999", CLUSTER), "running": (running, CLUSTER),
                 "other_cluster": (finished, "another-cluster")}
        before = {name: foreign_lock(tmp_path / name, *case) for name, case in cases.items()}
        (tmp_path / "acquire.py").write_text(ACQUIRE)
        job = sbatch(["--wrap", f"python {tmp_path / 'acquire.py'} " + " ".join(str(tmp_path / n) for n in cases)],
                     env, tmp_path)
    assert job.returncode == 0, job.log[-3000:]
    taker = re.search(r"Submitted batch job (\d+)", job.log).group(1)
    lines = {name: next(line for line in job.log.splitlines() if line.startswith(f"{tmp_path / name}: "))
             for name in cases}
    for name, job_id in (("finished", finished), ("purged", "999999")):
        assert f": taken over (Slurm job {job_id} has ended); now " in lines[name], job.log[-3000:]
        record = json.loads(lines[name].split("; now ", 1)[1])
        assert (record["slurm_job_id"], record["slurm_cluster"]) == (taker, CLUSTER)
    for name in ("running", "other_cluster"):  # a running job, and a job id another controller gave
        job_id = cases[name][0]
        assert f"refused: run_dir={tmp_path / name} is in use by another training: host node-elsewhere" in lines[name]
        assert f"Slurm job {job_id}" in lines[name]
        # Only a lock that Slurm can judge is said to go when its job ends.
        assert ("or whose Slurm job has ended" in lines[name]) == (name == "running"), lines[name]
        assert (tmp_path / name / "LOCK").read_text() == before[name]  # left as it was


def test_an_unreachable_controller_lets_no_lock_go(local_slurm: dict, tmp_path: Path, monkeypatch) -> None:
    conf = Path(local_slurm["SLURM_CONF"]).read_text()
    dead = re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={free_port_range(1)}", conf)
    dead = re.sub(r"(?m)^MessageTimeout=.*\n", "", dead) + "MessageTimeout=2\n"  # squeue gives up in 2 s, not 18
    (tmp_path / "slurm.conf").write_text(dead)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    assert job_ended("1") is None  # can't tell: only an answer from Slurm lets a lock go early
