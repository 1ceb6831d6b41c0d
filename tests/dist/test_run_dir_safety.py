"""Trustworthy run directories, with real training processes: one owner at a time (a lock with a
heartbeat), verified checkpoints with fallback, a config.yaml that a refused start leaves alone,
a full disk during a save that loses nothing, and a write that fails on rank 0 alone stopping every
rank with its cause."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from radiodiff.runs import layout
from radiodiff.train.lock import RunLock
from tests.conftest import fill, resize
from tests.dist.conftest import start, stopped_at, train
from tests.dist.test_fault_tolerance import committed, kill_tree, wait_for

ONE = ["deepspeed.zero_stage=1", "deepspeed.precision=fp32", "train.keep_last=5", "train.ckpt_every=2",
       "train.global_batch=2", "train.lr_decay_steps=6"]  # one schedule for runs of any length


@pytest.fixture(scope="module")
def whole(train_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 6-step run: what a run that survived a fault must reproduce bitwise."""
    run = train("vae", tmp_path_factory.mktemp("whole") / "run", train_shards, *ONE, "train.max_steps=6", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_a_second_training_on_a_run_dir_exits_2_naming_the_owner(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Far more steps than the second start takes to begin on a loaded machine (400 tiny steps did
    # not: the first had finished and the second resumed); the first is killed at the end.
    steps = "train.max_steps=1000000"
    first = start("vae", run_dir, train_shards, *ONE, steps, nproc=1)
    try:
        wait_for(run_dir / "checkpoints" / "step_00000002" / "COMMITTED", first)
        config = (run_dir / "config.yaml").read_bytes()
        second = train("vae", run_dir, train_shards, *ONE, steps, nproc=1)
        assert second.returncode == 2, second.output[-3000:]
        owner = json.loads((run_dir / "LOCK").read_text())
        assert f"pid {owner['pid']}" in second.output and socket.gethostname() in second.output
        assert "error: run_dir=" in second.output and "Traceback" not in second.output
        assert (run_dir / "config.yaml").read_bytes() == config
    finally:
        kill_tree(first)


def test_a_stale_lock_is_taken_over(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = {"host": "elsewhere", "pid": 1, "slurm_job_id": None, "since": 0, "heartbeat": time.time() - 3600,
             "token": "old"}
    (run_dir / "LOCK").write_text(json.dumps(stale))
    run = train("vae", run_dir, train_shards, *ONE, "train.max_steps=2", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    assert "taken over (no heartbeat for" in run.output
    assert not (run_dir / "LOCK").exists()  # released at the end


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(whole, train_shards: Path,
                                                                             tmp_path: Path) -> None:
    run_dir = stopped_at(whole.run_dir, 4, tmp_path / "run")
    assert committed(run_dir) == [2, 4]
    victim = run_dir / "checkpoints" / "step_00000004" / "autoencoder" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    resumed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", nproc=1)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"{victim}: " in resumed.output and "truncated" in resumed.output and "(step 2)" in resumed.output
    aside = list((run_dir / "checkpoints" / "rejected").glob("step_00000004.*"))
    assert len(aside) == 1 and (aside[0] / "autoencoder").is_dir()  # moved, not deleted
    assert resumed.losses("ae/loss") == whole.losses("ae/loss")  # bitwise: the same run as without the fault


def test_invalid_meta_json_names_the_file_and_falls_back(whole, train_shards: Path, tmp_path: Path) -> None:
    run_dir = stopped_at(whole.run_dir, 4, tmp_path / "run")
    meta = run_dir / "checkpoints" / "step_00000004" / "meta.json"
    meta.write_text("{broken")
    resumed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=4", nproc=1)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert str(meta) in resumed.output and "(step 2)" in resumed.output


def test_a_refused_start_leaves_config_yaml_alone(whole, train_shards: Path, tmp_path: Path) -> None:
    run_dir = stopped_at(whole.run_dir, 2, tmp_path / "run")
    config = (run_dir / "config.yaml").read_bytes()
    bigger = train("vae", run_dir, train_shards, *ONE, "train.max_steps=4", "model.autoencoder.ch=64", nproc=1)
    assert bigger.returncode == 2 and "model.autoencoder.ch=64 (the run has 32)" in bigger.output, bigger.output[-2000:]
    ldm = train("ldm", run_dir, train_shards, *ONE, "train.max_steps=4", f"vae.checkpoint={run_dir}", nproc=1)
    assert ldm.returncode == 2 and "holds a vae run" in ldm.output, ldm.output[-2000:]
    assert (run_dir / "config.yaml").read_bytes() == config
    assert [p.name for p in sorted((run_dir / "configs").iterdir())] == ["step_00000000.yaml"]


def test_a_full_disk_during_a_save_loses_nothing(whole, train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    failed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", "train.fail_save_steps=[4]", nproc=1)
    assert failed.returncode == 1 and "No space left on device" in failed.output, failed.output[-3000:]
    assert "Traceback" not in failed.output and committed(run_dir) == [2]
    resumed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", nproc=1)
    assert resumed.returncode == 0 and "(step 2)" in resumed.output, resumed.output[-3000:]
    assert resumed.losses("ae/loss") == whole.losses("ae/loss")  # bitwise: the same run as without the fault
    assert not (run_dir / "LOCK").exists() and os.listdir(run_dir / "checkpoints")


def test_a_commit_that_fails_on_rank_0_stops_every_rank_in_one_line(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    failed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", "train.micro_batch=1",
                   "train.fail_commit_steps=[4]")
    # torchrun reports its failed ranks with a traceback of its own; the ranks print none
    assert failed.returncode == 1 and "radiodiff/train/" not in failed.output, failed.output[-3000:]
    step4 = run_dir / "checkpoints" / "step_00000004"
    # Each rank's line (torchrun may stop the second before its line is out) names rank 0's cause
    lines = [line for line in failed.output.splitlines() if line.startswith(f"error: committing checkpoint {step4}")]
    assert 1 <= len(lines) <= 2, failed.output[-3000:]
    assert all("failed (rank 0: [Errno 28] No space left on device (injected)" in line for line in lines), lines
    assert committed(run_dir) == [2] and not (step4 / "COMMITTED").exists()
    resumed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", "train.micro_batch=1")
    assert resumed.returncode == 0 and "(step 2)" in resumed.output, resumed.output[-3000:]
    assert committed(run_dir) == [2, 4, 6]


def test_a_real_full_disk_fails_in_one_line_and_loses_nothing(whole, train_shards: Path, small_disk: Path) -> None:
    # The disk holds the run's first checkpoint, not its second: torch.save and DeepSpeed report
    # that as a RuntimeError, not the OSError of the injected fault above.
    first = whole.run_dir / "checkpoints" / "step_00000002"
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    resize(small_disk, int(size * 1.5) + (1 << 20))
    run_dir = small_disk / "run"
    failed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", nproc=1)
    assert failed.returncode == 1 and "Traceback" not in failed.output, failed.output[-3000:]
    assert "error: saving checkpoint" in failed.output and committed(run_dir) == [2]
    assert not (run_dir / "LOCK").exists()

    filler = fill(small_disk)  # a restart while the disk is still full: refused in one line, no LOCK left
    again = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", nproc=1)
    assert again.returncode == 2 and "Traceback" not in again.output, again.output[-3000:]
    assert "cannot take its lock" in again.output and "No space left on device" in again.output
    assert not (run_dir / "LOCK").exists() and committed(run_dir) == [2]

    filler.unlink(missing_ok=True)
    resize(small_disk, 64 << 20)
    resumed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", nproc=1)
    assert resumed.returncode == 0 and "(step 2)" in resumed.output, resumed.output[-3000:]
    assert resumed.losses("ae/loss") == whole.losses("ae/loss")  # bitwise: the same run as without the fault


def test_a_conversion_to_another_world_size_on_a_full_disk_stops_every_rank_in_one_line(whole, train_shards: Path,
                                                                                         small_disk: Path) -> None:
    run_dir = stopped_at(whole.run_dir, 2, small_disk / "run")  # saved on 1 rank; resumed on 2 below
    disk = os.statvfs(small_disk)
    resize(small_disk, (disk.f_blocks - disk.f_bfree) * disk.f_frsize + (256 << 10))  # no room for the conversion
    two = [*ONE, "train.micro_batch=1", "train.max_steps=4"]
    failed = train("vae", run_dir, train_shards, *two)
    assert failed.returncode == 1 and "radiodiff/train/" not in failed.output, failed.output[-3000:]
    source = run_dir / "checkpoints" / "step_00000002" / "autoencoder"
    lines = [line for line in failed.output.splitlines() if line.startswith(f"error: converting {source} for 2 rank")]
    # One line per rank, each with rank 0's cause; torchrun may stop the second rank before its line is out.
    assert 1 <= len(lines) <= 2, failed.output[-3000:]
    assert all(re.search(r"failed \(rank 0: .*had 0\.\d MiB free\); the checkpoint itself is unchanged$", line)
               for line in lines), lines
    layout.verify_checkpoint(source.parent)  # unchanged, and no partial conversion left in it
    assert not (source.parent / "autoencoder_universal").exists()
    assert not (run_dir / "LOCK").exists()

    resize(small_disk, 64 << 20)
    resumed = train("vae", run_dir, train_shards, *two)
    assert resumed.returncode == 0 and "resuming 1 -> 2 ranks at step 2" in resumed.output, resumed.output[-3000:]
    assert committed(run_dir) == [2, 4]


def test_a_config_rank_0_cannot_write_stops_every_rank_in_one_line(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / layout.CONFIG_HISTORY).write_text("a file where the config history goes")
    failed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=2", "train.micro_batch=1")
    assert failed.returncode == 1 and "radiodiff/" not in failed.output, failed.output[-3000:]
    head = f"error: writing the config of run_dir={run_dir} "
    lines = [line for line in failed.output.splitlines() if line.startswith(head)]
    assert 1 <= len(lines) <= 2, failed.output[-3000:]  # torchrun may stop the second rank before its line is out
    assert all("failed (rank 0: [Errno 17] File exists" in line for line in lines), lines
    assert sorted(os.listdir(run_dir)) == [layout.CONFIG_HISTORY]  # no config.yaml, no checkpoint, no LOCK


def test_a_corrupt_checkpoint_rank_0_cannot_set_aside_stops_every_rank_in_one_line(whole, train_shards: Path,
                                                                                  tmp_path: Path) -> None:
    run_dir = stopped_at(whole.run_dir, 4, tmp_path / "run")
    step4 = run_dir / "checkpoints" / "step_00000004"
    (step4 / "meta.json").write_text("{broken")
    (run_dir / "checkpoints" / layout.REJECTED).write_text("a file where rejected checkpoints go")
    failed = train("vae", run_dir, train_shards, *ONE, "train.max_steps=6", "train.micro_batch=1")
    assert failed.returncode == 1 and "radiodiff/" not in failed.output, failed.output[-3000:]
    lines = [line for line in failed.output.splitlines() if line.startswith(f"error: checkpoint {step4} is not usable")]
    assert 1 <= len(lines) <= 2, failed.output[-3000:]
    assert all("setting it aside failed (rank 0: [Errno 17] File exists" in line for line in lines), lines
    assert committed(run_dir) == [2, 4] and not (run_dir / "LOCK").exists()  # nothing moved, nothing trained


def test_a_refused_start_leaves_no_empty_run_dir_and_keeps_a_folder_it_did_not_make(train_shards: Path,
                                                                                  tmp_path: Path) -> None:
    mine = tmp_path / "made_by_the_user"
    mine.mkdir()
    for run_dir in (tmp_path / "new" / "run", mine):
        refused = train("ldm", run_dir, train_shards, *ONE, "train.max_steps=2",
                        f"vae.checkpoint={tmp_path / 'no_vae'}", nproc=1)
        assert refused.returncode == 2 and "no_vae" in refused.output, refused.output[-2000:]
    assert not (tmp_path / "new").exists()  # both folders it made are gone again
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_lock_refused_by_a_full_disk_leaves_no_folder_it_made(small_disk: Path) -> None:
    filler = fill(small_disk)
    with pytest.raises(OSError, match="No space left on device"):
        RunLock(small_disk / "new" / "run").acquire()
    assert os.listdir(small_disk) == [filler.name]
