"""LPIPSLoss against the lpips package called directly, and its no-download weight handling."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from radiodiff.config import PerceptualConfig
from radiodiff.losses.perceptual import VGG16_CACHE_NAME, LPIPSLoss
from tests.helpers import write_fake_vgg16_weights

lpips = pytest.importorskip("lpips")


def _reference_lpips(**kwargs: object) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="vgg", verbose=False, **kwargs).eval()


def _maps(seed: int, batch: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, size, size, generator=gen) * 2 - 1
    x_hat = (x + 0.3 * torch.randn(batch, 1, size, size, generator=gen)).clamp(-1, 1)
    return x, x_hat


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_pretrained_from_torch_cache_matches_lpips_package(torch_home: Path) -> None:
    # lpips itself, through torchvision, reads the same cached file (present, so no download).
    write_fake_vgg16_weights(torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME, seed=1)
    ours = LPIPSLoss(PerceptualConfig(pretrained=True))
    ref = _reference_lpips(pretrained=True, pnet_rand=False)
    x, x_hat = _maps(0)
    got = ours(x, x_hat)
    want = ref(x.repeat(1, 3, 1, 1), x_hat.repeat(1, 3, 1, 1))
    assert got.shape == (2, 1, 1, 1)
    assert torch.all(got > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vgg_weights_path_is_used_and_matters(tmp_path: Path, torch_home: Path) -> None:
    write_fake_vgg16_weights(torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME, seed=1)
    elsewhere = write_fake_vgg16_weights(tmp_path / "weights" / "my_vgg.pth", seed=2)
    x, x_hat = _maps(1)
    from_cache = LPIPSLoss(PerceptualConfig(pretrained=True))
    from_path = LPIPSLoss(PerceptualConfig(pretrained=True, vgg_weights=str(elsewhere)))
    assert not torch.allclose(from_cache(x, x_hat), from_path(x, x_hat))
    # The configured file wins over the cache; lpips keeps torchvision's indices (slice5.28 = features.28).
    state = torch.load(elsewhere)
    torch.testing.assert_close(getattr(from_path.lpips.net.slice1, "0").weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(from_path.lpips.net.slice5, "28").bias, state["features.28.bias"])


def test_random_backbone_matches_lpips_and_keeps_shipped_linear_weights(torch_home: Path) -> None:
    torch.manual_seed(123)
    ours = LPIPSLoss(PerceptualConfig(pretrained=False))
    torch.manual_seed(123)
    ref = _reference_lpips(pretrained=True, pnet_rand=True)
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu")
    torch.testing.assert_close(ours.lpips.lin0.model[1].weight, shipped["lin0.model.1.weight"])
    torch.testing.assert_close(ours.lpips.lin4.model[1].weight, shipped["lin4.model.1.weight"])
    x, x_hat = _maps(2)
    torch.testing.assert_close(ours(x, x_hat), ref(x.repeat(1, 3, 1, 1), x_hat.repeat(1, 3, 1, 1)))
    assert not (torch_home / "hub" / "checkpoints").exists(), "nothing may be downloaded or cached"


def test_frozen_eval_and_differentiable_in_its_input(torch_home: Path) -> None:
    loss = LPIPSLoss(PerceptualConfig(pretrained=False))
    loss.train()
    assert not loss.lpips.training
    assert all(not p.requires_grad for p in loss.parameters())
    x, x_hat = _maps(3)
    torch.testing.assert_close(loss(x, x.clone()), torch.zeros(2, 1, 1, 1))
    x_hat.requires_grad_(True)
    # Dropout in eval mode: two calls agree exactly.
    first, second = loss(x, x_hat), loss(x, x_hat)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first.sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_missing_pretrained_weights_names_the_cache_path(torch_home: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        LPIPSLoss(PerceptualConfig(pretrained=True))
    message = str(info.value)
    assert str(torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME) in message
    assert "perceptual.vgg_weights" in message


def test_missing_configured_weights_names_both_locations(tmp_path: Path, torch_home: Path) -> None:
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError) as info:
        LPIPSLoss(PerceptualConfig(pretrained=True, vgg_weights=str(missing)))
    message = str(info.value)
    assert str(missing) in message
    assert str(torch_home / "hub" / "checkpoints" / VGG16_CACHE_NAME) in message


def test_wrong_weights_file_is_reported(tmp_path: Path, torch_home: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        LPIPSLoss(PerceptualConfig(pretrained=True, vgg_weights=str(bad)))
