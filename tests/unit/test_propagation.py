"""Physics sanity of the gain models, checked against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from radiodiff.data.propagation import (
    PropagationParams, db_to_gray, gray_to_db, ray_features, simulate_gain,
)

EMPTY = np.zeros((256, 256), dtype=bool)
TX = (128, 128)


def test_gray_formula_matches_hand_values() -> None:
    # 255 * (PL + 147) / 99.16: -47.84 -> 255, -147 -> 0, -97.42 -> 127.5 (rounds to 128), below floor -> 0
    assert db_to_gray(np.array([-47.84, -147.0, -97.42, -200.0, -10.0])).tolist() == [255, 0, 128, 0, 255]
    assert gray_to_db(np.array([0, 255])) == pytest.approx([-147.0, -47.84])
    assert gray_to_db(np.array([51]))[0] == pytest.approx(-127.168, abs=1e-3)


def test_free_space_decays_monotonically_with_distance() -> None:
    gain = simulate_gain(EMPTY, TX, "DPM").astype(int)
    assert gain[TX] == 255
    east = gain[128, 129:256]
    assert np.all(np.diff(east) <= 0) and east[0] > east[-1] + 20
    # Isotropic: equal distance in different directions gives (almost) equal gain.
    assert abs(gain[128, 128 + 90] - gain[128 - 90, 128]) <= 1
    p = PropagationParams()
    expected = db_to_gray(np.array([p.ref_db - 10 * p.exponent * np.log10(100.0)]))[0]
    assert abs(int(gain[128, 228]) - int(expected)) <= 1


def test_wall_reduces_gain_behind_it_and_building_pixels_are_zero() -> None:
    wall = EMPTY.copy()
    wall[100:156, 160:170] = True  # 10 m thick building east of the tx
    free = simulate_gain(EMPTY, TX, "DPM").astype(int)
    blocked = simulate_gain(wall, TX, "DPM").astype(int)
    assert np.all(blocked[wall] == 0)
    assert blocked[128, 190] < free[128, 190] - 5  # shadow behind the building
    assert blocked[128, 100] == free[128, 100]  # nothing changes on the other side


def test_line_of_sight_region_is_brighter_than_shadow() -> None:
    wall = EMPTY.copy()
    wall[120:136, 150:160] = True
    features = ray_features(wall, TX)
    assert features.los[128, 100] and not features.los[128, 180]
    gain = simulate_gain(wall, TX, "DPM").astype(int)
    # Same distance (52 m) from the tx: in the open vs straight behind the building.
    assert gain[128 - 52, 128] > gain[128, 180] + 5


def test_around_path_is_longer_than_direct_path_in_shadow() -> None:
    wall = EMPTY.copy()
    wall[108:148, 150:156] = True  # 40 m long wall; corner at row 108
    f = ray_features(wall, TX)
    # Hand geometry: the true corner path tx (128,128) -> corner (107.5,149.5) -> (128,180) is
    # 29.7 + 36.7 = 66.4 m; via the foot of the shadow edge (the approximation) 38.6 + 34.8 = 73.4 m.
    assert 66.0 <= f.around_m[128, 180] <= 74.0
    assert f.direct_m[128, 180] == pytest.approx(52.0)
    assert f.metres[128, 180] == pytest.approx(6.0, abs=1.0)
    assert f.walls[128, 180] == 1


def test_cars_weaken_the_signal_and_irt_peaks_below_255() -> None:
    cars = EMPTY.copy()
    cars[126:131, 150:154] = True
    plain = simulate_gain(EMPTY, TX, "carsDPM", cars=np.zeros_like(cars)).astype(int)
    with_cars = simulate_gain(EMPTY, TX, "carsDPM", cars=cars).astype(int)
    assert with_cars[128, 200] < plain[128, 200]
    assert simulate_gain(EMPTY, TX, "DPM", cars=cars)[128, 200] == plain[128, 200]  # DPM ignores cars
    irt = simulate_gain(EMPTY, TX, "IRT2")
    assert irt.max() == 249 and irt[TX] == 249


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="model"):
        simulate_gain(EMPTY, TX, "FDTD")
    with pytest.raises(ValueError, match="cars"):
        simulate_gain(EMPTY, TX, "carsDPM")
    with pytest.raises(ValueError, match="outside"):
        simulate_gain(EMPTY, (300, 5), "DPM")
    with pytest.raises(ValueError, match=r"\(256, 256\)"):
        simulate_gain(np.zeros((128, 128), dtype=bool), TX, "DPM")
