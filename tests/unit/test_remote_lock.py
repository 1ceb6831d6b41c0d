"""A folder's lock on an fsspec URL (memory://, and s3:// through s3fs on a local S3 server): one owner,
and no publish after losing it."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import fsspec
import pytest

from radiodiff.train.lock import RunDirLocked, RunLock
from radiodiff.train.remote_lock import RemoteLock
from pipeline.shard_set import ShardSetWriter
from tests.conftest import BUCKET


def memory_root() -> str:
    return f"/remote-lock-{uuid.uuid4().hex[:8]}/shards"


@pytest.fixture(params=["memory", "s3"])
def store(request: pytest.FixtureRequest) -> tuple[fsspec.AbstractFileSystem, str]:
    """A filesystem without exclusive create and a fresh folder on it (as the filesystem names it)."""
    if request.param == "memory":
        return fsspec.filesystem("memory"), memory_root()
    return request.getfixturevalue("s3"), f"{BUCKET}{memory_root()}"


def test_a_url_lock_is_held_refused_while_fresh_taken_over_when_stale_and_released(store) -> None:
    fs, root = store
    first = RemoteLock(fs, root, name="out", owner="radiodiff-shard")
    assert first.acquire() == "acquired"
    record = json.loads(fs.cat_file(f"{root}/LOCK"))
    assert record["token"] == first.token and record["owner"] == "radiodiff-shard"
    with pytest.raises(RunDirLocked, match=f"out={fs.unstrip_protocol(root)} is in use by another radiodiff-shard"):
        RemoteLock(fs, root, name="out").acquire()
    taker = RemoteLock(fs, root, name="out", stale_s=-1)  # as if first's heartbeat were old
    assert taker.acquire().startswith("taken over (no heartbeat for")
    first.release()  # not first's any more: its release leaves the taker's lock
    assert json.loads(fs.cat_file(f"{root}/LOCK"))["token"] == taker.token
    taker.release()
    assert not fs.exists(f"{root}/LOCK")


def test_of_two_runs_claiming_a_url_at_once_exactly_one_owns_it(store) -> None:
    fs, root = store
    locks = [RemoteLock(fs, root, name="out") for _ in range(2)]
    outcomes: dict[int, str] = {}
    barrier = threading.Barrier(2)

    def claim(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = locks[index].acquire()
        except RunDirLocked as err:
            outcomes[index] = f"refused: {err}"

    threads = [threading.Thread(target=claim, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [index for index, outcome in outcomes.items() if outcome == "acquired"]
    assert len(won) == 1 and json.loads(fs.cat_file(f"{root}/LOCK"))["token"] == locks[won[0]].token, outcomes
    locks[won[0]].release()


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_a_run_that_lost_its_lock_does_not_publish(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        request.getfixturevalue("s3")
    out = {"local": str(tmp_path / "shards"), "memory": f"memory://{memory_root()}",
           "s3": f"s3://{BUCKET}{memory_root()}"}[where]
    writer = ShardSetWriter(out)
    with pytest.raises(RunDirLocked, match="its lock is now held by another radiodiff-encode: .*stopped before "
                                           "publishing"):
        with writer.run("radiodiff-shard"):
            writer.stage("train/train-000000.tar", b"a shard")
            # Another run took the folder over, believing this one dead (a heartbeat lost on a slow filesystem).
            taker = (RunLock(Path(writer.root), name="out", owner="radiodiff-encode", stale_s=-1) if where == "local"
                     else RemoteLock(writer.fs, writer.root, name="out", owner="radiodiff-encode", stale_s=-1))
            taker.acquire()
            writer.publish(["train/train-000000.tar"], {"splits": {}})
    assert writer.fs.find(writer.root) == [f"{writer.root}/LOCK"]  # nothing published, nothing staged stays
    taker.release()
