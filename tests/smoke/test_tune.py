"""radiodiff-tune end to end: real Ray Tune trials of the tiny VAE-GAN on synthetic shards."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import OmegaConf

from radiodiff.cli import compose, run_app, split_config_file
from radiodiff.config import ConfigError, TrainVaeConfig, TuneSweepConfig
from radiodiff.train.lock import RunLock
from pipeline.tune import check_search_available, tune_command
from tests.dist.conftest import STAGE_TINY

TINY = ["model=tiny", "data.num_workers=0", *STAGE_TINY["vae"], "wandb.enabled=false", "train.val_batches=1",
        "tune.cpus_per_trial=1", "ray.num_cpus=2"]


def sweep(out_dir: Path, shards: Path, *overrides: str) -> int:
    """radiodiff-tune's entry-point body (the Hydra composition included) on the session's Ray."""
    return run_app("tune", tune_command, [f"out_dir={out_dir}", f"data.shards={shards}", *TINY, *overrides])


def read_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "results.csv").open() as stream:
        return list(csv.DictReader(stream))


def trial_dirs(out_dir: Path) -> list[str]:
    return sorted(path.name for path in (out_dir / "trials").iterdir())


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def when_logged(run_dir: Path, step: int, action: Callable[[], None], timeout_s: float = 300) -> threading.Thread:
    """A thread that calls ``action`` once ``run_dir`` has logged ``step``."""
    def wait_then_act() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if step in logged_steps(run_dir):
                    break
            time.sleep(0.1)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


@pytest.fixture(autouse=True)
def quiet_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def grid_sweep(ray_local, train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out_dir = tmp_path_factory.mktemp("tune-grid")
    code = sweep(out_dir, train_shards, "tune.disc_start=[0,2]", "tune.kl_weight=[1e-6,1e-2]",
                 "train.max_steps=3", "train.val_every=3")
    return out_dir, code


def test_grid_sweep_writes_one_row_per_combination(grid_sweep: tuple[Path, int]) -> None:
    out_dir, code = grid_sweep
    assert code == 0
    rows = read_rows(out_dir)
    assert sorted((int(r["disc_start"]), float(r["kl_weight"])) for r in rows) == [
        (0, 1e-6), (0, 1e-2), (2, 1e-6), (2, 1e-2)]
    assert len({r["trial_id"] for r in rows}) == 4
    for row in rows:
        assert row["status"] == "TERMINATED" and row["error"] == ""
        assert int(row["steps"]) == 3
        assert math.isfinite(float(row["val/psnr"])) and math.isfinite(float(row["val/ssim"]))
        assert math.isfinite(float(row["ae/loss"]))


def test_each_trial_is_a_run_directory_with_its_parameters(grid_sweep: tuple[Path, int]) -> None:
    out_dir, _ = grid_sweep
    for row in read_rows(out_dir):
        run_dir = Path(row["run_dir"])
        assert run_dir == out_dir / "trials" / f"ds{row['disc_start']}_kl{float(row['kl_weight'])!r}"
        assert (run_dir / "checkpoints" / "step_00000003" / "COMMITTED").is_file()
        assert json.loads((run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text())["step"] == 3
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == 3 and any("val/psnr" in m for m in logged)
        # The reported val/psnr is the one the trial's own training logged.
        assert float(row["val/psnr"]) == pytest.approx(next(m["val/psnr"] for m in logged if "val/psnr" in m))
        saved = OmegaConf.load(run_dir / "config.yaml")
        assert saved.loss.disc_start == int(row["disc_start"]) and saved.loss.kl_weight == float(row["kl_weight"])


def test_best_yaml_composes_as_a_train_vae_config(grid_sweep: tuple[Path, int], tmp_path: Path) -> None:
    out_dir, _ = grid_sweep
    rows = read_rows(out_dir)
    best = max(rows, key=lambda r: float(r["val/psnr"]))
    # Exactly what `radiodiff-train-vae --config out_dir/best.yaml run_dir=...` composes.
    config_file, overrides = split_config_file(["--config", str(out_dir / "best.yaml"),
                                                f"run_dir={tmp_path / 'again'}"])
    cfg = compose("train_vae", overrides, config_file)
    assert isinstance(cfg, TrainVaeConfig)
    assert cfg.run_dir == str(tmp_path / "again")
    assert cfg.loss.disc_start == int(best["disc_start"]) and cfg.loss.kl_weight == float(best["kl_weight"])
    assert cfg.train.max_steps == 3 and cfg.train.val_every == 3
    assert cfg.model.autoencoder.ch == 32 and cfg.data.image_size == 64  # the tiny preset, in full


def test_failed_trials_are_reported_and_fail_the_sweep(ray_local, train_shards: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code = sweep(tmp_path, train_shards, "tune.disc_start=[0]", "tune.kl_weight=[1e-6]", "train.max_steps=2",
                 "train.nan_steps=[1]", "train.max_bad_steps=1")
    assert code == 1
    [row] = read_rows(tmp_path)
    assert row["status"] == "ERROR" and row["val/psnr"] == ""
    assert "non-finite loss" in row["error"] and "train.max_bad_steps=1" in row["error"]
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "non-finite loss" in printed
    assert not (tmp_path / "best.yaml").exists()


def test_multi_worker_trial_stops_on_both_ranks_and_resubmitted_reports_its_run(ray_local, train_shards: Path,
                                                                                tmp_path: Path) -> None:
    args = ("tune.disc_start=[1]", "tune.kl_weight=[1e-6]", "tune.workers_per_trial=2", "train.ckpt_every=1000",
            "train.micro_batch=1", "train.val_every=1", "train.log_every=1")  # the global batch of 2 over 2 ranks
    run_dir = tmp_path / "trials" / "ds1_kl1e-06"
    watcher = when_logged(run_dir, 1, (tmp_path / "STOP").touch)  # a user's touch out_dir/STOP
    assert sweep(tmp_path, train_shards, *args, "train.max_steps=200") == 75
    watcher.join()
    [stopped] = committed_steps(run_dir)  # both Ray Train ranks stopped at one update and saved together
    meta = json.loads((run_dir / "checkpoints" / f"step_{stopped:08d}" / "meta.json").read_text())
    assert 2 <= stopped < 200 and meta["world_size"] == 2 and meta["step"] == stopped
    # Resubmitted to end there: both ranks find the run finished and report what it logged (the validation
    # of the update before the stop), in Ray Train's new folder.
    assert sweep(tmp_path, train_shards, *args, f"train.max_steps={stopped}") == 0
    [row] = read_rows(tmp_path)
    assert row["status"] == "TERMINATED" and row["steps"] == str(stopped) and math.isfinite(float(row["val/psnr"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert float(row["val/psnr"]) == [r["val/psnr"] for r in records if "val/psnr" in r][-1]
    assert committed_steps(run_dir) == [stopped] and len(list((tmp_path / "ray_train").iterdir())) == 2


def test_sweep_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="tune.kl_weight"):
        TuneSweepConfig(kl_weight=[])
    with pytest.raises(ConfigError, match="tune.scheduler"):
        TuneSweepConfig(scheduler="hyperband")
    with pytest.raises(ConfigError, match=r"tune.disc_start=\[0, 0\] lists a value twice"):
        TuneSweepConfig(disc_start=[0, 0])  # two trials in one run directory


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(path.parent.name.split("_")[1]) for path in run_dir.glob("checkpoints/*/COMMITTED"))


def test_a_grid_sweep_stopped_by_ctrl_c_saves_its_running_trial_and_continues_when_resubmitted(
        ray_local, train_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    grid = ("tune.disc_start=[0]", "tune.kl_weight=[1e-6,1e-2]", "train.val_every=2", "tune.max_concurrent=1",
            "train.ckpt_every=1000")  # no periodic checkpoint: a saved one is the stop's
    first = tmp_path / "trials" / "ds0_kl1e-06"  # the grid's first trial; one trial runs at a time
    # A user's Ctrl-C, to this process (the sweep's): radiodiff-tune's handler, not Ray Tune's, takes it.
    watcher = when_logged(first, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert sweep(tmp_path, train_shards, *grid, "train.max_steps=200") == 75
    watcher.join()
    out = capfd.readouterr().out
    assert "sweep: Ctrl-C: stopping" in out and f"sweep: stopped by {tmp_path / 'STOP'}" in out, out[-3000:]
    [stopped] = committed_steps(first)  # saved on the stop, at the update where the trial saw it
    assert 2 <= stopped < 200 and logged_steps(first)[-1] <= stopped
    assert trial_dirs(tmp_path) == ["ds0_kl1e-06"]  # the pending trial never started
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "best.yaml").exists()
    # Resubmitted: the stop request is removed, the stopped trial resumes from its save, the other starts.
    steps = stopped + 2 + stopped % 2  # validated at its last step (train.val_every=2)
    assert sweep(tmp_path, train_shards, *grid, f"train.max_steps={steps}") == 0
    assert "1 trial(s) continue their run directories" in capfd.readouterr().out
    assert not (tmp_path / "STOP").exists() and trial_dirs(tmp_path) == ["ds0_kl0.01", "ds0_kl1e-06"]
    rows = read_rows(tmp_path)
    assert len(rows) == 2
    for row in rows:
        run_dir = Path(row["run_dir"])
        resumed = [0, stopped] if run_dir == first else [0]
        assert sorted(path.name for path in (run_dir / "configs").iterdir()) == [
            f"step_{step:08d}.yaml" for step in resumed]
        logged = logged_steps(run_dir)  # each step once (a training record and a validation one)
        assert logged == sorted(logged) and logged.count(logged[-1]) == 2 and len(set(logged)) == len(logged) - 1
        assert logged[-1] == steps and int(row["steps"]) == steps
        assert row["status"] == "TERMINATED" and math.isfinite(float(row["val/psnr"]))
    checkpoints = {row["run_dir"]: sorted((Path(row["run_dir"]) / "checkpoints").iterdir()) for row in rows}
    stamps = {path: path.stat().st_mtime_ns for paths in checkpoints.values() for path in paths}
    # Once more: nothing is left to train, and every row reports what its run logged.
    assert sweep(tmp_path, train_shards, *grid, f"train.max_steps={steps}") == 0
    again = read_rows(tmp_path)
    shown = ("disc_start", "kl_weight", "status", "val/psnr", "val/ssim", "ae/loss", "steps", "run_dir")
    assert [[row[key] for key in shown] for row in again] == [[row[key] for key in shown] for row in rows]
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert all(sorted(Path(run_dir, "checkpoints").iterdir()) == paths for run_dir, paths in checkpoints.items())
    assert trial_dirs(tmp_path) == ["ds0_kl0.01", "ds0_kl1e-06"]


def test_optuna_search_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install optuna"):
        check_search_available(TuneSweepConfig(search="optuna"))


def test_optuna_search_with_asha_samples_within_the_ranges(ray_local, train_shards: Path,
                                                          tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    code = sweep(tmp_path, train_shards, "tune.search=optuna", "tune.num_samples=2", "tune.scheduler=asha",
                 "tune.disc_start=[0,2]", "tune.kl_weight=[1e-6,1e-2]", "train.max_steps=2", "train.val_every=1")
    assert code == 0
    rows = read_rows(tmp_path)
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "TERMINATED" and 1 <= int(row["steps"]) <= 2
        assert 0 <= int(row["disc_start"]) <= 2 and 1e-6 <= float(row["kl_weight"]) <= 1e-2
        assert math.isfinite(float(row["val/psnr"]))


def test_a_resubmitted_optuna_sweep_reruns_its_earlier_trials_first(ray_local, train_shards: Path,
                                                                     tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    search = ("tune.search=optuna", "tune.num_samples=2", "tune.disc_start=[0,2]", "tune.kl_weight=[1e-6,1e-2]",
              "train.max_steps=2")
    assert sweep(tmp_path, train_shards, *search) == 0
    first = sorted((row["disc_start"], row["kl_weight"], row["val/psnr"]) for row in read_rows(tmp_path))
    dirs = trial_dirs(tmp_path)
    assert len(dirs) == 2
    # Optuna would sample two new points; resubmitted, the sweep's two trials are the earlier ones.
    assert sweep(tmp_path, train_shards, *search) == 0
    assert sorted((row["disc_start"], row["kl_weight"], row["val/psnr"]) for row in read_rows(tmp_path)) == first
    assert trial_dirs(tmp_path) == dirs


@pytest.mark.parametrize("bad", ["missing shards", "out_dir a file"])
def test_bad_paths_are_refused_in_one_line_before_ray_starts(bad: str, train_shards: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    shards, out_dir = train_shards, tmp_path / "sweep"
    if bad == "missing shards":
        shards = tmp_path / "nope"
    else:
        out_dir.write_text("a file")
    assert sweep(out_dir, shards, "tune.disc_start=[0]", "tune.kl_weight=[1e-6]") == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    where = f"{shards}/manifest.json" if bad == "missing shards" else f"out_dir={out_dir} is a file"
    assert line.startswith("error: ") and where in line, line
    assert "sweep:" not in captured.out and "Traceback" not in captured.err


def test_a_second_sweep_on_the_same_out_dir_is_refused_naming_the_owner(train_shards: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "sweep"
    with RunLock(out_dir, name="out_dir", owner="radiodiff-tune"):
        assert sweep(out_dir, train_shards, "tune.disc_start=[0]", "tune.kl_weight=[1e-6]") == 2
        assert os.listdir(out_dir) == ["LOCK"]  # nothing of the second sweep
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"error: out_dir={out_dir} is in use by another radiodiff-tune: host "
                           f"{socket.gethostname()}, pid {os.getpid()}"), line
    assert "sweep:" not in captured.out and not out_dir.exists()


def test_a_second_ctrl_c_stops_the_sweep_at_once_and_releases_its_out_dir(ray_local, train_shards: Path,
                                                                          tmp_path: Path, capfd) -> None:
    def twice() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = when_logged(tmp_path / "trials" / "ds0_kl1e-06", 2, twice)
    code = sweep(tmp_path, train_shards, "tune.disc_start=[0]", "tune.kl_weight=[1e-6]", "train.val_every=2",
                 "train.max_steps=400", "train.ckpt_every=1000")
    watcher.join()
    out = capfd.readouterr().out
    assert code == 130 and "sweep: stopped at once: running trials did not save" in out, out[-3000:]
    assert not (tmp_path / "LOCK").exists() and not (tmp_path / "results.csv").exists()
