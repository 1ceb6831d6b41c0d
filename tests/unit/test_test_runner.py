"""The test command itself: a crashed pytest-xdist worker fails the run, once, instead of hanging."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The crashing file is collected last, so that the other worker has run out of files and been told
# to stop when the crash comes: with worker restarts, the case in which the run waited forever.
FILES = {
    "test_a_long.py": "import time\n\ndef test_long():\n    time.sleep(4)\n",
    "test_b_short.py": "def test_short():\n    pass\n",
    "test_z_crash.py": (
        "import os\nimport time\n\n"
        "def test_before():\n    time.sleep(1)\n\n"
        "def test_crash():\n    time.sleep(1)\n    os._exit(3)\n\n"
        "def test_after():\n    pass\n"
    ),
}


@pytest.mark.slow
def test_a_crashed_worker_fails_the_run_once_without_hanging(tmp_path: Path):
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", tests / "conftest.py")
    for name, text in FILES.items():
        (tests / name).write_text(text)
    command = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
               "-p", "no:cacheprovider", "-n", "2", "-q", str(tests)]
    # Its own session, so that a run that hangs is stopped with its workers.
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as run:
        try:
            output, _ = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            output, _ = run.communicate()
            pytest.fail(f"pytest -n 2 still ran 120 s after a worker crashed:\n{output}")
    assert run.returncode == 1, output
    # One failure, the crash, reported once (with restarts: once per new worker that re-ran it).
    failed = re.findall(r"^FAILED (\S+)", output, re.M)
    assert failed == ["tests/test_z_crash.py::test_crash"], output
    assert "crashed while running 'tests/test_z_crash.py::test_crash'" in output, output
    assert "2 passed" in output or "3 passed" in output, output
