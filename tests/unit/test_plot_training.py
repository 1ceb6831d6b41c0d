"""tools/plot_training.py: the five figures (and the throughput figure) of a real tiny VAE run, of
synthetic logs, and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radiodiff.eval.figures import (
    FIGURE_NAMES,
    THROUGHPUT_FIGURE,
    throughput_figure,
    write_figures,
)
from radiodiff.eval.run_log import MetricsFileError, load_run, moving_average, normalize
from tests.dist.conftest import train

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_training.py"
MIN_SIDE_PX = 400  # the smallest figure is 10 x 5 inches at 110 dpi


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_figures(folder: Path, printed: str | None = None, names: tuple[str, ...] = FIGURE_NAMES) -> None:
    for name in names:
        path = folder / name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= MIN_SIDE_PX, (name, image.size)
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5, f"{name} looks blank"
        if printed is not None:
            assert str(path) in printed.splitlines()


def write_log(run_dir: Path, records: list[dict], config: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


@pytest.fixture(scope="module")
def vae_run(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-step stage-1 run: GAN on after 2 updates, validation at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("plot") / "vae"
    run = train("vae", run_dir, train_shards, "train.max_steps=4", "loss.disc_start=2", "train.val_every=2",
                "train.val_batches=1", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    return run_dir


@pytest.mark.slow
def test_real_vae_run_gives_the_five_figures_in_run_dir_figures(vae_run: Path) -> None:
    done = plot(vae_run)
    assert done.returncode == 0, done.stderr
    assert_figures(vae_run / "figures", done.stdout, (*FIGURE_NAMES, THROUGHPUT_FIGURE))  # CPU telemetry is logged


@pytest.mark.slow
def test_real_vae_run_is_read_with_its_phases_and_validation(vae_run: Path) -> None:
    run = load_run(vae_run)
    assert (run.stage, run.disc_start, run.last_step) == ("vae", 2, 4)
    steps, psnr = run.series["val/psnr"]
    assert steps.tolist() == [2, 4] and np.isfinite(psnr).all()
    assert run.series["ae/loss"][0].tolist() == [1, 2, 3, 4]  # validation lines add no training steps


def test_corrupt_metrics_exits_2_naming_the_file(tmp_path: Path) -> None:
    run_dir = write_log(tmp_path / "run", [{"step": 1, "ae/loss": 1.0}])
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "ae/lo\n')
    done = plot(run_dir)
    assert done.returncode == 2
    assert str(run_dir / "metrics.jsonl") in done.stderr and "line 2" in done.stderr
    assert not (run_dir / "figures").exists() or not any((run_dir / "figures").iterdir())


def test_missing_metrics_exits_2_naming_the_file(tmp_path: Path) -> None:
    done = plot(tmp_path, "--out", tmp_path / "out")
    assert done.returncode == 2 and str(tmp_path / "metrics.jsonl") in done.stderr


@pytest.mark.parametrize("line", ["[1, 2]", '{"ae/loss": 1.0}', ""])
def test_lines_without_a_step_or_no_lines_are_errors(tmp_path: Path, line: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(line + "\n")
    with pytest.raises(MetricsFileError, match="metrics.jsonl"):
        load_run(tmp_path)


def test_nan_steps_interleaved_validation_and_missing_keys_still_plot(tmp_path: Path) -> None:
    nan = float("nan")
    records = [{"step": s, "ae/loss": 10.0 / s, "ae/nll": 9.0 / s, "ae/kl": 1.0, "lr": 1e-4, "bad": 0.0,
                "skipped_steps": 0} for s in range(1, 7)]
    records[2].update({"ae/loss": nan, "ae/nll": nan, "bad": 1.0, "skipped_steps": 1})  # a skipped step
    records.insert(3, {"step": 3, "val/psnr": 20.0, "val/ssim": 0.5})
    run_dir = write_log(tmp_path / "run", records, config="loss:\n  disc_start: 4\n")
    out = tmp_path / "figs"
    paths = write_figures(run_dir, out)
    assert [p.name for p in paths] == list(FIGURE_NAMES)
    assert_figures(out)
    run = load_run(run_dir)
    assert math.isnan(run.series["ae/loss"][1][2]) and run.final("ae/loss") == pytest.approx(10.0 / 6)
    assert run.disc_start == 4 and not run.has("disc/loss")


def test_a_single_logged_ldm_step_plots(tmp_path: Path) -> None:
    run_dir = write_log(tmp_path / "run", [{"step": 1, "loss": 0.5, "ldm/loss_c": 0.4, "ldm/loss_eps": 0.6,
                                            "lr": 5e-5}], config="ema:\n  start_step: 100\ndiffusion: {}\n")
    done = plot(run_dir, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert_figures(tmp_path / "out", done.stdout)
    run = load_run(run_dir)
    assert (run.stage, run.ema_start, run.last_step) == ("ldm", 100, 1)


def test_disc_start_falls_back_to_the_first_step_with_the_gan_on(tmp_path: Path) -> None:
    records = [{"step": s, "ae/loss": 1.0, "ae/disc_factor": float(s > 3)} for s in range(1, 6)]
    assert load_run(write_log(tmp_path, records)).disc_start == 3  # 0-based update 3 is logged as step 4


def test_moving_average_matches_a_hand_computation_and_skips_nan() -> None:
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    np.testing.assert_allclose(moving_average(values, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    assert np.isnan(moving_average(np.array([np.nan, np.nan]), 2)).all()


def test_normalize_divides_positive_series_by_the_first_value_else_min_max() -> None:
    scaled, how = normalize(np.array([np.nan, 2.0, 4.0, 1.0]))
    assert how == "/ first"
    np.testing.assert_allclose(scaled, [np.nan, 1.0, 2.0, 0.5])
    scaled, how = normalize(np.array([0.0, -1.0, 3.0]))
    assert how == "min-max"
    np.testing.assert_allclose(scaled, [0.25, 0.0, 1.0])


def perf_records(keys: tuple[str, ...]) -> list[dict]:
    """Six logged steps as the loop writes them: the first (counted) update has no rates."""
    records = []
    for step in range(1, 7):
        record = {"step": step, "ae/loss": 1.0 / step, "lr": 1e-4}
        if step > 1:
            record.update({key: (index + 1) * 0.1 * step for index, key in enumerate(keys)})
        records.append(record)
    return records


def plotted(figure) -> dict[str, np.ndarray]:
    """label -> y data of every curve drawn on the figure's axes (twin axes included)."""
    return {line.get_label(): np.asarray(line.get_ydata()) for ax in figure.axes for line in ax.get_lines()}


def test_throughput_figure_draws_every_logged_perf_series(tmp_path: Path) -> None:
    keys = ("perf/maps_per_s", "perf/maps_per_s_rank", "perf/data_wait_frac", "perf/tflops_rank", "perf/mfu",
            "perf/peak_memory_gb", "perf/step_time_s")
    run_dir = write_log(tmp_path / "run", perf_records(keys))
    paths = write_figures(run_dir, tmp_path / "figs")
    assert [p.name for p in paths] == [*FIGURE_NAMES, THROUGHPUT_FIGURE]
    assert_figures(tmp_path / "figs", names=(THROUGHPUT_FIGURE,))
    curves = plotted(throughput_figure(load_run(run_dir)))
    drawn = [key for key in keys if key in curves]
    assert drawn == list(keys[:-1])  # step time is maps/s inverted: not drawn twice
    for index, key in enumerate(drawn):
        np.testing.assert_allclose(curves[key], [(index + 1) * 0.1 * s for s in range(2, 7)])


def test_throughput_figure_of_a_cpu_run_has_the_panels_it_logged(tmp_path: Path) -> None:
    """On CPU without train.peak_tflops the loop logs no MFU and no peak memory."""
    keys = ("perf/maps_per_s", "perf/maps_per_s_rank", "perf/data_wait_frac", "perf/tflops_rank")
    figure = throughput_figure(load_run(write_log(tmp_path / "run", perf_records(keys))))
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["Maps per second (global, per rank)", "Time waiting for data (fraction)",
                      "Achieved TFLOP/s per rank / MFU"]
    assert sorted(k for k in plotted(figure) if k.startswith("perf/")) == sorted(keys)


def test_a_log_without_perf_metrics_gives_no_throughput_figure(tmp_path: Path) -> None:
    run_dir = write_log(tmp_path / "run", perf_records(()))
    paths = write_figures(run_dir, tmp_path / "figs")
    assert [p.name for p in paths] == list(FIGURE_NAMES)
    assert not (tmp_path / "figs" / THROUGHPUT_FIGURE).exists() and throughput_figure(load_run(run_dir)) is None
