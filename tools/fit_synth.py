"""Fit the DPM constants of radiodiff.data.propagation on RadioUNet-train real samples only.

usage: python tools/fit_synth.py <root> [--stride 3] [--max-nfev 200]

Reads only the samples whose RadioUNet split is ``train`` (val/test gains are not even loaded),
fits the global DPM constants by least squares on the dB error over non-building pixels (simulated
dB clipped to the gray range, as the PNGs are), and prints them as ``PropagationParams`` defaults.
Measure the result on val/test afterwards with tools/sim_fidelity.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from radiodiff.data.propagation import CEIL_DB, FLOOR_DB, PropagationParams, dpm_db, gray_to_db, ray_features

from sim_fidelity import load_real_samples  # noqa: E402  (a sibling: a script's own folder is on its import path)

FITTED = ("ref_db", "exponent", "wall_db", "metre_db", "metre_sat_m", "diffraction_db", "excess_db",
          "excess_lin_db", "edge_floor_weight", "roof_scale", "roof_offset_db", "path_softness")
LOWER = (-80.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -60.0, 1.0)
UPPER = (-20.0, 5.0, 40.0, 10.0, 250.0, 60.0, 20.0, 5.0, 1.0, 5.0, 100.0, 10.0)


def residual_fn(features: list, targets: list[np.ndarray], masks: list[np.ndarray]):
    """params vector -> concatenated dB residuals on the sampled non-building pixels."""

    def residuals(x: np.ndarray) -> np.ndarray:
        params = replace(PropagationParams(), **dict(zip(FITTED, map(float, x))))
        out = []
        for f, target, keep in zip(features, targets, masks):
            pred = np.clip(dpm_db(f, params), FLOOR_DB, CEIL_DB)[keep]
            out.append(pred - target)
        return np.concatenate(out)

    return residuals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--stride", type=int, default=3, help="use every n-th pixel (speed)")
    parser.add_argument("--max-nfev", type=int, default=200)
    args = parser.parse_args(argv)
    samples = load_real_samples(args.root, splits=("train",))
    if not samples:
        print(f"error: no RadioUNet-train DPM samples in {args.root}", file=sys.stderr)
        return 2
    features, targets, masks = [], [], []
    sub = np.zeros((256, 256), dtype=bool)
    sub.ravel()[:: args.stride] = True
    for s in samples:
        keep = ~s.buildings & sub
        features.append(ray_features(s.buildings, s.tx_rc))
        targets.append(gray_to_db(s.gain)[keep])
        masks.append(keep)
    start = np.array([getattr(PropagationParams(), name) for name in FITTED])
    start = np.clip(start, LOWER, UPPER)
    fit = least_squares(residual_fn(features, targets, masks), start, bounds=(LOWER, UPPER),
                        loss="linear", x_scale="jac", diff_step=1e-3, max_nfev=args.max_nfev)
    rmse = float(np.sqrt(np.mean(fit.fun ** 2)))
    print(f"fitted on {len(samples)} RadioUNet-train samples: RMSE {rmse:.2f} dB ({fit.message})")
    fitted = dict(zip(FITTED, fit.x))
    for name, value in asdict(PropagationParams()).items():
        if name in fitted:
            print(f"    {name}: float = {fitted[name]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
