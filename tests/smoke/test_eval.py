"""radiodiff-eval and radiodiff-sample on tiny runs trained once per module with the real training
commands (VAE 3 steps, then LDM 3 steps, one process), checked against independent computations."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from radiodiff.eval.main import evaluate_main, sample_main
from radiodiff.launch import console_command
from tests.dist.conftest import environment, train

REPO = Path(__file__).resolve().parents[2]
METRICS = ("psnr", "ssim", "nmse", "rmse", "rmse_db")


@pytest.fixture(scope="module")
def runs(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-runs")
    steps = ["train.max_steps=3", "train.ckpt_every=3"]
    vae = train("vae", root / "vae", train_shards, *steps, nproc=1)
    assert vae.returncode == 0, vae.output[-3000:]
    ldm = train("ldm", root / "ldm", train_shards, *steps, f"vae.checkpoint={root / 'vae'}", "ema.start_step=0",
                "ema.update_every=1", nproc=1)
    assert ldm.returncode == 0, ldm.output[-3000:]
    return {"vae": root / "vae", "ldm": root / "ldm", "shards": train_shards}


def run_eval(run_dir: Path, shards: Path, out_dir: Path, *overrides: str, nproc: int = 1) -> dict:
    done = subprocess.run([*console_command("radiodiff-eval", nproc), f"run_dir={run_dir}", f"data.shards={shards}",
                           f"out_dir={out_dir}", *overrides], capture_output=True, text=True, timeout=300,
                          env=environment())
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads((out_dir / "metrics.json").read_text())


def read_rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "per_sample.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def split_size(shards: Path, split: str) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["splits"][split]["shards"])


@pytest.fixture(scope="module")
def vae_eval(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-vae")
    run_eval(runs["vae"], runs["shards"], out, "batch_size=3", "num_grid=3")
    return out


def timed_at_batch1(metrics: dict) -> bool:
    seconds = metrics["seconds_per_map_batch1"]
    return isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0


def check_outputs(out: Path, metrics: dict, num_grid: int) -> None:
    rows = read_rows(out)
    assert len(rows) == metrics["num_samples"]
    for name in METRICS:  # metrics.json holds the per-image means of per_sample.csv
        assert metrics[name] == pytest.approx(np.mean([float(r[name]) for r in rows]), rel=1e-12)
        assert metrics["baseline"][name] == pytest.approx(np.mean([float(r[f"baseline_{name}"]) for r in rows]),
                                                          rel=1e-12)
    assert metrics["baseline"]["psnr"] != pytest.approx(metrics["psnr"], abs=1e-3)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (5 * 256, min(num_grid, len(rows)) * 256) and grid.mode == "L"


def test_eval_of_a_vae_run_writes_metrics_matching_per_sample_rows(runs, vae_eval: Path) -> None:
    metrics = json.loads((vae_eval / "metrics.json").read_text())
    assert metrics["stage"] == "vae" and metrics["checkpoint_step"] == 3 and metrics["split"] == "test"
    assert metrics["num_samples"] == split_size(runs["shards"], "test")
    assert metrics["protocol"] == "radiounet" and metrics["sampler_steps"] is None
    assert metrics["seconds_per_map"] > 0 and metrics["baseline"]["num_train_samples"] == split_size(
        runs["shards"], "train")
    assert metrics["batch_size"] == 3 and timed_at_batch1(metrics)
    check_outputs(vae_eval, metrics, 3)


def test_eval_on_two_ranks_equals_one_rank_for_a_vae_run(runs, vae_eval: Path, tmp_path: Path) -> None:
    one = json.loads((vae_eval / "metrics.json").read_text())
    two = run_eval(runs["vae"], runs["shards"], tmp_path, "batch_size=3", "num_grid=3", nproc=2)
    assert two["world_size"] == 2 and two["num_samples"] == one["num_samples"] and timed_at_batch1(two)
    for name in ("psnr", "ssim", "nmse", "rmse"):
        assert two[name] == pytest.approx(one[name], abs=1e-6)
        assert two["baseline"][name] == pytest.approx(one["baseline"][name], abs=1e-6)
    assert [r["key"] for r in read_rows(tmp_path)] == [r["key"] for r in read_rows(vae_eval)]


def test_eval_of_an_ldm_run_covers_the_split(runs, tmp_path: Path) -> None:
    metrics = run_eval(runs["ldm"], runs["shards"], tmp_path, "sampler.steps=2", "sampler.draws=2", "num_grid=2")
    assert metrics["stage"] == "ldm" and metrics["sampler_steps"] == 2 and metrics["use_ema"] is True
    assert metrics["sampler_draws"] == 2 and metrics["sampler_estimate"] == "c_head"
    assert timed_at_batch1(metrics)
    assert metrics["num_samples"] == split_size(runs["shards"], "test")
    check_outputs(tmp_path, metrics, 2)


def test_sampler_estimate_override_reaches_the_sampler(runs, tmp_path: Path) -> None:
    """The same seed and noise with the published update instead of the C head's estimate: recorded,
    and different maps (the untrained heads disagree), so the override is not dropped on the way."""
    maps = {}
    for estimate in ("c_head", "reference"):
        metrics = run_eval(runs["ldm"], runs["shards"], tmp_path / estimate, "sampler.steps=2", "max_samples=2",
                           f"sampler.estimate={estimate}", "time_batch1=false")
        assert metrics["sampler_estimate"] == estimate
        maps[estimate] = [float(row["psnr"]) for row in read_rows(tmp_path / estimate)]
    assert len(maps["reference"]) == 2 and maps["reference"] != maps["c_head"]


def test_decoded_latent_target_is_the_vae_reconstruction_and_the_latent_regressor_predicts_maps(runs) -> None:
    """tools/bench.py quality's latent regressor: decoding its target (the LDM's latent of a map) gives
    the VAE run's own reconstruction of that map, so a perfect latent regressor scores the VAE row;
    trained for two updates it maps a condition to that latent's shape and to full-size maps."""
    from dataclasses import replace

    from pipeline.quality import LatentCodec, latent_regressor
    from radiodiff.data.shards import ShardLoader
    from radiodiff.runs import load_models, open_run
    from radiodiff.runs.predict import make_predictor, sampler_generator, to_native_unit

    cpu = torch.device("cpu")
    codec, vae_run = LatentCodec(runs["ldm"], cpu), open_run(runs["vae"])
    data = replace(open_run(runs["ldm"]).config.data, num_workers=0)
    sample = next(iter(ShardLoader(data, "test", batch_size=2, epochs=1, shuffle=False, num_workers=0)))
    size = data.image_size // codec.factor
    reconstruct = make_predictor(load_models(vae_run, cpu), vae_run.config.data, generator=sampler_generator(0, 0, cpu))
    z = codec.encode(sample["target"])
    assert z.shape == (2, codec.channels, size, size)
    torch.testing.assert_close(to_native_unit(codec.decode(z), data), reconstruct(sample["cond"], sample["target"]),
                               rtol=0, atol=1e-5)
    model, predict = latent_regressor(runs["ldm"], data, cpu, steps=2, batch=2, lr=1e-3, seed=0)
    assert model(sample["cond"]).shape == z.shape
    pred = predict(sample["cond"], sample["target"])
    assert pred.shape == (2, 1, 256, 256) and 0 <= pred.min() <= pred.max() <= 1


def test_mean_of_draws_is_the_numpy_mean_of_single_draws_in_generator_order(runs) -> None:
    """sampler.draws=3: the prediction is the mean of the three maps that three single-draw calls
    make from the same generator, one after the other (checked in numpy); the draws differ."""
    from dataclasses import replace

    from radiodiff.config import SamplerConfig
    from radiodiff.data.shards import ShardLoader
    from radiodiff.runs import load_models, open_run
    from radiodiff.runs.predict import make_predictor, sampler_generator

    cpu, run = torch.device("cpu"), open_run(runs["ldm"])
    models, data = load_models(run, cpu), replace(run.config.data, num_workers=0)
    cond = next(iter(ShardLoader(data, "test", batch_size=2, epochs=1, shuffle=False, num_workers=0)))["cond"]
    mean = make_predictor(models, data, sampler=SamplerConfig(steps=2, draws=3),
                          generator=sampler_generator(7, 0, cpu))(cond, None)
    single = make_predictor(models, data, sampler=SamplerConfig(steps=2), generator=sampler_generator(7, 0, cpu))
    draws = np.stack([single(cond, None).numpy() for _ in range(3)])
    assert mean.shape == (2, 1, 256, 256) and np.abs(draws[0] - draws[1]).mean() > 1e-4
    np.testing.assert_allclose(mean.numpy(), draws.mean(axis=0), rtol=0, atol=1e-6)


def test_bf16_inference_agrees_with_fp32_within_0_05_db(runs, tmp_path: Path) -> None:
    """The sampler and decoder under bf16 autocast (the GPU default) score like fp32 (here on CPU)."""
    fp32 = run_eval(runs["ldm"], runs["shards"], tmp_path / "fp32", "sampler.steps=2", "precision=fp32",
                    "time_batch1=false")
    bf16 = run_eval(runs["ldm"], runs["shards"], tmp_path / "bf16", "sampler.steps=2", "precision=autocast")
    assert fp32["seconds_per_map_batch1"] is None and timed_at_batch1(bf16)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "autocast")
    assert abs(bf16["psnr"] - fp32["psnr"]) <= 0.05 and bf16["psnr"] != fp32["psnr"]


def test_ldm_eval_row_matches_scikit_image_on_the_sampled_png(runs, synth_root: Path, tmp_path: Path) -> None:
    """One sample evaluated by radiodiff-eval, regenerated by radiodiff-sample (same seed, same
    noise), then scored by scikit-image / numpy against the dataset's ground-truth PNG."""
    metrics = run_eval(runs["ldm"], runs["shards"], tmp_path / "eval", "max_samples=1", "batch_size=1", "seed=5")
    assert metrics["num_samples"] == 1
    row = read_rows(tmp_path / "eval")[0]
    map_id, tx = row["map"], row["tx"]
    out = tmp_path / "pred.png"
    assert sample_main([f"run_dir={runs['ldm']}", f"buildings={synth_root}/png/buildings_complete/{map_id}.png",
                        f"antenna={synth_root}/png/antennas/{map_id}_{tx}.png", f"out={out}", "seed=5",
                        "mask_buildings=false"]) == 0
    pred = np.asarray(Image.open(out), dtype=np.float64) / 255
    gt = np.asarray(Image.open(synth_root / "gain" / "DPM" / f"{map_id}_{tx}.png"), dtype=np.float64) / 255
    # The PNG is quantized to 1/255; eval scores the unquantized prediction.
    assert float(row["psnr"]) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=1), abs=0.02)
    ssim = structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1)
    assert float(row["ssim"]) == pytest.approx(ssim, abs=3e-3)
    assert float(row["rmse"]) == pytest.approx(np.sqrt(np.mean((pred - gt) ** 2)), abs=2e-3)


def test_eval_names_a_run_dir_without_committed_checkpoints(runs, tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_text((runs["vae"] / "config.yaml").read_text())
    assert evaluate_main([f"run_dir={tmp_path}", f"out_dir={tmp_path / 'out'}"]) == 2
    assert f"run_dir={tmp_path}: no committed checkpoint" in capsys.readouterr().err


def sample(runs, synth_root: Path, out: Path, *extra: str) -> np.ndarray:
    args = [f"run_dir={runs['ldm']}", f"buildings={synth_root}/png/buildings_complete/1.png", f"out={out}", *extra]
    if not any(a.startswith("tx_") for a in extra):
        args.append(f"antenna={synth_root}/png/antennas/1_2.png")
    assert sample_main(args) == 0
    with Image.open(out) as image:
        assert image.mode == "L" and image.size == (256, 256)
        return np.asarray(image)


def test_sample_writes_a_masked_deterministic_radio_map(runs, synth_root: Path, tmp_path: Path) -> None:
    first = sample(runs, synth_root, tmp_path / "a.png", "seed=1")
    again = sample(runs, synth_root, tmp_path / "b.png", "seed=1")
    other = sample(runs, synth_root, tmp_path / "c.png", "seed=2")
    unmasked = sample(runs, synth_root, tmp_path / "d.png", "seed=1", "mask_buildings=false")
    buildings = np.asarray(Image.open(synth_root / "png" / "buildings_complete" / "1.png")) > 0
    assert buildings.any() and (first[buildings] == 0).all() and unmasked[buildings].any()
    assert np.array_equal(first[~buildings], unmasked[~buildings])
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_sample_at_tx_row_col_equals_the_antenna_png(runs, synth_root: Path, tmp_path: Path) -> None:
    antenna = np.asarray(Image.open(synth_root / "png" / "antennas" / "1_2.png"))
    row, col = np.unravel_index(int(np.argmax(antenna)), antenna.shape)
    from_png = sample(runs, synth_root, tmp_path / "a.png")
    from_position = sample(runs, synth_root, tmp_path / "b.png", f"tx_row={row}", f"tx_col={col}")
    # On a multiple of 4, so that the reader's nearest resize to the tiny model's 64 px keeps the pixel.
    moved = sample(runs, synth_root, tmp_path / "c.png", f"tx_row={(row // 4 * 4 + 64) % 256}", "tx_col=128")
    assert np.array_equal(from_png, from_position) and not np.array_equal(from_png, moved)


def test_sample_folder_mode_writes_one_map_per_antenna_and_prints_the_model_time(runs, synth_root: Path,
                                                                                  tmp_path: Path, capsys) -> None:
    assert sample_main([f"run_dir={runs['ldm']}", f"input_dir={synth_root}", f"out_dir={tmp_path}",
                        "sampler.steps=1", "batch_size=16"]) == 0
    speed = re.search(r"model time (\S+) s/map at batch 16, (\S+) s/map at batch 1$", capsys.readouterr().out, re.M)
    assert speed and all(0 < float(seconds) < math.inf for seconds in speed.groups())
    antennas = sorted(p.name for p in (synth_root / "png" / "antennas").glob("*.png"))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == antennas
    with Image.open(tmp_path / antennas[0]) as image:
        assert image.mode == "L" and image.size == (256, 256)


def test_sample_rejects_a_wrong_size_png_naming_it(runs, synth_root: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "small.png"
    Image.fromarray(np.zeros((128, 128), dtype=np.uint8), mode="L").save(bad)
    code = sample_main([f"run_dir={runs['ldm']}", f"buildings={bad}", "tx_row=5", "tx_col=5",
                        f"out={tmp_path / 'out.png'}"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "128x128" in err
    assert not (tmp_path / "out.png").exists()


def test_sample_rejects_an_antenna_png_without_exactly_one_transmitter(runs, synth_root: Path, tmp_path: Path,
                                                                       capsys) -> None:
    antenna = np.asarray(Image.open(synth_root / "png" / "antennas" / "1_2.png"))
    two = antenna.copy()
    two[0, 0] = two[255, 255] = 255
    for name, tx in (("none.png", np.zeros_like(antenna)), ("two.png", two)):
        path = tmp_path / name
        Image.fromarray(tx, mode="L").save(path)
        code = sample_main([f"run_dir={runs['ldm']}", f"buildings={synth_root}/png/buildings_complete/1.png",
                            f"antenna={path}", f"out={tmp_path / 'out.png'}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {path}: expected exactly one transmitter pixel")
        assert len(err.splitlines()) == 1 and not (tmp_path / "out.png").exists()


def test_eval_out_dir_that_is_a_file_fails_before_evaluating(runs, tmp_path: Path, capsys) -> None:
    existing = tmp_path / "eval"
    existing.write_bytes(b"keep me")
    assert evaluate_main([f"run_dir={runs['vae']}", f"data.shards={runs['shards']}", f"out_dir={existing}"]) == 2
    assert capsys.readouterr().err == f"error: out_dir={existing} is a file, not a folder\n"
    assert existing.read_bytes() == b"keep me"


def test_export_checkpoint_gives_strict_loadable_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    import importlib.util

    from radiodiff.config import AutoencoderConfig, ConditionEncoderConfig, UNetConfig
    from radiodiff.models.autoencoder import AutoencoderKL
    from radiodiff.models.unet import build_unet

    spec = importlib.util.spec_from_file_location("export_checkpoint", REPO / "tools" / "export_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(runs["vae"]), str(tmp_path / "vae.pt")]) == 0
    vae = torch.load(tmp_path / "vae.pt", weights_only=True)
    AutoencoderKL(AutoencoderConfig(**vae["autoencoder_config"])).load_state_dict(vae["autoencoder"], strict=True)
    assert tool.main([str(runs["ldm"]), str(tmp_path / "ldm.pt")]) == 0
    ldm = torch.load(tmp_path / "ldm.pt", weights_only=True)
    unet = build_unet(UNetConfig(**ldm["unet_config"]), ConditionEncoderConfig(**ldm["condition_config"]))
    unet.load_state_dict(ldm["unet"], strict=True)
    assert ldm["ema"] is True and ldm["step"] == vae["step"] == 3
    assert tool.main([str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 2


def test_sample_names_where_a_moved_vae_was_expected(runs, synth_root: Path, tmp_path: Path, capsys) -> None:
    ldm = tmp_path / "ldm"
    shutil.copytree(runs["ldm"], ldm)
    gone = tmp_path / "vae_moved_away"
    config = ldm / "config.yaml"
    config.write_text(config.read_text().replace(str(runs["vae"]), str(gone)))
    code = sample_main([f"run_dir={ldm}", f"buildings={synth_root}/png/buildings_complete/1.png", "tx_row=5",
                        "tx_col=5", f"out={tmp_path / 'out.png'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(gone) in err and f"vae.checkpoint in {config}" in err
