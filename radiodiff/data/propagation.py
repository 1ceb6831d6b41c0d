"""Fast physical gain models that imitate RadioMapSeer's simulations on a 256x256 1 m grid.

Everything is computed from one transmitter (tx) position and a building mask; no noise is added.

Geometry (``ray_features``), shared by all models, vectorized in numpy:

* Polar ray casting. ``NUM_RAYS`` rays leave the tx with a 1 m radial step; the building (and car)
  masks are sampled along every ray and summed cumulatively, so each ray knows, at every radius,
  how many metres of building it has crossed and how many walls it has entered. Each pixel then
  reads the ray closest to its direction at its own radius. The pixel's own sample is excluded,
  so a street pixel next to a wall is not counted as "inside" it.
* Line of sight (LOS): a street pixel whose straight line to the tx crosses (almost) no building.
* Path around buildings: the geodesic (shortest free-space) distance from the tx, i.e. a path that
  bends around as many corners as it needs. LOS pixels keep their exact straight-line distance;
  the shadow is filled by a multi-source Dijkstra on a 2 m grid (128x128 cells, 8-neighbour moves,
  a cell is free when any of its pixels is), seeded from the LOS cells with their exact distances.
  Off-axis 8-neighbour steps are up to 8% long; on the real maps that fitted better than the more
  exact 16-neighbour moves, acting as a mild penalty for bending.
  ``excess = around - direct`` measures how far the path bends.
* Edge ring: street pixels whose south or west neighbour is a building. RadioMapSeer's simulator
  rasterizes the building polygons slightly differently from the building PNGs, so about 40% of
  these pixels (on the north and east faces of buildings) are 0 in the real DPM maps; which ones
  depends on sub-pixel polygon edges that the PNG does not keep.

Models (gain in dB, always negative; ``PropagationParams`` holds the constants):

* ``DPM`` (dominant path): three paths (in LOS, the direct path alone). The two straight-line
  paths add as powers; the around path joins them through a soft maximum
  ``10 s log10(10^(a / 10 s) + 10^(b / 10 s))`` with ``s = path_softness`` (s = 1 is the power
  sum; the fitted s ~ 5 gives the soft shadow edges of the real maps).
  through the walls: ``A - 10 n log10(d) - wall_db * walls - metre_db * L (1 - exp(-metres / L))``
  (penetration loss that saturates after ``L = metre_sat_m`` metres of building);
  over the roofs (only where the straight line is blocked): ``A - 10 n log10(d) - roof_scale *
  J(v) - roof_offset_db``, one equivalent knife edge 23.5 m above the line (25 m buildings, 1.5 m
  antennas) at distances d1 (tx -> first building) and d2 (last building -> pixel),
  ``v = h sqrt(2 d / (lambda d1 d2))`` and J the ITU-R P.526 single-edge loss, so shadows are
  deepest right behind a building and fade with distance from it, as in the real maps;
  around the buildings: ``A - 10 n log10(d_around) - diffraction_db - excess_db * sqrt(excess)
  - excess_lin_db * excess``. Edge-ring pixels get the expected dB value of a pixel that is 0 with
  probability ``edge_floor_weight``. Below -147 dB the map is 0 (the simulation floor). Exactly 255
  at the tx pixel.
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
from functools import lru_cache

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

SIZE = 256
FLOOR_DB = -147.0
CEIL_DB = -47.84
NUM_RAYS = 1440  # the farthest pixel (363 m) is < 0.8 px from its ray
MAX_RADIUS_M = 365  # > diagonal of the 256 m map
# Rays that graze a wall pick up a metre or two of "building" without being blocked.
LOS_TOLERANCE_M = 1.5
MODELS = ("DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4")
IRT_PEAK_GRAY = 249
# Geodesic grid: 2 m cells keep the shortest-path search well inside the time budget while
# narrow streets (>= 3 m) stay open.
GEO_CELL_M = 2
UNREACHABLE_M = 1e4  # street pixels enclosed by buildings: no free path at all
WAVELENGTH_M = 299_792_458.0 / 5.9e9
ROOF_ABOVE_LINE_M = 25.0 - 1.5  # building height above the tx-rx line (both antennas at 1.5 m)


@dataclass(frozen=True)
class PropagationParams:
    """Model constants. The DPM values (ref_db .. path_softness) were fitted by tools/fit_synth.py
    (``--stride 3``) on the 45 real RadioUNet-train DPM samples of the shared RadioMapSeer subset
    only; val/test samples were never used (train RMSE 4.37 dB; the model terms were chosen by
    5-fold leave-maps-out cross-validation within train). car_metre_db is not fitted (no real
    carsDPM maps here)."""

    ref_db: float = -48.809  # gain at 1 m
    exponent: float = 2.455  # log-distance path-loss exponent n
    wall_db: float = 1.241  # per wall entered on the straight line
    metre_db: float = 8.258  # per metre of building crossed, for the first metres
    metre_sat_m: float = 3.858  # penetration loss saturates at metre_db * metre_sat_m
    diffraction_db: float = 28.114  # fixed loss of bending around buildings
    excess_db: float = 0.384  # times sqrt(excess path length in m)
    excess_lin_db: float = 2.431  # times excess path length in m
    edge_floor_weight: float = 0.35  # share of edge-ring pixels that are 0 in the real maps
    roof_scale: float = 0.798  # times the knife-edge loss J(v) of the over-roof path
    roof_offset_db: float = -13.057  # added to it (the 2D knife edge overstates the loss)
    path_softness: float = 4.882  # blend of straight-line and around paths (1 = power sum)
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
    around_m: np.ndarray  # geodesic length of the shortest free-space path from the tx
    edge_ring: np.ndarray  # bool, street pixels with a building to the south or west
    first_edge_m: np.ndarray  # tx -> first building sample on the straight line (1 if none)
    last_edge_m: np.ndarray  # last building sample on the straight line -> pixel (1 if none)


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


@lru_cache(maxsize=1)
def _grid_edges(cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 8-neighbour moves of a cells x cells grid, each once: (source, target, length in cells)."""
    index = np.arange(cells * cells).reshape(cells, cells)
    src, dst, length = [], [], []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        rows = slice(0, cells - dr)
        from_cols = slice(max(0, -dc), cells - max(0, dc))
        to_cols = slice(max(0, dc), cells - max(0, -dc))
        src.append(index[rows, from_cols].ravel())
        dst.append(index[dr:, to_cols].ravel())
        length.append(np.full(src[-1].size, np.hypot(dr, dc), dtype=np.float64))
    return np.concatenate(src), np.concatenate(dst), np.concatenate(length)


def _geodesic_path(los: np.ndarray, solid: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Shortest free-space path length from the tx to every pixel. (256,256) float32.

    A virtual source node links to every coarse cell holding LOS pixels with the exact distance of
    its nearest one, so the search only has to route the shadow, not re-measure LOS distances.
    """
    cells = SIZE // GEO_CELL_M
    blocks = (cells, GEO_CELL_M, cells, GEO_CELL_M)
    free = ~solid.reshape(blocks).all(axis=(1, 3)).ravel()
    seed = np.where(los, dist, np.inf).reshape(blocks).min(axis=(1, 3)).ravel()
    src, dst, length = _grid_edges(cells)
    move = free[src] & free[dst]
    seeded = np.flatnonzero(np.isfinite(seed) & free)
    source = cells * cells
    # csgraph drops explicit zero weights, hence the tiny floor on the tx cell's seed.
    weights = np.concatenate([length[move] * GEO_CELL_M, np.maximum(seed[seeded], 1e-3)])
    graph = csr_matrix(
        (weights, (np.concatenate([src[move], np.full(seeded.size, source)]),
                   np.concatenate([dst[move], seeded]))),
        shape=(source + 1, source + 1),
    )
    reach = dijkstra(graph, directed=False, indices=source)[:source]
    reach = np.where(np.isfinite(reach), reach, UNREACHABLE_M).reshape(cells, cells)
    fine = np.repeat(np.repeat(reach, GEO_CELL_M, axis=0), GEO_CELL_M, axis=1)
    return np.where(los, dist, np.maximum(fine, dist)).astype(np.float32)


def _roof_edges(samples: np.ndarray, ray: np.ndarray, radius_idx: np.ndarray,
                dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances tx -> first building and last building -> pixel along each pixel's ray, the two
    legs of a single equivalent knife edge over the roofs. (256,256) float32 each, >= 1."""
    radius = np.arange(samples.shape[1], dtype=np.int16)
    first = np.argmax(samples, axis=1).astype(np.float32)  # (K,); only read where a hit exists
    last = np.maximum.accumulate(np.where(samples, radius, np.int16(-1)), axis=1)  # (K, J)
    before = np.maximum(radius_idx - 1, 0)  # the pixel's own sample is excluded, as for metres
    first_m = np.maximum(first[ray], 1.0)
    last_m = np.maximum(dist - last[ray, before], 1.0)
    return first_m.astype(np.float32), last_m.astype(np.float32)


def _edge_ring(solid: np.ndarray) -> np.ndarray:
    """Street pixels whose south (row + 1) or west (col - 1) neighbour is a building."""
    ring = np.zeros_like(solid)
    ring[:-1] |= solid[1:]
    ring[:, 1:] |= solid[:, :-1]
    return ring & ~solid


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
    around = _geodesic_path(los, solid, dist)
    first_edge, last_edge = _roof_edges(sampled[0], ray, radius_idx, dist)
    return RayFeatures(
        tx_rc=(row, col), buildings=solid, direct_m=np.maximum(dist, 1.0), metres=metres, walls=walls,
        car_metres=car_metres, los=los, around_m=np.maximum(around, 1.0).astype(np.float32),
        edge_ring=_edge_ring(solid), first_edge_m=first_edge, last_edge_m=last_edge,
    )


def _power_sum(a_db: np.ndarray, b_db: np.ndarray, softness: float = 1.0) -> np.ndarray:
    """Incoherent power sum for softness 1; a larger softness widens the transition between two
    paths of similar strength (a soft maximum), which smooths the edges of shadows."""
    scale = 10.0 * softness
    return scale * np.log10(10.0 ** (a_db / scale) + 10.0 ** (b_db / scale))


def knife_edge_db(v: np.ndarray) -> np.ndarray:
    """Single knife-edge diffraction loss J(v) in dB (ITU-R P.526 approximation, v > -0.78)."""
    return 6.9 + 20.0 * np.log10(np.sqrt((v - 0.1) ** 2 + 1.0) + v - 0.1)


def _over_roof_db(f: RayFeatures, p: PropagationParams, free_db: np.ndarray) -> np.ndarray:
    """The path over the roofs: free space minus one equivalent knife edge at roof height."""
    d1, d2 = f.first_edge_m, f.last_edge_m
    v = ROOF_ABOVE_LINE_M * np.sqrt(2.0 * f.direct_m / (WAVELENGTH_M * d1 * d2))
    return free_db - p.roof_scale * knife_edge_db(v) - p.roof_offset_db


def dpm_db(f: RayFeatures, p: PropagationParams, with_cars: bool = False) -> np.ndarray:
    """DPM gain in dB (buildings not masked; edge-ring pixels already clipped), shape (256,256)."""
    free = p.ref_db - 10.0 * p.exponent * np.log10(f.direct_m)
    penetration = p.metre_db * p.metre_sat_m * -np.expm1(-f.metres / p.metre_sat_m)
    direct = free - p.wall_db * f.walls - penetration
    blocked = f.metres > 0
    direct = np.where(blocked, _power_sum(direct, _over_roof_db(f, p, free)), direct)
    if with_cars:
        direct = direct - p.car_metre_db * f.car_metres
    excess = np.maximum(f.around_m - f.direct_m, 0.0)
    around = (p.ref_db - 10.0 * p.exponent * np.log10(f.around_m) - p.diffraction_db
              - p.excess_db * np.sqrt(excess) - p.excess_lin_db * excess)
    # In LOS the direct path is free space and dominates; in shadow the straight-line paths and the
    # around path blend smoothly (real shadow edges are softer than an incoherent sum gives).
    gain = np.where(f.los, direct, _power_sum(direct, around, p.path_softness))
    # The real value of a ring pixel is either the field or the floor; the dB expectation of the
    # two is what minimizes the squared error when we cannot tell which.
    ring = (1.0 - p.edge_floor_weight) * np.clip(gain, FLOOR_DB, CEIL_DB) + p.edge_floor_weight * FLOOR_DB
    return np.where(f.edge_ring, ring, gain)


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
