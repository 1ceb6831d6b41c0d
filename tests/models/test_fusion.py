"""Condition fusion: the transmitter reaches every level, distance, line-of-sight and detour channels, stem,
output skips, bf16."""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS, ConfigError, UNetConfig
from radiodiff.models import fusion
from radiodiff.models.fusion import (
    ConditionStem,
    DenseFusion,
    _shortest_paths,
    tx_detour_map,
    tx_distance_map,
    tx_line_of_sight,
    with_derived_channels,
)
from radiodiff.models.unet import ConditionalUNet, output_skips


def tiny_unet(seed: int = 0, **overrides: object) -> ConditionalUNet:
    torch.manual_seed(seed)
    return ConditionalUNet(dataclasses.replace(UNET_PRESETS["tiny"], **overrides), CONDITION_PRESETS["tiny"])


def city_with_tx(row: int, col: int, size: int = 64) -> torch.Tensor:
    """(1, 3, size, size) condition in [-1, 1]: random buildings, one transmitter pixel at (row, col)."""
    g = torch.Generator().manual_seed(0)
    buildings = (torch.rand(1, size, size, generator=g) > 0.7).float() * 2 - 1
    tx = -torch.ones(1, size, size)
    tx[0, row, col] = 1.0
    return torch.stack([buildings, tx, buildings], dim=1)


def fusion_sensitivity(model: ConditionalUNet, cond_a: torch.Tensor, cond_b: torch.Tensor) -> dict[str, float]:
    """Per fused level: how much that level's fusion output moves when only the condition changes.

    The U-Net input of every fusion is captured on a pass with ``cond_a``; the fusion is then applied
    to that same input with the level's condition feature of ``cond_a`` and of ``cond_b``. Measure:
    the largest per-position change (L2 over channels) over the mean per-position norm of the output,
    so that a change confined to the transmitter's neighbourhood counts fully.
    """
    levels = [(f"encoder{i}", level.fusion, i) for i, level in enumerate(model.encoder)]
    for head in ("decoder_c", "decoder_eps"):
        decoder = getattr(model, head)
        last = len(decoder.levels) - 1
        levels += [(f"{head}{last - j}", level.fusion, last - j) for j, level in enumerate(decoder.levels)]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        fusion.register_forward_hook(lambda _m, args, _out, name=name: inputs.__setitem__(name, args[0]))
        for name, fusion, _ in levels
    ]
    z_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(z_t, torch.tensor([0.5]), cond_a)
        features_a, features_b = model.condition_features(cond_a), model.condition_features(cond_b)
        result = {}
        for name, fusion, i in levels:
            out_a, out_b = fusion(inputs[name], features_a[i]), fusion(inputs[name], features_b[i])
            change = (out_a - out_b).norm(dim=1).amax()
            result[name] = (change / out_a.norm(dim=1).mean()).item()
    for hook in hooks:
        hook.remove()
    assert len(result) == 12
    return result


def test_moving_the_transmitter_changes_every_fused_level() -> None:
    cond_a, cond_b = city_with_tx(10, 12), city_with_tx(50, 41)
    dense = fusion_sensitivity(tiny_unet().eval(), cond_a, cond_b)
    pooled = fusion_sensitivity(tiny_unet(dense_fusion=False).eval(), cond_a, cond_b)
    for name, value in dense.items():
        assert value > 0.01, (name, value)
    # At the 16x16 and 8x8 levels the 2x2 pooled tokens blur the pixel away; the dense path does not.
    for name in dense:
        if name.endswith(("0", "1")):
            assert dense[name] > 5 * pooled[name], (name, dense[name], pooled[name])


def test_stem_alone_carries_the_transmitter() -> None:
    """With a stem the transmitter reaches the fusion even where the Swin features cannot see it."""
    model = tiny_unet(cond_stem_dim=4).eval()
    cond_a, cond_b = city_with_tx(10, 12), city_with_tx(50, 41)
    with torch.no_grad():
        fa, fb = model.condition_features(cond_a), model.condition_features(cond_b)
    swin_width = model.cond_encoder.widths
    for i, (a, b) in enumerate(zip(fa, fb)):
        assert a.shape[1] == swin_width[i] + model.cond_stem.widths[i]
        assert (a[:, swin_width[i]:] - b[:, swin_width[i]:]).abs().amax() > 1e-3, i


@pytest.mark.parametrize("row,col", [(0, 0), (7, 3), (63, 20), (31, 63)])
def test_tx_distance_matches_numpy(row: int, col: int) -> None:
    h, w = 64, 48
    cond = -torch.ones(2, 3, h, w)
    cond[0, 1, row, col % w] = 1.0
    cond[1, 1, h - 1 - row, w - 1 - col % w] = 1.0
    got = tx_distance_map(cond).numpy()
    assert got.shape == (2, 1, h, w)
    rr, cc = np.mgrid[0:h, 0:w]
    diagonal = np.hypot(h - 1, w - 1)
    for b, (r0, c0) in enumerate([(row, col % w), (h - 1 - row, w - 1 - col % w)]):
        expected = 2.0 * np.hypot(rr - r0, cc - c0) / diagonal - 1.0
        np.testing.assert_allclose(got[b, 0], expected, rtol=0, atol=1e-6)
    assert got.min() == -1.0 and got.max() <= 1.0


def test_tx_distance_adds_an_encoder_channel() -> None:
    model = tiny_unet(tx_distance=True, cond_stem_dim=4)
    assert model.cond_encoder.patch_embed.proj.in_channels == 4
    assert model.cond_stem.full[0].in_channels == 4
    # Moving the transmitter moves the distance map, so the condition features change everywhere.
    with torch.no_grad():
        fa = model.condition_features(city_with_tx(10, 12))[0]
        fb = model.condition_features(city_with_tx(50, 41))[0]
    assert (fa - fb).norm(dim=1).amin() > 0


def line_of_sight_reference(buildings: np.ndarray, row: int, col: int) -> np.ndarray:
    """numpy/scipy: the share of the line inside buildings, read by scipy's own linear interpolation at
    the same max(H, W) midpoints of every transmitter -> pixel segment."""
    h, w = buildings.shape
    k = max(h, w)
    along = (np.arange(k) + 0.5) / k
    share = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            points = np.stack([row + along * (r - row), col + along * (c - col)])
            share[r, c] = map_coordinates(buildings, points, order=1, mode="nearest").mean()
    return share


@pytest.mark.parametrize("row,col", [(0, 0), (17, 5), (39, 47), (20, 30)])
def test_tx_line_of_sight_matches_scipy_interpolation_along_each_line(row: int, col: int) -> None:
    h, w = 40, 48
    rng = np.random.default_rng(row * 100 + col)
    buildings = (rng.random((h, w)) > 0.8).astype(np.float64)
    cond = torch.stack([torch.tensor(buildings * 2 - 1), -torch.ones(h, w), torch.tensor(buildings * 2 - 1)])
    cond[1, row, col] = 1.0
    got = tx_line_of_sight(cond[None].float()).double().numpy()[0]
    share = line_of_sight_reference(buildings, row, col)
    np.testing.assert_allclose(got[0], 2 * share - 1, rtol=0, atol=2e-5)
    crossed = share * np.hypot(*np.mgrid[0:h, 0:w] - np.array([row, col])[:, None, None]) * 64 / max(h, w)
    np.testing.assert_allclose(got[1], 2 * (1 - np.exp(-crossed)) - 1, rtol=0, atol=2e-5)


def test_tx_line_of_sight_of_a_wall_by_hand() -> None:
    """A wall of columns 10..13 across a 32x32 map, the transmitter at (16, 0): the pixel (16, 31) behind
    it sees 4 of the line's 31 pixels in the wall; pixels before the wall are in line of sight."""
    cond = -torch.ones(1, 3, 32, 32)
    cond[:, [0, 2], :, 10:14] = 1.0
    cond[0, 1, 16, 0] = 1.0
    got = tx_line_of_sight(cond)[0]
    assert abs((got[0, 16, 31].item() + 1) / 2 - 4 / 31) < 0.02
    # 4 pixels of wall are 8 units of 1/64 of the side: saturated.
    assert got[1, 16, 31].item() > 0.99
    assert torch.all(got[:, :, :10] == -1.0)  # every line to the left of the wall is clear
    assert torch.all(got[:, 16, 14:] > -1.0)  # every pixel right behind it, on the transmitter's row, is not


def test_tx_line_of_sight_is_the_same_in_row_chunks_and_without_buildings(monkeypatch) -> None:
    cond = torch.cat([city_with_tx(10, 12), city_with_tx(50, 3)])
    whole = tx_line_of_sight(cond)
    monkeypatch.setattr(fusion, "LOS_MAX_POINTS", 2 * 64 * 64 * 3)  # 3 rows per chunk, the last one short
    assert torch.equal(tx_line_of_sight(cond), whole)
    empty = cond.clone()
    empty[:, [0, 2]] = -1.0
    assert torch.all(tx_line_of_sight(empty) == -1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tx_line_of_sight(cond.bfloat16()).dtype == torch.bfloat16


def test_tx_los_adds_two_encoder_channels_after_the_distance() -> None:
    model = tiny_unet(tx_los=True, tx_distance=True, cond_stem_dim=8)
    assert model.cond_encoder.patch_embed.proj.in_channels == 3 + 1 + 2
    assert model.cond_stem.full[0].in_channels == 3 + 1 + 2
    assert tiny_unet(tx_los=True).cond_encoder.patch_embed.proj.in_channels == 3 + 2
    # The channels depend on where the transmitter is: the condition features change when it moves.
    model = tiny_unet(tx_los=True)
    with torch.no_grad():
        fa = model.condition_features(city_with_tx(10, 12))[0]
        fb = model.condition_features(city_with_tx(50, 41))[0]
        c_hat, eps_hat = model(torch.randn(1, 3, 16, 16), torch.rand(1), city_with_tx(10, 12))
    assert (fa - fb).abs().amax() > 0
    assert c_hat.shape == eps_hat.shape == (1, 3, 16, 16)


def detour_reference(buildings: np.ndarray, row: int, col: int) -> np.ndarray:
    """numpy + heapq: Dijkstra over the 8 neighbours (steps 1 and sqrt(2)) through pixels outside buildings,
    started from every pixel whose straight line crosses under half a pixel of building (scipy's share) at
    its straight-line distance; the detour in units of 1/16 of the side, as the channel maps it."""
    h, w = buildings.shape
    direct = np.hypot(*(np.mgrid[0:h, 0:w] - np.array([row, col])[:, None, None]))
    blocked = buildings >= 0.5
    path = np.where((line_of_sight_reference(buildings, row, col) * direct < 0.5) & ~blocked, direct, np.inf)
    queue = [(path[r, c], r, c) for r, c in zip(*np.nonzero(np.isfinite(path)))]
    heapq.heapify(queue)
    while queue:
        d, r, c = heapq.heappop(queue)
        if d > path[r, c]:
            continue
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                nr, nc = r + dr, c + dc
                if (dr or dc) and 0 <= nr < h and 0 <= nc < w and not blocked[nr, nc]:
                    step = d + math.hypot(dr, dc)
                    if step < path[nr, nc]:
                        path[nr, nc] = step
                        heapq.heappush(queue, (step, nr, nc))
    detour = np.maximum(path - direct, 0) * 16 / max(h, w)
    return 2 * (1 - np.exp(-detour)) - 1


@pytest.mark.parametrize("sweeps", [1, 2, 5, 60])
def test_shortest_paths_relax_exactly_as_one_step_to_each_of_the_8_neighbours(sweeps: int) -> None:
    rng = np.random.default_rng(sweeps)
    blocked = rng.random((2, 23, 31)) > 0.75
    seed = np.where(rng.random((2, 23, 31)) > 0.97, rng.random((2, 23, 31)) * 30, np.inf).astype(np.float32)
    expected = np.where(blocked, np.inf, seed)
    for _ in range(sweeps):  # numpy, float32: every neighbour's length plus its step, at once (Jacobi)
        padded = np.pad(expected, ((0, 0), (1, 1), (1, 1)), constant_values=np.inf)
        steps = [padded[:, 1 + dr:24 + dr, 1 + dc:32 + dc] + np.float32(math.hypot(dr, dc))
                 for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
        expected = np.where(blocked, np.inf, np.minimum(expected, np.min(steps, axis=0)))
    got = _shortest_paths(torch.from_numpy(seed), torch.from_numpy(blocked), sweeps).numpy()
    assert np.isfinite(expected).mean() > 0.1 and np.array_equal(got, expected)  # bit for bit


@pytest.mark.parametrize("row,col", [(0, 0), (17, 5), (39, 47)])
def test_tx_detour_matches_a_dijkstra_over_the_street_pixels(row: int, col: int) -> None:
    h, w = 40, 48
    rng = np.random.default_rng(row * 100 + col)
    buildings = (rng.random((h, w)) > 0.8).astype(np.float64)
    buildings[row, col] = 0.0
    cond = torch.stack([torch.tensor(buildings * 2 - 1), -torch.ones(h, w), torch.tensor(buildings * 2 - 1)])
    cond[1, row, col] = 1.0
    got = tx_detour_map(cond[None].float()).double().numpy()[0, 0]
    expected = detour_reference(buildings, row, col)
    assert np.all(got[buildings == 1] == 1.0)  # inside buildings: no path
    assert (expected > -1).mean() > 0.2  # the case has detours to check
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_tx_detour_follows_the_synthetic_simulators_path_around_buildings() -> None:
    """At 256x256 on a synthetic city, the channel's detour (metres) against the simulator's own: the
    shortest path on its 2 m grid (scipy's Dijkstra) minus the straight line."""
    from radiodiff.data.propagation import ray_features
    from radiodiff.data.synthetic import choose_transmitters, generate_city

    city = generate_city(11, 0)
    (row, col), = choose_transmitters(city, 1, 11, 0)
    geometry = ray_features(city.buildings, (row, col))
    simulated = np.maximum(geometry.around_m - geometry.direct_m, 0.0)
    cond = -torch.ones(1, 3, 256, 256)
    cond[0, [0, 2]] = torch.from_numpy(city.buildings.astype(np.float32)) * 2 - 1
    cond[0, 1, row, col] = 1.0
    mapped = (tx_detour_map(cond)[0, 0].double().numpy() + 1) / 2
    street = ~city.buildings & (mapped < 1.0) & (simulated < 1e3)
    metres = -np.log1p(-mapped[street]) * 16  # 1/16 of the 256 m side per unit
    assert (simulated[street] > 5).mean() > 0.1  # a city with shadows
    assert np.corrcoef(metres, simulated[street])[0, 1] > 0.95
    assert np.abs(metres - simulated[street]).mean() < 2.0  # metres, the simulator's path on 2 m cells


def test_tx_detour_without_buildings_and_in_a_closed_courtyard() -> None:
    cond = -torch.ones(2, 3, 24, 24)
    cond[:, 1, 3, 4] = 1.0
    cond[1, [0, 2], 10:20, 10:20] = 1.0
    cond[1, [0, 2], 12:18, 12:18] = -1.0  # a courtyard no path reaches
    got = tx_detour_map(cond)
    assert torch.all(got[0] == -1.0)  # every pixel in line of sight
    assert torch.all(got[1, 0, 12:18, 12:18] == 1.0) and torch.all(got[1, 0, 10:20, 10] == 1.0)
    assert got[1, 0, 21, 21] > -1.0 and got[1, 0, 5, 22] == -1.0  # behind the block; beside it in sight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tx_detour_map(cond.bfloat16()).dtype == torch.bfloat16


def test_tx_detour_adds_the_last_encoder_channel() -> None:
    model = tiny_unet(tx_los=True, tx_detour=True, cond_stem_dim=8)
    assert model.cond_encoder.patch_embed.proj.in_channels == model.cond_stem.full[0].in_channels == 3 + 2 + 1
    cond = city_with_tx(10, 12)
    out = with_derived_channels(cond, tx_distance=True, tx_los=True, tx_detour=True)
    assert torch.equal(out[:, -1:], tx_detour_map(cond)) and torch.equal(out[:, 4:6], tx_line_of_sight(cond))


def test_derived_channels_run_on_the_meta_device() -> None:
    # The meta device (shape-only passes: a model's size without its memory) has no autocast: the
    # line-of-sight channels' fp32 region must not need one.
    cond = torch.zeros(2, 3, 64, 64, device="meta")
    out = with_derived_channels(cond, tx_distance=True, tx_los=True, tx_detour=True)
    assert out.shape == (2, 3 + 1 + 2 + 1, 64, 64) and out.device.type == "meta"
    with torch.device("meta"):
        model = tiny_unet(tx_los=True, tx_distance=True, tx_detour=True)
        c_hat, eps_hat = model(torch.zeros(2, 3, 16, 16), torch.zeros(2), cond)
    assert c_hat.shape == eps_hat.shape == (2, 3, 16, 16) and c_hat.device.type == "meta"


def test_output_skips_match_a_hand_computation() -> None:
    # t = 0.25: sqrt(1 + t^2) = sqrt(1.0625); z_t = 2, F_C = 3, F_eps = -1.
    z_t, f_c, f_eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), -1.0)
    c, eps = output_skips(z_t, torch.tensor([0.25]), f_c, f_eps)
    norm = math.sqrt(1.0625)
    assert c.item() == pytest.approx(0.75 * 2.0 + 0.25 / norm * 3.0, rel=1e-6)  # 2.2276...
    assert eps.item() == pytest.approx(0.5 * 2.0 - math.sqrt(0.75) / norm, rel=1e-6)  # 0.1598...


def test_output_skips_switch_wraps_the_heads() -> None:
    """Same weights (the skips add none): skips on == the formula applied to the raw heads."""
    g = torch.Generator().manual_seed(3)
    z_t, t, cond = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.1, 0.9]), torch.randn(2, 3, 64, 64)
    plain, skipped = tiny_unet(seed=4).eval(), tiny_unet(seed=4, output_skips=True).eval()
    with torch.no_grad():
        f_c, f_eps = plain(z_t, t, cond)
        c, eps = skipped(z_t, t, cond)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(c, (1 - tb) * z_t + tb / (1 + tb**2).sqrt() * f_c)
    torch.testing.assert_close(eps, tb.sqrt() * z_t + (1 - tb).sqrt() / (1 + tb**2).sqrt() * f_eps)


def test_bf16_parameters_run_with_fp32_time() -> None:
    model = tiny_unet(output_skips=True, tx_distance=True, cond_stem_dim=4).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(5)
    z_t = torch.randn(2, 3, 16, 16, generator=g).bfloat16()
    cond = city_with_tx(10, 12).expand(2, -1, -1, -1).bfloat16()
    t1 = torch.tensor([1e-4, 0.5])
    t2 = torch.tensor([1.002e-4, 0.5])
    assert torch.equal(t1.bfloat16(), t2.bfloat16())  # indistinguishable once rounded to bf16
    with torch.no_grad():
        c1, e1 = model(z_t, t1, cond)
        _, e2 = model(z_t, t2, cond)
        assert not torch.equal(model.time_embed(t1)[0], model.time_embed(t2)[0])
    assert c1.dtype == e1.dtype == torch.bfloat16 and c1.shape == (2, 3, 16, 16)
    assert torch.isfinite(c1.float()).all() and torch.isfinite(e1.float()).all()
    # The model saw t in fp32. (At t ~ 1e-4 the C head is ~z_t, so the eps head shows the difference.)
    assert not torch.equal(e1[0], e2[0])
    torch.testing.assert_close(e1[1], e2[1])


def test_zero_init_fusion_starts_as_a_group_norm() -> None:
    fusion = DenseFusion(cond_channels=6, width=8, groups=4, zero_init=True)
    x, feature = torch.randn(2, 8, 5, 5), torch.randn(2, 6, 10, 10)
    torch.testing.assert_close(fusion(x, feature), fusion.norm(x))
    out = DenseFusion(cond_channels=6, width=8, groups=4)(x, feature)  # resized 10x10 -> 5x5
    assert out.shape == x.shape


@pytest.mark.parametrize("first_stride", [4, 2])
def test_stem_shapes_and_every_pixel_reaches_every_level(first_stride: int) -> None:
    torch.manual_seed(0)
    stem = ConditionStem(in_channels=3, dim=4, groups=2, first_stride=first_stride).eval()
    x = torch.zeros(1, 3, 64, 64)
    base = stem(x)
    sizes = [64 // (first_stride * 2**i) for i in range(4)]
    assert [tuple(f.shape) for f in base] == [(1, w, s, s) for w, s in zip((4, 8, 16, 16), sizes)]
    for row, col in [(0, 0), (1, 2), (3, 3), (62, 61)]:  # every phase of the stride-4 (and stride-2) grid
        y = x.clone()
        y[0, 1, row, col] = 1.0
        for i, (a, b) in enumerate(zip(base, stem(y))):
            assert (a - b).abs().amax() > 1e-4, (row, col, i)


def test_stem_at_another_first_stride_is_refused_naming_the_way_out() -> None:
    with pytest.raises(ValueError, match="stride 2 or 4, not 8 .*cond_stem_dim=0"):
        ConditionStem(in_channels=3, dim=4, groups=2, first_stride=8)


def test_stem_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="unet.cond_stem_dim"):
        UNetConfig(cond_stem_dim=-1)
    with pytest.raises(ConfigError, match="unet.cond_stem_dim"):
        UNetConfig(cond_stem_dim=12)  # not divisible by norm_groups=8
