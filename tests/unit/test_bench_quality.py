"""tools/bench.py quality: its table, its target checks, the transmitter ablation and the regressor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import quality

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def bq():
    """tools/bench_quality.py loaded from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tools_bench_quality", TOOLS / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_has_one_row_per_entry_with_rounded_values_and_a_dash_where_a_value_is_missing(bq):
    rows = [bq.row("ceiling", {"psnr": 31.234, "ssim": 0.95678, "nmse": 0.00123, "rmse": 0.02761,
                               "edge_energy": 0.71234, "edge_error": 0.0012345}, seconds=False),
            bq.row("LDM EMA, 5 steps", {"psnr": 24.5, "ssim": 0.8, "nmse": 0.02, "rmse": 0.06,
                                        "seconds_per_map": 0.01234})]  # as radiodiff-eval's metrics.json: no edges
    lines = bq.format_table(rows).splitlines()
    assert lines[0] == "| model | PSNR dB | SSIM | NMSE | RMSE | edge energy | edge error | s/map |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- | --- |"
    assert lines[2] == "| ceiling | 31.23 | 0.9568 | 0.0012 | 0.0276 | 0.712 | 0.00123 | - |"
    assert lines[3] == "| LDM EMA, 5 steps | 24.50 | 0.8000 | 0.0200 | 0.0600 | - | - | 0.0123 |"
    assert len(lines) == 4


@pytest.mark.parametrize("ldm, regressor, wins", [  # (SSIM, edge energy, edge error); the ceiling's energy 0.6
    ((0.70, 0.55, 0.020), (0.74, 0.50, 0.017), "sharpness"),  # sharper, but edges misplaced, lower SSIM
    ((0.75, 0.62, 0.016), (0.74, 0.70, 0.017), "SSIM, sharpness, edge placement"),  # over-sharp is off too
    ((0.70, 0.75, 0.020), (0.74, 0.50, 0.017), "none of these"),
])
def test_where_line_names_what_the_ldm_beats_the_regressor_on(bq, ldm, regressor, wins):
    def metrics(ssim, energy, error):
        return {"ssim": ssim, "edge_energy": energy, "edge_error": error}

    line = bq.where_line(metrics(*ldm), metrics(*regressor), metrics(0.79, 0.6, 0.01))
    assert line.startswith("INFO  ") and line.endswith(f"the LDM beats it on: {wins}")
    assert f"edge energy {ldm[1]:.3f} against {regressor[1]:.3f}" in line and "ceiling's 0.600" in line


def test_score_split_edge_energy_is_the_sets_ratio_of_totals_and_edge_error_the_mean_per_map(train_shards):
    """At the native size (image_size 256): no resizing, so numpy's differences of the maps are the reference."""
    from radiodiff.config import DataConfig
    from radiodiff.data.shards import ShardLoader
    from radiodiff.runs.predict import to_unit_scale

    data = DataConfig(shards=str(train_shards), num_workers=0, image_size=256)
    targets = np.concatenate([to_unit_scale(b["target"], data)[:, 0].double().numpy()
                              for b in ShardLoader(data, "test", batch_size=3, epochs=1, shuffle=False, num_workers=0)])

    def energy(maps):
        return (np.diff(maps, axis=2) ** 2).sum(axis=(1, 2)) + (np.diff(maps, axis=1) ** 2).sum(axis=(1, 2))

    exact = quality.score_split(quality.ceiling_predictor(data), data, torch.device("cpu"), batch=3)
    assert exact["num_samples"] == len(targets) > 3
    assert exact["edge_energy"] == pytest.approx(1.0, rel=1e-12) and exact["edge_error"] == 0.0

    squared = quality.score_split(lambda cond, target: quality.ceiling_predictor(data)(cond, target) ** 2, data,
                                  torch.device("cpu"), batch=3)
    ratios = energy(targets**2) / energy(targets)
    assert squared["edge_energy"] == pytest.approx(energy(targets**2).sum() / energy(targets).sum(), rel=1e-6)
    assert squared["edge_energy"] != pytest.approx(ratios.mean(), rel=1e-5)  # not the mean of per-map ratios
    error = [np.concatenate([np.abs(np.diff(m**2 - m, axis=a)).ravel() for a in (1, 0)]).mean() for m in targets]
    assert squared["edge_error"] == pytest.approx(np.mean(error), rel=1e-6)  # float32 squares


def test_score_split_measures_the_edges_at_the_models_size(
        train_shards):
    from radiodiff.config import DataConfig

    data = DataConfig(shards=str(train_shards), num_workers=0, image_size=64)
    ceiling = quality.score_split(quality.ceiling_predictor(data), data, torch.device("cpu"), batch=3)
    # Measured at 256x256 the ceiling keeps ~13% of the targets' edge energy (their finest structure, which no
    # 64x64 map holds); at 64 about 60% (the bilinear upsampling and the antialiased resize back smooth the rest).
    assert 0.4 < ceiling["edge_energy"] < 1.0


def test_score_split_building_share_and_psnr_with_buildings_zeroed_against_numpy(train_shards):
    """At the native size: a predictor wrong everywhere (0.5 t + 0.25), numpy on the loader's maps as reference."""
    from radiodiff.config import DataConfig
    from radiodiff.data.shards import ShardLoader
    from radiodiff.runs.predict import to_unit_scale

    data = DataConfig(shards=str(train_shards), num_workers=0, image_size=256)
    batches = list(ShardLoader(data, "test", batch_size=3, epochs=1, shuffle=False, num_workers=0))
    targets = np.concatenate([to_unit_scale(b["target"], data)[:, 0].double().numpy() for b in batches])
    buildings = np.concatenate([to_unit_scale(b["cond"][:, :1], data)[:, 0].numpy() > 0.5 for b in batches])
    assert buildings.mean() > 0.05 and np.all(targets[buildings] == 0.0)  # the premise: 0 on every building pixel

    scores = quality.score_split(lambda cond, target: 0.5 * quality.ceiling_predictor(data)(cond, target) + 0.25,
                                 data, torch.device("cpu"), batch=3)
    pred = 0.5 * targets + 0.25
    squared = (pred - targets) ** 2
    assert scores["building_share"] == pytest.approx((squared * buildings).sum() / squared.sum(), rel=1e-6)
    zeroed = np.where(buildings, 0.0, pred)
    psnr = 10 * np.log10(1.0 / ((zeroed - targets) ** 2).mean(axis=(1, 2)))
    assert scores["psnr_buildings_zeroed"] == pytest.approx(psnr.mean(), rel=1e-6)
    assert scores["psnr_buildings_zeroed"] > scores["psnr"] + 0.5  # zeroing removes the error on buildings


def test_buildings_line_gives_each_share_and_the_gaps_with_buildings_zeroed(bq):
    def scores(psnr, share, zeroed):
        return {"psnr": psnr, "building_share": share, "psnr_buildings_zeroed": zeroed}

    line = bq.buildings_line({"ceiling": scores(25.8, 0.57, 29.4), "vae": scores(24.8, 0.5, 27.0),
                              "regressor": scores(22.1, 0.3, 23.0), "ldm": scores(21.3, 0.25, 22.0)})
    assert line.startswith("INFO  building pixels")
    assert ("hold 57% of the resolution ceiling's, 50% of the VAE reconstruction's, 30% of the regressor's, "
            "25% of the LDM's squared error") in line
    assert line.endswith("the LDM is -5.00 dB from the VAE reconstruction (-3.50 as scored) and -1.00 dB from "
                         "the regressor (-0.80)")


@pytest.mark.parametrize("ldm, no_tx, regressor, vae, expected", [
    (25.0, 22.0, 26.0, 26.5, ["PASS", "PASS", "PASS"]),   # exactly on every bound
    (25.0, 22.1, 26.1, 26.6, ["FAIL", "FAIL", "FAIL"]),   # just past every bound
    (25.0, 10.0, 20.0, 24.0, ["PASS", "PASS", "PASS"]),   # the LDM beating both references passes
])
def test_targets_pass_on_their_bounds_and_fail_past_them(bq, ldm, no_tx, regressor, vae, expected):
    lines = bq.check_targets(ldm, no_tx, regressor, vae)
    assert [line.split()[0] for line in lines] == expected
    assert f"{ldm - no_tx:+.2f} dB drop" in lines[0]


@pytest.mark.parametrize("value_range, background", [("symmetric", -1.0), ("unit", 0.0)])
def test_ablation_sets_only_the_transmitter_channel_to_its_background(bq, value_range, background):
    assert quality.background_value(value_range) == background
    seen = {}

    def predict(cond, target):
        seen["cond"] = cond
        return torch.zeros(cond.shape[0], 1, 256, 256)

    cond = torch.rand(2, 3, 8, 8)
    cond[:, 1, 3, 4] = 1.0  # the transmitter pixel
    original = cond.clone()
    quality.without_transmitter(predict, value_range)(cond, torch.rand(2, 1, 8, 8))
    assert torch.equal(cond, original)  # the caller's condition is untouched
    assert torch.all(seen["cond"][:, 1] == background)
    assert torch.equal(seen["cond"][:, [0, 2]], original[:, [0, 2]])


def test_regressor_maps_a_condition_to_one_map_of_its_size_with_about_2m_parameters(bq):
    model = quality.RegressorUNet()
    for size in (64, 128):
        assert model(torch.rand(2, 3, size, size)).shape == (2, 1, size, size)
    assert 1.5e6 < sum(p.numel() for p in model.parameters()) < 2.5e6


def test_regressor_with_an_output_stride_stops_its_decoder_at_that_size(bq):
    model = quality.RegressorUNet(out_channels=4, out_stride=4)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4, 16, 16)
    assert len(model.up) == 2 and model.head.in_channels == 64  # two of the four decoder levels
    for stride in (0, 3, 32):
        with pytest.raises(ValueError, match=f"out_stride={stride}"):
            quality.RegressorUNet(out_stride=stride)


@pytest.mark.parametrize("tx_distance, tx_los, tx_detour",
                         [(False, True, False), (True, False, False), (True, True, False), (False, True, True)])
def test_regressor_reads_the_derived_channels_computed_from_the_condition_after_it(bq, tx_distance, tx_los,
                                                                                   tx_detour):
    from radiodiff.models.fusion import tx_detour_map, tx_distance_map, tx_line_of_sight

    model = quality.RegressorUNet(tx_distance=tx_distance, tx_los=tx_los, tx_detour=tx_detour)
    assert model.down[0][0].in_channels == 3 + tx_distance + 2 * tx_los + tx_detour
    cond = -torch.ones(2, 3, 64, 64)
    cond[:, [0, 2], 20:30, 20:50] = 1.0
    cond[0, 1, 5, 5] = cond[1, 1, 60, 33] = 1.0
    seen = {}
    model.down[0].register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    assert model(cond).shape == (2, 1, 64, 64)
    expected = [cond] + [tx_distance_map(cond)] * tx_distance + [tx_line_of_sight(cond)] * tx_los \
        + [tx_detour_map(cond)] * tx_detour
    assert torch.equal(seen["x"], torch.cat(expected, dim=1))


@pytest.mark.parametrize("flags", [[], ["--tx-los"], ["--tx-distance"], ["--tx-distance", "--tx-los"],
                                   ["--tx-los", "--tx-detour"]])
def test_derived_input_flags_reach_the_ldm_and_the_header(bq, flags):
    import argparse

    parser = argparse.ArgumentParser()
    bq.add_arguments(parser)
    args = bq.resolve(parser.parse_args(flags))
    recipe = bq.ldm_recipe(args, Path("/vae"))
    assert recipe[0] == "vae.checkpoint=/vae"
    text = bq.header(args, 112, 60.0, "vae fp32, ldm fp32")
    for flag, key, words in (("--tx-los", "tx_los", "line-of-sight"), ("--tx-distance", "tx_distance", "distance"),
                             ("--tx-detour", "tx_detour", "detour")):
        assert f"model.unet.{key}={str(flag in flags).lower()}" in recipe
        assert (words in text) == (flag in flags)


@pytest.mark.parametrize("flags", [[], ["--batch", "16", "--lr", "5e-3", "--vae-batch", "4", "--vae-lr", "5e-4"]])
def test_the_vae_trains_at_its_own_batch_and_lr_and_the_ldm_at_the_regressors(bq, flags):
    import argparse

    parser = argparse.ArgumentParser()
    bq.add_arguments(parser)
    args = bq.resolve(parser.parse_args(flags))
    given = dict(zip(flags[::2], flags[1::2]))
    batch, lr = int(given.get("--batch", bq.DEFAULTS["batch"])), float(given.get("--lr", bq.DEFAULTS["lr"]))
    vae_batch = int(given.get("--vae-batch", bq.DEFAULTS["vae_batch"]))
    vae_lr = float(given.get("--vae-lr", bq.DEFAULTS["vae_lr"]))
    vae = bq.vae_command(args, Path("/vae"), Path("/shards"))
    ldm = bq.ldm_command(args, Path("/ldm"), Path("/shards"), Path("/vae"))
    for overrides, b, rate in ((vae, vae_batch, vae_lr), (ldm, batch, lr)):
        assert f"train.global_batch={b}" in overrides and f"train.micro_batch={b}" in overrides
        assert f"train.lr={rate}" in overrides and f"train.min_lr={rate / 10}" in overrides
    assert (args.batch, args.lr) == (batch, lr)  # what both regressors train with
    text = bq.header(args, 112, 60.0, "vae fp32, ldm fp32")
    assert f"VAE {args.vae_steps} updates of batch {vae_batch} at lr {vae_lr:g}" in text
    assert f"regressors {args.ldm_steps} of batch {batch} at lr {lr:g}" in text


def test_latent_line_splits_the_gap_to_the_regressor(bq):
    line = bq.latent_line(ldm_psnr=19.5, latent_psnr=20.25, regressor_psnr=21.5)
    assert line.startswith("INFO") and "-1.25 dB from the regressor" in line and "-0.75 dB from the latent" in line


def test_draws_line_gives_the_mean_of_draws_against_both_references(bq):
    line = bq.draws_line(mean_psnr=21.25, regressor_psnr=22.0, vae_psnr=24.5)
    assert line.startswith(f"INFO  the mean of {bq.MEAN_DRAWS} draws")
    assert "-0.75 dB from the regressor" in line and "-3.25 dB from the VAE" in line


def test_estimate_line_compares_the_published_update_with_the_default(bq):
    line = bq.estimate_line(ldm_psnr=21.5, reference_psnr=20.75, regressor_psnr=22.0)
    assert line.startswith("INFO") and "sampler.estimate=reference" in line
    assert "-0.75 dB against the default" in line and "-1.25 dB from the regressor" in line


def test_regressor_loss_is_l1_plus_l2(bq):
    pred, target = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]])
    assert quality.regression_loss(pred, target).item() == pytest.approx((0.5 + 2.0) / 2 + (0.25 + 4.0) / 2)


def test_model_sizes_other_than_multiples_of_32_are_refused(bq):
    assert bq.size_overrides(128) == ["data.image_size=128", "model.unet.latent_size=32",
                                      "model.autoencoder.resolution=128"]
    with pytest.raises(ValueError, match="multiple of 32"):
        bq.size_overrides(80)


def test_a_factor_2_latent_gives_the_vae_one_downsampling_and_the_condition_stride_2(bq):
    overrides = bq.size_overrides(64, factor=2)
    assert overrides == ["data.image_size=64", "model.unet.latent_size=32", "model.autoencoder.resolution=64",
                         "model.autoencoder.ch_mult=[1,2]", "model.condition.patch_size=2"]
    from radiodiff.cli import compose

    cfg = compose("train_ldm", ["run_dir=/unused", "data.shards=/unused", "vae.checkpoint=/unused", "model=tiny",
                                *overrides])
    assert cfg.model.autoencoder.downsample_factor == 2 and cfg.model.condition.patch_size == 2
    assert cfg.model.unet.latent_size == 64 // 2
    with pytest.raises(ValueError, match="--latent-factor 8"):
        bq.size_overrides(64, factor=8)


def _scores(psnr: float) -> dict:
    return {"psnr": psnr, "ssim": 0.7, "nmse": 0.04, "rmse": 0.06, "edge_energy": 0.57, "edge_error": 0.018,
            "seconds_per_map": 0.01}


@pytest.mark.parametrize("with_latent", [False, True])
def test_the_latent_regressor_row_and_line_appear_only_when_it_was_trained(bq, with_latent):
    named = {"ceiling": bq.row("ceiling", _scores(26.0), seconds=False),
             "regressor": bq.row("regressor", _scores(24.0)),
             "ldm": bq.row("LDM in process", _scores(23.5)), "ldm_no_tx": bq.row("LDM no tx", _scores(16.0)),
             "regressor_no_tx": bq.row("regressor no tx", _scores(17.0)),
             "buildings": {role: {"psnr": 24.0, "building_share": 0.5, "psnr_buildings_zeroed": 26.0}
                           for role in ("ceiling", "vae", "regressor", "ldm")}}
    if with_latent:
        named["latent"] = bq.row(bq.LATENT_ROW, _scores(23.25))
    eval_rows = [bq.row("VAE reconstruction (posterior mode)", _scores(25.25)),
                 bq.row(f"LDM EMA, {bq.ABLATION_STEPS} steps", _scores(23.5)),
                 bq.row(bq.MEAN_DRAWS_ROW, _scores(23.75)), bq.row(bq.REFERENCE_ROW, _scores(23.0))]
    rows, lines = bq.summary(named, eval_rows, {"psnr": 14.5, "ssim": 0.5, "nmse": 0.3, "rmse": 0.19})
    names = [r["name"] for r in rows]
    assert (bq.LATENT_ROW in names) == with_latent
    assert names[:2] == ["ceiling", "mean training map (radiodiff-eval baseline)"]
    assert names[-2:] == ["LDM no tx (-7.50 dB)", "regressor no tx"]
    assert len(rows) == 2 + 1 + with_latent + len(eval_rows) + 2
    latent_lines = [line for line in lines if "latent regressor is" in line]
    assert latent_lines == (["INFO  the latent regressor is -0.75 dB from the regressor (the latent space at this "
                             "budget); the LDM is +0.25 dB from the latent regressor"] if with_latent else [])
    assert [line[:4] for line in lines[:3]] == ["PASS", "PASS", "FAIL"]  # -0.5 from the regressor, -1.75 from the VAE
