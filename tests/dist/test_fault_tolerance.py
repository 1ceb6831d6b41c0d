"""Crashes, preemption, non-finite losses and world-size changes, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from tests.dist.conftest import start, train

# The default precision (auto): what these tests ask of a run does not depend on it, and bf16 on a CPU without
# native bf16 runs through fallback kernels many times slower than fp32 (exact resume tests autocast itself).
CKPT = ["deepspeed.zero_stage=2", "train.keep_last=20"]


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {path} appeared:\n"
                                 f"{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout_s} s")
        time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [c for child in map(int, children) for c in (child, *descendants(child))]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its ranks in their own sessions)."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def meta(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())


def committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run_dir / "checkpoints").glob("step_*/COMMITTED"))


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_restart_resumes_from_the_newest_committed(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start("vae", run_dir, train_shards, *CKPT, "train.max_steps=200", "train.ckpt_every=2")
    try:
        wait_for(run_dir / "checkpoints" / "step_00000002" / "COMMITTED", process)
    finally:
        kill_tree(process)  # torchrun and both ranks, mid-training
    assert not descendants(process.pid)
    newest = committed(run_dir)[-1]
    partial = run_dir / "checkpoints" / "step_00000150"  # a save killed before its commit
    (partial / "autoencoder").mkdir(parents=True)
    (partial / "meta.json").write_text(json.dumps({"step": 150}))
    resumed = train("vae", run_dir, train_shards, *CKPT, f"train.max_steps={newest + 2}", "train.ckpt_every=2")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"(step {newest})" in resumed.output and "step_00000150" not in resumed.output
    assert meta(run_dir, newest + 2)["resumed_from"] == [newest]
    assert steps_logged(run_dir) == list(range(1, newest + 3))  # nothing logged twice
    assert not partial.exists()  # replaced stale partial saves are pruned once newer commits exist


def test_sigusr1_saves_and_exits_75_then_resumes(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start("vae", run_dir, train_shards, *CKPT, "train.max_steps=200", "train.ckpt_every=100", nproc=1)
    try:
        wait_for(run_dir / "metrics.jsonl", process)
        os.kill(process.pid, signal.SIGUSR1)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process)
    assert process.returncode == 75, output[-3000:]
    (stopped,) = committed(run_dir)
    assert "preempted" in output and 0 < stopped < 100
    resumed = train("vae", run_dir, train_shards, *CKPT, f"train.max_steps={stopped + 1}", nproc=1)
    assert resumed.returncode == 0 and f"(step {stopped})" in resumed.output, resumed.output[-3000:]


def test_a_stop_file_stops_both_ranks_with_a_checkpoint_and_a_run_started_with_it_trains_nothing(
        train_shards: Path, tmp_path: Path) -> None:
    run_dir, stop_file = tmp_path / "run", tmp_path / "STOP"
    args = (*CKPT, "train.ckpt_every=100", f"train.stop_file={stop_file}")
    process = start("vae", run_dir, train_shards, *args, "train.max_steps=200")
    try:
        wait_for(run_dir / "metrics.jsonl", process)
        stop_file.touch()  # each rank looks for it on its own clock; the step's agreement stops both together
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process)
    assert output.count("exitcode: 75") + output.count("exitcode  : 75") >= 1, output[-3000:]
    (stopped,) = committed(run_dir)
    assert f"vae: the stop file {stop_file} appeared; saved" in output and 0 < stopped < 100
    assert meta(run_dir, stopped)["world_size"] == 2
    configs = sorted(path.name for path in (run_dir / "configs").iterdir())
    again = train("vae", run_dir, train_shards, *args, f"train.max_steps={stopped + 1}")
    assert again.returncode != 0 and f"the stop file {stop_file} exists; nothing trained" in again.output
    assert committed(run_dir) == [stopped] and sorted(path.name for path in (run_dir / "configs").iterdir()) == configs
    stop_file.unlink()
    resumed = train("vae", run_dir, train_shards, *args, f"train.max_steps={stopped + 1}")
    assert resumed.returncode == 0 and f"(step {stopped})" in resumed.output, resumed.output[-3000:]


def test_signal_on_one_rank_stops_both_ranks_with_a_checkpoint(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = start("vae", run_dir, train_shards, *CKPT, "train.max_steps=200", "train.ckpt_every=100")
    try:
        wait_for(run_dir / "metrics.jsonl", process)
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGUSR1)  # only one rank hears it; all ranks agree to stop
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process)
    (stopped,) = committed(run_dir)
    assert meta(run_dir, stopped)["world_size"] == 2
    assert output.count("exitcode: 75") + output.count("exitcode  : 75") >= 1, output[-3000:]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    weights = torch.load(folder / "autoencoder_weights.pt", weights_only=True)
    disc = torch.load(folder / "discriminator" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {**weights, **{f"disc.{k}": v for k, v in disc.items()}}


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = train("vae", run_dir, train_shards, *CKPT, "train.max_steps=4", "train.ckpt_every=1",
                "train.nan_steps=[3]", "train.nan_rank=1", "loss.disc_start=0")
    assert run.returncode == 0, run.output[-3000:]
    skipped = {m["step"]: m["skipped_steps"] for m in run.metrics()}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}
    before, at, after = (_weights(run_dir, s) for s in (2, 3, 4))
    assert all(torch.equal(before[k], at[k]) for k in before)  # step 3 changed nothing, on any engine
    assert any(not torch.equal(at[k], after[k]) for k in at)  # step 4 trained again
    assert meta(run_dir, 4)["skipped_steps"] == 1 and meta(run_dir, 4)["bad_in_a_row"] == 0


def test_repeated_nonfinite_losses_abort(train_shards: Path, tmp_path: Path) -> None:
    run = train("vae", tmp_path / "run", train_shards, *CKPT, "train.max_steps=6", "train.nan_steps=[2,3]",
                "train.max_bad_steps=2", nproc=1)
    assert run.returncode == 1
    assert "non-finite loss in 2 updates in a row (up to step 3)" in run.output


def test_a_run_ending_in_skipped_updates_says_so(train_shards: Path, tmp_path: Path) -> None:
    run = train("vae", tmp_path / "run", train_shards, *CKPT, "train.max_steps=3", "train.nan_steps=[2,3]",
                "train.max_bad_steps=3", nproc=1)
    assert run.returncode == 0, run.output[-3000:]  # finished: fewer than max_bad_steps in a row
    assert ("warning: vae: the last 2 update(s), to step 3, had non-finite losses and were skipped: the saved "
            "weights are those after step 1") in run.output


def test_saved_on_two_ranks_resumes_on_one(train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = train("vae", run_dir, train_shards, *CKPT, "train.max_steps=2")
    assert first.returncode == 0, first.output[-3000:]
    second = train("vae", run_dir, train_shards, *CKPT, "train.max_steps=3", nproc=1)
    assert second.returncode == 0, second.output[-3000:]
    assert "resuming 2 -> 1 ranks" in second.output
    assert (run_dir / "checkpoints" / "step_00000002" / "autoencoder_universal").is_dir()
    assert meta(run_dir, 3)["world_size"] == 1 and meta(run_dir, 3)["resumed_from"] == [2]
    logvar = second.losses("ae/logvar")
    assert logvar[3] < logvar[2] < logvar[1] < 0  # the learned logvar continued: weights were not reset
