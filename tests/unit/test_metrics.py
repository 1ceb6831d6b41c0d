"""Metrics against scikit-image and numpy on random and structured maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from radiodiff.metrics import all_metrics, to_unit


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
