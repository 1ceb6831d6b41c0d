"""tools/local_slurm.sh refuses to start a cluster whose ports another process already holds."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.slurm.conftest import LOCAL_SLURM, skip_without_slurm


@pytest.mark.parametrize("held", [0, 3], ids=["controller_port", "second_node_port"])
def test_start_refuses_ports_in_use(held: int, tmp_path: Path) -> None:
    skip_without_slurm()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = {**os.environ, "RADIODIFF_SLURM_DIR": str(tmp_path / "slurm"),
               "RADIODIFF_SLURM_PORT": str(port - held)}
        try:
            done = subprocess.run([LOCAL_SLURM, "start"], env=env, capture_output=True, text=True, timeout=60)
        finally:  # whatever did start, stopped: no daemons left for the next test's cluster
            subprocess.run([LOCAL_SLURM, "stop"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is in use" in lines[0], done.stderr
    assert not (tmp_path / "slurm" / "slurm.conf").exists(), "refused before writing its config"
