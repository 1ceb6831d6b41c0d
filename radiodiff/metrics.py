"""Per-image radio-map metrics on the [0, 1] gray scale, as published RadioMapSeer numbers use them.

    NMSE = sum (pred - gt)^2 / sum gt^2        RMSE = sqrt(mean (pred - gt)^2)
    PSNR = 10 log10(1 / MSE)  (data range 1)   SSIM: Gaussian window 11 (sigma 1.5), data range 1,
                                                population covariances, the 5-pixel border excluded
Building pixels are not masked. Every function maps (B, 1, H, W) tensors to (B,) values; averages
over a set are taken per image, then over images.

Two sharpness measures (not published metrics; the quality benchmark's, not radiodiff-eval's), on the
forward differences of a map along both axes (the horizontal then the vertical ones):

    edge energy  = sum d^2                          (a set's: its maps' total over its targets' total;
                                                     1 is as sharp as the targets, a blurred map < 1)
    edge error   = mean |d pred - d gt|             (whether the edges are where the target's are)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): the truncation scipy's gaussian_filter uses
SSIM_K1, SSIM_K2 = 0.01, 0.03
GRAY_TO_DB = 147.0 - 47.84  # one unit of the [0, 1] gray scale in dB


def _per_image(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1)


def mse(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return (_per_image(pred) - _per_image(gt)).square().mean(dim=1)


def rmse(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return mse(pred, gt).sqrt()


def nmse(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    diff = (_per_image(pred) - _per_image(gt)).square().sum(dim=1)
    return diff / _per_image(gt).square().sum(dim=1)


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(1.0 / mse(pred, gt))


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region only: exactly the pixels SSIM averages."""
    channels = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    x, y = pred.double(), gt.double()  # (B, 1, H, W)
    g = _gaussian_window(x.device)
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x**2
    var_y = _blur(y * y, g) - mu_y**2
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def finite_differences(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, H (W - 1) + (H - 1) W): the horizontal, then the vertical forward differences."""
    x = x.double()
    return torch.cat([(x[..., :, 1:] - x[..., :, :-1]).flatten(1), (x[..., 1:, :] - x[..., :-1, :]).flatten(1)], dim=1)


def edge_energy(x: torch.Tensor) -> torch.Tensor:
    return finite_differences(x).square().sum(dim=1)


def edge_error(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return (finite_differences(pred) - finite_differences(gt)).abs().mean(dim=1)


def all_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B,) tensors of every metric; ``rmse_db`` is RMSE on the dB scale of the gray levels."""
    values = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "nmse": nmse(pred, gt), "rmse": rmse(pred, gt)}
    values["rmse_db"] = values["rmse"] * GRAY_TO_DB
    return values


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] gray scale, clamped."""
    return ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)

