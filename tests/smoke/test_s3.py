"""Shards on S3, through s3fs against an S3 API server on this machine (moto's: every call is an HTTP
request, as to AWS): the sharder's Ray tasks write a set to an s3:// URL under its lock, a second
sharder is refused by that lock, and a training reads the set through a node-local cache."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from radiodiff.cli import run_app
from radiodiff.train.remote_lock import RemoteLock
from pipeline.shard import shard_command
from tests.conftest import BUCKET
from tests.dist.conftest import train


def shard_to(url: str, synth_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from pipeline.shard import main; raise SystemExit(main())",
                           f"data.root={synth_root}", f"out={url}", "min_shards_per_split=2", "ray.num_cpus=1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_shard_set_on_s3_is_complete_and_trains_a_vae(s3, synth_root: Path, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/shards"
    done = shard_to(url, synth_root)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(s3.cat_file(f"{url}/manifest.json"))
    shards = [s for entry in manifest["splits"].values() for s in entry["shards"]]
    assert len(shards) >= 6
    for shard in shards:
        assert hashlib.sha256(s3.cat_file(f"{url}/{shard['path']}")).hexdigest() == shard["sha256"], shard["path"]
    stored = sorted(path.removeprefix(f"{BUCKET}/shards/") for path in s3.find(url))
    assert stored == sorted(["manifest.json", *(s["path"] for s in shards)])  # no lock, nothing staged left

    cache = tmp_path / "cache"
    run = train("vae", tmp_path / "run", url, "train.max_steps=2", "deepspeed.precision=fp32",
                f"data.cache_dir={cache}", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    assert [m["step"] for m in run.metrics() if "ae/loss" in m] == [1, 2]
    fetched = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in cache.glob("*.tar")}
    assert fetched and all(name == f"{digest}.tar" for name, digest in fetched.items())


def test_a_second_sharder_on_the_same_s3_url_is_refused_naming_the_owner(s3, synth_root: Path, capsys) -> None:
    url = f"s3://{BUCKET}/locked"
    with RemoteLock(s3, f"{BUCKET}/locked", where=url, name="out", owner="radiodiff-encode"):
        assert run_app("shard", shard_command, [f"data.root={synth_root}", f"out={url}"]) == 2
        assert s3.find(url) == [f"{BUCKET}/locked/LOCK"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: out={url} is in use by another radiodiff-encode: "
                                               f"host {socket.gethostname()}, pid {os.getpid()}"), err
    s3.invalidate_cache()
    assert s3.find(url) == []  # released
