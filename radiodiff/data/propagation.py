"""Fast physical gain models that imitate RadioMapSeer's simulations on a 256x256 1 m grid.

Everything is computed from one transmitter (tx) position and a building mask; no noise is added.

Geometry (``ray_features``), shared by all models, vectorized in numpy:

* Polar ray casting. ``NUM_RAYS`` rays leave the tx with a 1 m radial step; the building (and car)
  masks are sampled along every ray and summed cumulatively, so each ray knows, at every radius,
  how many metres of building it has crossed and how many walls it has entered. Each pixel then
  reads the ray closest to its direction at its own radius. The pixel's own sample is excluded,
  so a street pixel next to a wall is not counted as "inside" it.
* Line of sight (LOS): a street pixel whose straight line to the tx crosses (almost) no building.
* Path around buildings: every non-LOS pixel is reached through its nearest shadow-edge pixel
  ``q`` (a LOS pixel next to a shadowed street pixel; Euclidean distance transform with indices),
  giving ``around = |tx - q| + |q - p|`` and ``excess = around - direct``. This is the one-corner (single diffraction) path; deeper shadows
  are dominated by the direct path through walls anyway.

Models (gain in dB, always negative; ``PropagationParams`` holds the constants):

* ``DPM`` (dominant path): the power sum of two paths (in LOS, the direct path alone).
  direct path: ``A - 10 n log10(d) - wall_db * walls - metre_db * min(metres, metre_cap)``;
  around path: ``A - 10 n log10(d_around) - diffraction_db - excess_db * sqrt(excess)``.
  Below -147 dB the map is 0 (the simulation floor). Exactly 255 at the tx pixel.
* ``IRT2`` / ``IRT4`` (ray tracing with 2 / 4 interactions): no transmission through buildings;
  LOS follows a steeper two-ray-like law, and the non-LOS field is carried by the interaction path
  with a fixed loss per interaction and a stronger excess-length penalty. More interactions
  (IRT4) reach further into shadows. The tx pixel peaks near gray 249 as in the real data.
* ``cars*`` variants: cars (1.5 m high, lower than the 25 m buildings) are extra obstacles crossed
  by the direct path, with a smaller loss per metre; they do not block the around path.

Gray levels: ``gray = 255 * max((PL_dB + 147) / (147 - 47.84), 0)``, rounded and clipped; building
pixels are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SIZE = 256
FLOOR_DB = -147.0
CEIL_DB = -47.84
NUM_RAYS = 1440  # the farthest pixel (363 m) is < 0.8 px from its ray
MAX_RADIUS_M = 365  # > diagonal of the 256 m map
# Rays that graze a wall pick up a metre or two of "building" without being blocked.
LOS_TOLERANCE_M = 1.5
MODELS = ("DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4")
IRT_PEAK_GRAY = 249


@dataclass(frozen=True)
class PropagationParams:
    """Model constants. The DPM values (ref_db .. excess_db) were fitted by tools/fit_synth.py
    (``--stride 2``) on the 45 real RadioUNet-train DPM samples of the shared RadioMapSeer subset
    only; val/test samples were never used (train RMSE 6.1 dB). car_metre_db is not fitted (no real
    carsDPM maps here)."""

    ref_db: float = -54.498  # gain at 1 m
    exponent: float = 2.173  # log-distance path-loss exponent n
    wall_db: float = 3.449  # per wall entered on the straight line
    metre_db: float = 0.923  # per metre of building crossed on the straight line
    metre_cap_m: float = 16.639  # beyond this, more building metres do not add loss
    diffraction_db: float = 25.887  # fixed loss of turning a corner
    excess_db: float = 0.377  # times sqrt(excess path length in m)
    car_metre_db: float = 0.6  # per metre of car crossed (cars* models)
    # IRT models are not fitted (no real IRT maps here); chosen to look like RadioMapSeer's IRT.
    irt_exponent: float = 2.3
    irt_interaction_db: float = 9.0
    irt_excess_db: float = 3.0


@dataclass(frozen=True)
class RayFeatures:
    """Per-pixel geometry for one tx. All arrays are (256, 256) float32 unless noted."""

    tx_rc: tuple[int, int]
    buildings: np.ndarray  # bool
    direct_m: np.ndarray  # straight-line distance to the tx (>= 1)
    metres: np.ndarray  # building metres crossed on the straight line
    walls: np.ndarray  # walls entered on the straight line
    car_metres: np.ndarray  # car metres crossed (zeros without cars)
    los: np.ndarray  # bool, street pixels in line of sight
    around_m: np.ndarray  # length of the path around buildings via the nearest LOS pixel


def db_to_gray(gain_db: np.ndarray) -> np.ndarray:
    """dB -> RadioMapSeer gray level (uint8), floor -147 dB -> 0, -47.84 dB -> 255."""
    gray = 255.0 * np.maximum((gain_db - FLOOR_DB) / (CEIL_DB - FLOOR_DB), 0.0)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def gray_to_db(gray: np.ndarray) -> np.ndarray:
    """Gray level -> dB (float64); gray 0 maps to the -147 dB floor."""
    return np.asarray(gray, dtype=np.float64) / 255.0 * (CEIL_DB - FLOOR_DB) + FLOOR_DB


def _check_inputs(buildings: np.ndarray, tx_rc: tuple[int, int], cars: np.ndarray | None) -> None:
    if buildings.shape != (SIZE, SIZE):
        raise ValueError(f"buildings must be ({SIZE}, {SIZE}), got {buildings.shape}")
    if cars is not None and cars.shape != (SIZE, SIZE):
        raise ValueError(f"cars must be ({SIZE}, {SIZE}), got {cars.shape}")
    row, col = tx_rc
    if not (0 <= row < SIZE and 0 <= col < SIZE):
        raise ValueError(f"tx_rc={tx_rc} is outside the {SIZE}x{SIZE} map")


def _cast_rays(masks: list[np.ndarray], row: int, col: int) -> list[np.ndarray]:
    """Sample each (256,256) mask along the polar rays. Returns (NUM_RAYS, MAX_RADIUS_M) bool each."""
    theta = np.arange(NUM_RAYS, dtype=np.float32) * np.float32(2 * np.pi / NUM_RAYS)
    radius = np.arange(MAX_RADIUS_M, dtype=np.float32)
    rows = np.rint(row + np.sin(theta)[:, None] * radius).astype(np.int32)  # (K, J)
    cols = np.rint(col + np.cos(theta)[:, None] * radius).astype(np.int32)
    inside = (rows >= 0) & (rows < SIZE) & (cols >= 0) & (cols < SIZE)
    flat = np.where(inside, rows * SIZE + cols, 0)
    return [mask.ravel()[flat] & inside for mask in masks]


def _pixel_ray_index(row: int, col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pixel: its ray, its radius index, its distance to the tx. (256,256) each."""
    dr = np.arange(SIZE, dtype=np.float32)[:, None] - row
    dc = np.arange(SIZE, dtype=np.float32)[None, :] - col
    dist = np.sqrt(dr * dr + dc * dc)  # (H, W)
    theta = np.arctan2(dr, dc)
    ray = np.rint(theta * np.float32(NUM_RAYS / (2 * np.pi))).astype(np.int32) % NUM_RAYS
    radius_idx = np.minimum(np.rint(dist).astype(np.int32), MAX_RADIUS_M - 1)
    return ray, radius_idx, dist


def _cumulative_before(samples: np.ndarray, ray: np.ndarray, radius_idx: np.ndarray) -> np.ndarray:
    """Count of True samples on each pixel's ray strictly before the pixel. (256,256) float32."""
    cum = np.cumsum(samples, axis=1, dtype=np.int16)  # (K, J); at most 365
    return (cum[ray, radius_idx] - samples[ray, radius_idx]).astype(np.float32)


def _around_path(los: np.ndarray, solid: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Length of tx -> q -> p, q the nearest shadow-edge pixel (a LOS pixel next to a shadowed
    street pixel). Using only shadow edges keeps q off the lit face in front of a building,
    which would make the path cut straight through it. (256,256) float32."""
    shadow = ~solid & ~los
    near_shadow = np.zeros_like(shadow)
    near_shadow[1:] |= shadow[:-1]
    near_shadow[:-1] |= shadow[1:]
    near_shadow[:, 1:] |= shadow[:, :-1]
    near_shadow[:, :-1] |= shadow[:, 1:]
    edge = los & near_shadow
    if not edge.any():
        return dist
    leg2, (q_rows, q_cols) = ndimage.distance_transform_edt(~edge, return_indices=True)
    return np.where(los, dist, dist[q_rows, q_cols] + leg2.astype(np.float32))


def ray_features(buildings: np.ndarray, tx_rc: tuple[int, int], cars: np.ndarray | None = None) -> RayFeatures:
    """The geometry every model needs (see the module docstring)."""
    _check_inputs(buildings, tx_rc, cars)
    row, col = int(tx_rc[0]), int(tx_rc[1])
    solid = np.ascontiguousarray(buildings, dtype=bool)
    car_mask = None if cars is None else np.ascontiguousarray(cars, dtype=bool) & ~solid
    masks = [solid] if car_mask is None else [solid, car_mask]
    sampled = _cast_rays(masks, row, col)
    ray, radius_idx, dist = _pixel_ray_index(row, col)
    entries = sampled[0].copy()
    entries[:, 1:] &= ~sampled[0][:, :-1]  # a wall is entered where a ray goes street -> building
    metres = _cumulative_before(sampled[0], ray, radius_idx)
    walls = _cumulative_before(entries, ray, radius_idx)
    car_metres = (_cumulative_before(sampled[1], ray, radius_idx) if car_mask is not None
                  else np.zeros_like(metres))
    los = (~solid) & (metres <= LOS_TOLERANCE_M)
    los[row, col] = True
    around = _around_path(los, solid, dist)
    return RayFeatures(
        tx_rc=(row, col), buildings=solid, direct_m=np.maximum(dist, 1.0), metres=metres, walls=walls,
        car_metres=car_metres, los=los, around_m=np.maximum(around, 1.0).astype(np.float32),
    )


def dpm_db(f: RayFeatures, p: PropagationParams, with_cars: bool = False) -> np.ndarray:
    """DPM gain in dB (unclipped, buildings not masked), shape (256,256)."""
    direct = (p.ref_db - 10.0 * p.exponent * np.log10(f.direct_m) - p.wall_db * f.walls
              - p.metre_db * np.minimum(f.metres, p.metre_cap_m))
    if with_cars:
        direct = direct - p.car_metre_db * f.car_metres
    excess = np.maximum(f.around_m - f.direct_m, 0.0)
    around = (p.ref_db - 10.0 * p.exponent * np.log10(f.around_m) - p.diffraction_db
              - p.excess_db * np.sqrt(excess))
    # Both paths carry power; in LOS the direct path is free space and dominates.
    both = 10.0 * np.log10(10.0 ** (direct / 10.0) + 10.0 ** (around / 10.0))
    return np.where(f.los, direct, both)


def _irt_db(f: RayFeatures, p: PropagationParams, with_cars: bool, interactions: int) -> np.ndarray:
    los_db = p.ref_db - 10.0 * p.irt_exponent * np.log10(f.direct_m)
    if with_cars:
        los_db = los_db - p.car_metre_db * f.car_metres
    excess = np.maximum(f.around_m - f.direct_m, 0.0)
    # Each extra allowed interaction softens the penalty for bending deeper into a shadow.
    per_metre = p.irt_excess_db * 2.0 / interactions
    nlos_db = (p.ref_db - 10.0 * p.irt_exponent * np.log10(f.around_m) - p.irt_interaction_db
               - per_metre * np.sqrt(excess) - 0.15 * per_metre * excess)
    return np.where(f.los, los_db, nlos_db)


def gain_from_features(features: RayFeatures, model: str, params: PropagationParams | None = None) -> np.ndarray:
    """Gain map (256,256) uint8 of ``model`` from precomputed geometry."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not valid; expected one of {', '.join(MODELS)}")
    p = params or PropagationParams()
    with_cars = model.startswith("cars")
    base = model.removeprefix("cars")
    if base == "DPM":
        gray = db_to_gray(dpm_db(features, p, with_cars))
        peak = 255
    else:
        gray = db_to_gray(_irt_db(features, p, with_cars, 2 if base == "IRT2" else 4))
        peak = IRT_PEAK_GRAY
        np.minimum(gray, IRT_PEAK_GRAY, out=gray)
    gray[features.buildings] = 0
    gray[features.tx_rc] = peak
    return gray


def simulate_gain(
    buildings: np.ndarray,
    tx_rc: tuple[int, int],
    model: str,
    cars: np.ndarray | None = None,
    params: PropagationParams | None = None,
) -> np.ndarray:
    """Simulate one gain map. ``buildings`` (256,256) bool, ``tx_rc`` (row, col) -> (256,256) uint8."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not valid; expected one of {', '.join(MODELS)}")
    if model.startswith("cars") and cars is None:
        raise ValueError(f"model {model} needs a cars map")
    features = ray_features(buildings, tx_rc, cars if model.startswith("cars") else None)
    return gain_from_features(features, model, params)
