"""Shared fixtures: the real RadioMapSeer subset, a small synthetic RadioMapSeer, a Ray instance, an S3
server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import fsspec
import pytest

# What a torch process group puts in the environment. A test process that joined a group of its own
# (world_of_one) has these set; a training or a Ray it starts later must not inherit its rank and port.
PROCESS_GROUP_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

REPO = Path(__file__).resolve().parents[1]
REAL_ROOT = Path(os.environ.get("RADIOMAPSEER_REAL", REPO.parent / "shared" / "radiomapseer-real"))
BUCKET = "radiodiff"  # the s3 fixture's


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``pytest -n 2`` (the README's test command): each test file runs whole on one worker, so a
    module fixture (a trained run that several tests read) is built once; the Slurm tests, which
    share one local cluster, run together on one worker; files are handed out in collection order
    (tests/dist first: the long multi-rank trainings start early, the many short unit tests fill
    the end), not xdist's default of the files with most tests first."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/slurm" if path.startswith("tests/slurm/") else path

    config.option.loadscopereorder = False
    return FileScheduling(config, log)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real RadioMapSeer subset (all 701 city maps, 61 DPM maps), next to the repository."""
    if not (REAL_ROOT / "png" / "buildings_complete").is_dir():
        pytest.skip(f"real RadioMapSeer subset not found at {REAL_ROOT} (set RADIOMAPSEER_REAL)")
    return REAL_ROOT


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic RadioMapSeer written by radiodiff-synth's own code (read-only for tests)."""
    from radiodiff.config import SynthConfig
    from radiodiff.data.synth_main import run_synth

    out = tmp_path_factory.mktemp("synth") / "radiomapseer"
    cfg = SynthConfig(out=str(out), num_maps=12, num_tx=4, seed=3,
                      simulations=["DPM", "carsDPM", "IRT4"], missing_versions=2)
    assert run_synth(cfg) == 0
    return out


@pytest.fixture
def synth_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic root that a test may damage."""
    return Path(shutil.copytree(synth_root, tmp_path / "radiomapseer"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by the tests that run Ray tasks (starting Ray takes seconds)."""
    ray = pytest.importorskip("ray")
    # Ray's processes inherit this environment: not the process group that world_of_one may have set.
    saved = {key: os.environ.pop(key) for key in PROCESS_GROUP_KEYS if key in os.environ}
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.update(saved)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def train_shards(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of the session's synthetic RadioMapSeer, written by the real Ray sharder."""
    from pipeline.synthetic_shards import shard_folder

    return shard_folder(synth_root, tmp_path_factory.mktemp("train-shards"))


@pytest.fixture(scope="session")
def world_of_one():
    """A real one-process group, once per session: DeepSpeed keeps its group for the process's life."""
    from radiodiff import dist

    saved = {key: os.environ.pop(key) for key in PROCESS_GROUP_KEYS if key in os.environ}
    info = dist.setup()  # sets the keys for a world of one
    yield info
    dist.teardown()
    for key in PROCESS_GROUP_KEYS:  # later tests start their own processes from this environment
        os.environ.pop(key, None)
    os.environ.update(saved)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real filesystem of its own (tmpfs), to be filled; unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk (needs root): {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def resize(mount_point: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount_point)], check=True)


def fill(mount_point: Path) -> Path:
    """Write until the filesystem refuses: a disk full to the last byte."""
    filler = mount_point / "filler"
    try:
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError:
        return filler  # not even an inode left
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def foreign_lock(folder: Path, job_id: str, cluster: str) -> str:
    """Write ``folder``/LOCK as a training of Slurm job ``job_id`` on ``cluster``, running on another host
    with a fresh heartbeat, leaves it; returns the text written."""
    folder.mkdir(exist_ok=True)
    record = json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job_id": job_id, "slurm_cluster": cluster,
                         "since": time.time(), "heartbeat": time.time(), "token": "theirs", "owner": "training"})
    (folder / "LOCK").write_text(record)
    return record


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[fsspec.AbstractFileSystem]:
    """A bucket on a fresh S3 server; this process and the ones it starts reach it through AWS_ENDPOINT_URL."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem cached with another test's server
    yield fsspec.filesystem("s3", skip_instance_cache=True)
    server.stop()
