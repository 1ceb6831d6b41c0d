"""Swin-style condition encoder: shapes, shifted-window masks, pretrained loading, parameter count."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from radiodiff.config import CONDITION_PRESETS, ConditionEncoderConfig, ConfigError
from radiodiff.models.condition import ConditionEncoder, SwinBlock, count_parameters, shifted_window_mask

# Counted once with the swin_b preset (no classification head; four output norms; 8x8 windows).
SWIN_B_PARAMETERS = 86_766_072


def tiny_encoder(seed: int = 0, **overrides: object) -> ConditionEncoder:
    torch.manual_seed(seed)
    return ConditionEncoder(dataclasses.replace(CONDITION_PRESETS["tiny"], **overrides))


def test_tiny_feature_shapes_and_determinism() -> None:
    cond = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = tiny_encoder(seed=1).eval(), tiny_encoder(seed=1).eval()
    features = a(cond)
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    for x, y in zip(features, b(cond)):
        assert torch.equal(x, y)


def test_condition_size_not_divisible_is_rejected() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_encoder()(torch.randn(1, 3, 48, 48))


def test_shifted_mask_small_window_by_hand() -> None:
    # 4x4 map, window 2, shift 1: after the roll, row 3 and column 3 hold wrapped-around content.
    mask = shifted_window_mask(4, 4, window=2, shift=1)
    t, f = True, False
    expected = torch.tensor(
        [
            [[t, t, t, t]] * 4,  # window (rows 0-1, cols 0-1): nothing wrapped
            [[t, f, t, f], [f, t, f, t], [t, f, t, f], [f, t, f, t]],  # cols 2 | 3
            [[t, t, f, f], [t, t, f, f], [f, f, t, t], [f, f, t, t]],  # rows 2 | 3
            [[t, f, f, f], [f, t, f, f], [f, f, t, f], [f, f, f, t]],  # four regions
        ]
    )
    assert torch.equal(mask, expected)


def test_shifted_mask_allows_only_originally_adjacent_pairs() -> None:
    """Two tokens of a window may attend iff the roll kept their original offset (no seam between them)."""
    size, window, shift = 8, 4, 2
    mask = shifted_window_mask(size, size, window, shift)
    windows = [(r, c) for r in range(0, size, window) for c in range(0, size, window)]
    for w_index, (r0, c0) in enumerate(windows):
        tokens = [(r0 + i, c0 + j) for i in range(window) for j in range(window)]
        for (a, pa), (b, pb) in itertools.product(enumerate(tokens), repeat=2):
            original_a = [(x + shift) % size for x in pa]
            original_b = [(x + shift) % size for x in pb]
            adjacent = all(oa - ob == sa - sb for oa, ob, sa, sb in zip(original_a, original_b, pa, pb))
            assert mask[w_index, a, b].item() == adjacent, (w_index, pa, pb)


@pytest.mark.parametrize("shifted", [False, True])
def test_block_influence_stays_inside_its_region(shifted: bool) -> None:
    """Perturb the token at (0, 0): only tokens that share its (shifted) window region may change."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, mlp_ratio=2.0, shifted=shifted).double().eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)  # (B, H, W, C)
    y = x.clone()
    y[0, 0, 0, 0] += 1.0  # one channel: a shift of all channels would vanish in the LayerNorm
    changed = (block(x) - block(y)).abs().amax(dim=-1)[0] > 1e-9  # (H, W)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    # Unshifted: the 4x4 window at the corner. Shifted by 2: (0, 0) lands in the bottom-right window
    # next to rows/cols 6-7 of the original map, but may only see its own wrapped 2x2 region.
    expected[: 2 if shifted else 4, : 2 if shifted else 4] = True
    assert torch.equal(changed, expected)


def test_pretrained_round_trip(tmp_path) -> None:
    source = tiny_encoder(seed=3).eval()
    path = tmp_path / "swin.pt"
    # Wrapped as official checkpoints are, with a classification head the encoder ignores.
    torch.save({"model": {**source.state_dict(), "head.weight": torch.zeros(10, 128)}}, path)
    loaded = tiny_encoder(seed=4, pretrained_path=str(path)).eval()
    cond = torch.randn(1, 3, 64, 64)
    for x, y in zip(source(cond), loaded(cond)):
        assert torch.equal(x, y)


def test_pretrained_missing_file_names_it(tmp_path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        tiny_encoder(pretrained_path=str(path))


def test_pretrained_mismatch_names_file_and_keys(tmp_path) -> None:
    path = tmp_path / "other.pt"
    state = tiny_encoder(window_size=2).state_dict()  # bias tables of another shape
    state.pop("patch_embed.proj.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="other.pt") as info:
        tiny_encoder(pretrained_path=str(path))
    message = str(info.value)
    assert "patch_embed.proj.bias" in message and "extra.weight" in message
    assert "relative_position_bias_table" in message


def test_swin_b_parameter_count() -> None:
    with torch.device("meta"):
        encoder = ConditionEncoder(CONDITION_PRESETS["swin_b"])
    assert encoder.widths == [128, 256, 512, 1024]
    assert count_parameters(encoder) == SWIN_B_PARAMETERS


def test_config_validation_names_key() -> None:
    with pytest.raises(ConfigError, match=r"condition.num_heads\[1\]"):
        ConditionEncoderConfig(embed_dim=16, num_heads=[1, 3, 2, 4])
    with pytest.raises(ConfigError, match="condition.depths"):
        ConditionEncoderConfig(depths=[2, 2, 2])


def test_a_forward_after_the_first_creates_no_host_tensors() -> None:
    """Window position indices and shift masks are built once per shape and device: later forwards of
    a model on another device do no host work (counted with a dispatch mode on the meta device)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS
    from radiodiff.models.unet import build_unet

    class HostTensors(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.created = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                    self.created.append(str(func))
            return out

    with torch.device("meta"):
        unet = build_unet(UNET_PRESETS["tiny"], CONDITION_PRESETS["tiny"])
        z, t, cond = torch.zeros(2, 3, 16, 16), torch.full((2,), 0.5), torch.zeros(2, 3, 64, 64)
    unet(z, t, cond)  # the first forward builds the indices and masks
    with HostTensors() as counter:
        unet(z, t, cond)
    assert counter.created == []
