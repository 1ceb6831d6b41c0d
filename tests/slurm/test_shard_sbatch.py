"""slurm/shard.sh on a real 2-node Slurm cluster (tools/local_slurm.sh): Ray over the allocation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.slurm.conftest import sbatch


# Another user's Ray on the same machine: it runs a task every second and exits 1 if one fails.
BYSTANDER = """
import ray, time
ray.init(address="local", num_cpus=1, include_dashboard=False)
ping = ray.remote(lambda: 1)
print("up", flush=True)
while True:
    ray.get(ping.remote(), timeout=60)
    time.sleep(1)
"""


def test_shard_sbatch_runs_ray_over_two_nodes(local_slurm: dict, synth_root: Path, tmp_path: Path) -> None:
    bystander_log = tmp_path / "bystander.log"
    with bystander_log.open("w") as log:
        bystander = subprocess.Popen([sys.executable, "-c", BYSTANDER], stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=local_slurm)
    assert bystander.stdout.readline().strip() == "up", bystander_log.read_text()[-3000:]
    out = tmp_path / "shards"
    env = {**local_slurm, "RAY_NODE_IP": "127.0.0.1", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray" / "token"),
           "RAY_LOG_DIR": str(tmp_path / "ray-logs"), "RAY_PORT": "6391"}
    job = sbatch(["-N", "2", "--cpus-per-task=1", "slurm/shard.sh", f"data.root={synth_root}", f"out={out}",
                  "min_shards_per_split=2"], env, tmp_path)
    assert job.returncode == 0, job.log
    assert "Ray: 2 nodes, 2 CPUs" in job.log
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(e["num_samples"] for e in manifest["splits"].values()) == 12 * 4
    assert (tmp_path / "ray" / "token").stat().st_mode & 0o077 == 0  # the token is private
    # The job stopped its own Ray, and only its own: the other Ray on the machine still runs tasks.
    time.sleep(5)
    alive = bystander.poll() is None
    bystander.terminate()
    bystander.wait(timeout=60)
    assert alive, bystander_log.read_text()[-3000:]
    job_ray = subprocess.run(["pgrep", "-f", "gcs_server.*6391"], capture_output=True, text=True).stdout.split()
    assert job_ray == [], f"the job's Ray (port 6391) is still running: {job_ray}"
