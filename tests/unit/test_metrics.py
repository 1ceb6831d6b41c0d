"""Metrics against scikit-image and numpy on random and structured maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from radiodiff.metrics import all_metrics, edge_energy, edge_error, to_unit


def maps(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.random((4, 64, 64))
    gt[:, 20:30, 10:50] = 0.0  # a "building"
    pred = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1)
    return pred, gt


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_skimage_and_numpy(seed: int) -> None:
    pred, gt = maps(seed)
    got = all_metrics(torch.from_numpy(pred)[:, None], torch.from_numpy(gt)[:, None])
    for i in range(len(gt)):
        expected_psnr = peak_signal_noise_ratio(gt[i], pred[i], data_range=1.0)
        expected_ssim = structural_similarity(gt[i], pred[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False)
        assert got["psnr"][i].item() == pytest.approx(expected_psnr, abs=1e-4)
        assert got["ssim"][i].item() == pytest.approx(expected_ssim, abs=1e-4)
        assert got["nmse"][i].item() == pytest.approx(((pred[i] - gt[i]) ** 2).sum() / (gt[i] ** 2).sum(), rel=1e-9)
        assert got["rmse"][i].item() == pytest.approx(np.sqrt(((pred[i] - gt[i]) ** 2).mean()), rel=1e-9)
        assert got["rmse_db"][i].item() == pytest.approx(got["rmse"][i].item() * 99.16, rel=1e-9)


def test_identical_maps_are_perfect() -> None:
    x = torch.rand(2, 1, 32, 32)
    got = all_metrics(x, x)
    assert torch.allclose(got["ssim"], torch.ones(2, dtype=torch.float64))
    assert torch.all(got["nmse"] == 0) and torch.all(torch.isinf(got["psnr"]))


def test_to_unit_maps_model_range_to_gray() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0])
    assert to_unit(x).tolist() == [0.0, 0.0, 0.5, 1.0]


def test_edge_measures_match_numpy_differences_by_hand() -> None:
    pred, gt = maps(2)
    got_energy = edge_energy(torch.from_numpy(pred)[:, None])
    got_error = edge_error(torch.from_numpy(pred)[:, None], torch.from_numpy(gt)[:, None])
    for i in range(len(gt)):
        dx_p, dy_p = np.diff(pred[i], axis=1), np.diff(pred[i], axis=0)
        dx_g, dy_g = np.diff(gt[i], axis=1), np.diff(gt[i], axis=0)
        assert got_energy[i].item() == pytest.approx((dx_p**2).sum() + (dy_p**2).sum(), rel=1e-12)
        error = np.concatenate([np.abs(dx_p - dx_g).ravel(), np.abs(dy_p - dy_g).ravel()]).mean()
        assert got_error[i].item() == pytest.approx(error, rel=1e-12)


def test_edge_energy_of_a_step_counts_each_jump_once_and_falls_when_blurred() -> None:
    step = torch.zeros(1, 1, 4, 6)
    step[..., 3:] = 1.0  # one jump of 1 per row, between columns 2 and 3
    assert edge_energy(step).item() == 4.0
    ramp = step.clone()
    ramp[..., 2], ramp[..., 3] = 1 / 3, 2 / 3  # the same rise over three columns: 3 x (1/3)^2 per row
    assert edge_energy(ramp).item() == pytest.approx(4 / 3)
    assert edge_error(step, step).item() == 0.0
    # the ramp's differences (1/3 each at columns 1-2, 2-3, 3-4) against the step's (1 at 2-3): 4/3 per row
    assert edge_error(ramp, step).item() == pytest.approx(4 * (4 / 3) / (4 * 5 + 3 * 6))
