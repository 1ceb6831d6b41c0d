"""slurm/train_vae.sh on a real 2-node Slurm cluster (tools/local_slurm.sh): one torchrun per node, and
a preemption signal that saves, requeues the job and resumes it from its checkpoint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.dist.conftest import STAGE_TINY, TINY
from tests.slurm.jobs import cancelled_at_exit, ended, job_info, releaser, slurm, submit, wait_for

# Both "nodes" are 127.0.0.1 with 1 CPU each: one process per node, 2 ranks in all.
SBATCH = ["-N", "2", "--cpus-per-task=1", "--time=00:20:00"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(local_slurm: dict) -> dict:
    # The node names are not resolvable here (both are 127.0.0.1); a free port, because the default
    # (derived from the job id) repeats across test sessions that each start their own cluster.
    return {**local_slurm, "RADIODIFF_MASTER_ADDR": "127.0.0.1", "RADIODIFF_MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": "1"}


def _overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.shards={shards}", *TINY, *STAGE_TINY["vae"], "deepspeed.zero_stage=2", *extra]


def test_train_vae_sbatch_preempted_requeues_and_resumes(local_slurm: dict, train_shards: Path,
                                                         tmp_path: Path) -> None:
    env, log, run_dir = _environment(local_slurm), tmp_path / "job.out", tmp_path / "run"
    max_steps = 40

    with cancelled_at_exit(env) as jobs:
        job_id = submit(env, log, *SBATCH, "slurm/train_vae.sh",
                        *_overrides(run_dir, train_shards, f"train.max_steps={max_steps}", "train.ckpt_every=2"))
        jobs.append(job_id)
        wait_for(lambda: any(run_dir.glob("checkpoints/*/COMMITTED")) or ended(env, job_id), 300,
              "the first committed checkpoint", log)
        assert job_info(env, job_id)["JobState"] == "RUNNING", log.read_text()[-4000:]
        # As Slurm does ahead of a time limit with --signal=USR1@N: to every process of the job steps.
        assert slurm(env, "scancel", "--signal=USR1", job_id).returncode == 0
        wait_for(lambda: job_info(env, job_id).get("Restarts") == "1", 120, "the requeue", log)
        wait_for(lambda: ended(env, job_id, on_pending=releaser(env)), 600, f"job {job_id} to end for good", log)
        job, output = job_info(env, job_id), log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    # Both runs wrote to one log (--open-mode=append): the preempted run, then the requeued one.
    assert "vae: preempted; saved" in output and f"radiodiff: job {job_id} restart 1:" in output, output[-4000:]
    assert "vae: 2 rank(s)" in output, output[-4000:]  # two nodes, one rank each
    assert "resumed from" in output and f"finished at step {max_steps}" in output, output[-4000:]
    # torchrun ignored SIGUSR1 (slurm/torchrun.sh); had it died of it, srun would report the task's signal
    # and end the step, racing the workers' checkpoint.
    assert "User defined signal 1" not in output, output[-4000:]
    meta = json.loads((run_dir / "checkpoints" / f"step_{max_steps:08d}" / "meta.json").read_text())
    assert meta["step"] == max_steps and meta["world_size"] == 2
    assert meta["resumed_from"] and 0 < meta["resumed_from"][0] < max_steps
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "ae/loss" in m] == list(range(1, max_steps + 1))


def test_eight_ranks_sigterm_requeue_then_one_node_keeps_the_global_batch(local_slurm: dict, train_shards: Path,
                                                                          tmp_path: Path) -> None:
    """The README's multi-node command at 4 processes per node: SIGTERM (a plain scancel or a time
    limit) saves and requeues like USR1; resubmitted with -N 1 the run continues with the same global
    batch (8 maps: 8 ranks x 1, then 4 ranks x 2)."""
    env = {**_environment(local_slurm), "RADIODIFF_NPROC_PER_NODE": "4"}
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    batch = ["train.global_batch=8", "train.micro_batch=1", "train.ckpt_every=2"]

    with cancelled_at_exit(env) as jobs:
        job_id = submit(env, log, *SBATCH, "slurm/train_vae.sh",
                        *_overrides(run_dir, train_shards, "train.max_steps=12", *batch))
        jobs.append(job_id)
        wait_for(lambda: any(run_dir.glob("checkpoints/*/COMMITTED")) or ended(env, job_id), 600,
              "the first committed checkpoint", log)
        assert slurm(env, "scancel", "--signal=TERM", job_id).returncode == 0
        wait_for(lambda: job_info(env, job_id).get("Restarts") == "1", 180, "the requeue", log)
        wait_for(lambda: ended(env, job_id, on_pending=releaser(env)), 900, f"job {job_id} to end for good", log)
        job, output = job_info(env, job_id), log.read_text()
        assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), output[-4000:]
        assert "vae: 8 rank(s)" in output and "vae: preempted; saved" in output, output[-4000:]
        one_node = submit(env, tmp_path / "one.out", "-N", "1", "--cpus-per-task=1", "--time=00:20:00",
                          "slurm/train_vae.sh", *_overrides(run_dir, train_shards, "train.max_steps=14", *batch))
        jobs.append(one_node)
        wait_for(lambda: ended(env, one_node), 900, f"job {one_node} to end", tmp_path / "one.out")
    second = (tmp_path / "one.out").read_text()
    assert "vae: 4 rank(s)" in second and "resumed from" in second and "finished at step 14" in second, second[-4000:]
    meta = json.loads((run_dir / "checkpoints" / "step_00000014" / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["loader"]["position"] == 14 * 8
