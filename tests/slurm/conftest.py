"""A real local Slurm cluster for the tests in this folder, started once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dist.conftest import environment


REPO = Path(__file__).resolve().parents[2]


@dataclass
class Job:
    returncode: int
    log: str


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment (SLURM_CONF, PATH with this venv) of a running 2-node local Slurm cluster."""
    if shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed (apt-get install -y slurm-wlm); .ci/run installs it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**environment(), "RADIODIFF_SLURM_DIR": str(state),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(REPO / "tools" / "local_slurm.sh"), "start"], env=env, check=True, timeout=120)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run([str(REPO / "tools" / "local_slurm.sh"), "stop"], env=env, timeout=120)


def sbatch(args: list[str], env: dict, workdir: Path, timeout_s: int = 600) -> Job:
    """Submit from the repository root, wait for the job, return its exit code and output."""
    log = workdir / "job.out"
    done = subprocess.run(["sbatch", "--wait", f"--output={log}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    text = log.read_text() if log.exists() else ""
    return Job(done.returncode, f"{done.stdout}{done.stderr}{text}")
