"""How much of the real DPM gain the line-of-sight channels (model.unet.tx_los) and the detour channel
(model.unet.tx_detour) explain.

usage: python tools/los_fit.py <root>

On the training split of a RadioMapSeer root (RadioUNet protocol; held-out gains are never read),
over street pixels with a gain above the floor, at the native 256x256: least squares of the gray
level on [1, log10 distance] and on [1, log10 distance, the two channels of
``radiodiff.models.fusion.tx_line_of_sight``, the second channel times log10 distance], and on those
plus the detour channel (``tx_detour_map``) and its product with the second line-of-sight channel. Prints
the residual RMSE (gray levels) and R^2 of the three fits, pooled over pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from radiodiff.models.fusion import tx_detour_map, tx_line_of_sight
from sim_fidelity import RealSample, load_real_samples


def features(sample: RealSample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (distance-only design, distance + line-of-sight design, that + detour design, gray levels), street
    pixels above 0."""
    buildings = torch.from_numpy(sample.buildings.astype(np.float32)) * 2 - 1
    tx = -torch.ones_like(buildings)
    tx[sample.tx_rc] = 1.0
    cond = torch.stack([buildings, tx, buildings])[None]
    los = tx_line_of_sight(cond)[0].double().numpy()  # (2, 256, 256)
    detour = tx_detour_map(cond)[0, 0].double().numpy()
    rows, cols = np.mgrid[0:256, 0:256]
    log_d = np.log10(np.maximum(np.hypot(rows - sample.tx_rc[0], cols - sample.tx_rc[1]), 1.0))
    keep = ~sample.buildings & (sample.gain > 0)
    one, d, share, sat, det = np.ones(keep.sum()), log_d[keep], los[0][keep], los[1][keep], detour[keep]
    return (np.stack([one, d], 1), np.stack([one, d, share, sat, d * sat], 1),
            np.stack([one, d, share, sat, d * sat, det, det * sat], 1), sample.gain[keep].astype(np.float64))


def fit(design: np.ndarray, gray: np.ndarray) -> tuple[float, float]:
    """Least squares -> (residual RMSE, R^2)."""
    coef, *_ = np.linalg.lstsq(design, gray, rcond=None)
    residual = gray - design @ coef
    return float(np.sqrt(np.mean(residual ** 2))), float(1.0 - residual.var() / gray.var())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    samples = load_real_samples(args.root, splits=("train",))
    if not samples:
        raise SystemExit(f"{args.root}: no training-split DPM gain maps")
    parts = [features(s) for s in samples]
    gray = np.concatenate([p[3] for p in parts])
    for name, i in (("log10 distance", 0), ("log10 distance + line of sight", 1),
                    ("log10 distance + line of sight + detour", 2)):
        rmse, r2 = fit(np.concatenate([p[i] for p in parts]), gray)
        print(f"{name}: RMSE {rmse:.2f} gray levels, R^2 {r2:.3f} ({len(samples)} training maps, {gray.size} pixels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
