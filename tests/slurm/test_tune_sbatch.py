"""slurm/tune.sh on a real 2-node Slurm cluster (tools/local_slurm.sh): a sweep signalled ahead of its
time limit stops its trial with a saved checkpoint, requeues itself and continues the trial from it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.dist.conftest import STAGE_TINY, TINY
from tests.slurm.conftest import free_port_range
from tests.slurm.jobs import cancelled_at_exit, ended, job_info, releaser, slurm, submit, wait_for


def test_tune_sbatch_near_its_time_limit_saves_its_trial_requeues_and_continues(
        local_slurm: dict, train_shards: Path, tmp_path: Path) -> None:
    env = {**local_slurm, "RAY_NODE_IP": "127.0.0.1", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray" / "token"),
           "RAY_LOG_DIR": str(tmp_path / "ray-logs"), "RAY_PORT": str(free_port_range(1)), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}
    log, out_dir, max_steps = tmp_path / "job.out", tmp_path / "sweep", 60
    run_dir = out_dir / "trials" / "ds0_kl1e-06"
    overrides = [f"out_dir={out_dir}", f"data.shards={train_shards}", *TINY, *STAGE_TINY["vae"],
                 "train.val_batches=1", "tune.disc_start=[0]", "tune.kl_weight=[1e-6]", "tune.cpus_per_trial=1",
                 f"train.max_steps={max_steps}", "train.ckpt_every=1000"]  # no periodic checkpoint: only the stop's

    with cancelled_at_exit(env) as jobs:
        job_id = submit(env, log, "-N", "2", "--cpus-per-task=1", "--time=00:20:00", "slurm/tune.sh", *overrides)
        jobs.append(job_id)
        metrics_file = run_dir / "metrics.jsonl"
        wait_for(lambda: (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2)
                 or ended(env, job_id), 300, "the trial's second logged step", log)
        assert job_info(env, job_id)["JobState"] == "RUNNING", log.read_text()[-4000:]
        # As Slurm does 300 s before the time limit with --signal=B:USR1@300: to the batch shell only.
        assert slurm(env, "scancel", "--batch", "--signal=USR1", job_id).returncode == 0
        wait_for(lambda: job_info(env, job_id).get("Restarts") == "1", 120, "the requeue", log)
        wait_for(lambda: ended(env, job_id, on_pending=releaser(env)), 600, f"job {job_id} to end for good", log)
        job, output = job_info(env, job_id), log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    assert f"requeueing job {job_id}" in output and f"radiodiff: job {job_id} restart 1:" in output, output[-4000:]
    assert "sweep: stopped by" in output and "did not stop in time" not in output, output[-4000:]
    assert "1 trial(s) continue their run directories" in output and "the stop request of an earlier" in output
    # The requeued sweep resumed the trial's run at the checkpoint the stop saved.
    starts = sorted(int(path.stem.split("_")[1]) for path in (run_dir / "configs").iterdir())
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < max_steps, starts
    meta = json.loads((run_dir / "checkpoints" / f"step_{max_steps:08d}" / "meta.json").read_text())
    assert meta["step"] == max_steps and meta["resumed_from"][0] == starts[1]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "ae/loss" in m] == list(range(1, max_steps + 1))
    with (out_dir / "results.csv").open() as stream:
        [row] = list(csv.DictReader(stream))
    assert row["status"] == "TERMINATED" and row["steps"] == str(max_steps) and row["run_dir"] == str(run_dir)
