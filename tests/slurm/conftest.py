"""A real local Slurm cluster for the tests in this folder, started once per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dist.conftest import environment


REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = str(REPO / "tools" / "local_slurm.sh")


def skip_without_slurm() -> None:
    if shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed (apt-get install -y slurm-wlm); .ci/run installs it")


@dataclass
class Job:
    returncode: int
    log: str


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1: the tests' cluster never meets
    another one on this machine (a user's own on the default ports, or daemons a killed run left).
    From 20000: above Ray's worker ports (10002-19999), below Linux's ephemeral ones (32768-)."""
    for base in range(20000 + os.getpid() % 1000 * 8, 32768 - count, 8):
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment (SLURM_CONF, PATH with this venv) of a running 2-node local Slurm cluster."""
    skip_without_slurm()
    state = tmp_path_factory.mktemp("slurm")
    env = {**environment(), "RADIODIFF_SLURM_DIR": str(state), "RADIODIFF_SLURM_PORT": str(free_port_range(4)),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([LOCAL_SLURM, "start"], env=env, check=True, timeout=120)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run([LOCAL_SLURM, "stop"], env=env, timeout=120)


def sbatch(args: list[str], env: dict, workdir: Path, timeout_s: int = 600) -> Job:
    """Submit from the repository root, wait for the job, return its exit code and output."""
    log = workdir / "job.out"
    done = subprocess.run(["sbatch", "--wait", f"--output={log}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    text = log.read_text() if log.exists() else ""
    return Job(done.returncode, f"{done.stdout}{done.stderr}{text}")
