"""slurm/shard.sh on a real 2-node Slurm cluster (tools/local_slurm.sh): Ray over the allocation."""

from __future__ import annotations

import json
from pathlib import Path

from tests.slurm.conftest import sbatch


def test_shard_sbatch_runs_ray_over_two_nodes(local_slurm: dict, synth_root: Path, tmp_path: Path) -> None:
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
