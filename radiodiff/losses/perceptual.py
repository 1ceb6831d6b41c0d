"""LPIPS (VGG16) perceptual distance for single-channel radio maps, never downloading weights.

The ``lpips`` package ships its linear-layer weights but asks torchvision for the VGG16 backbone
at run time, which downloads. We build LPIPS with a random backbone and, when pretrained weights
are wanted, load a local torchvision vgg16 state dict into it ourselves.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from radiodiff.config import PerceptualConfig

# torchvision's file name for the ImageNet VGG16 weights (IMAGENET1K_V1).
VGG16_CACHE_NAME = "vgg16-397923af.pth"


def vgg16_cache_path() -> Path:
    """Where torchvision would cache VGG16: ``$TORCH_HOME/hub/checkpoints/`` (torch.hub's rules)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_CACHE_NAME


def resolve_vgg_weights(cfg: PerceptualConfig) -> Path:
    """The VGG16 state dict to load: ``cfg.vgg_weights`` when set, else the torch hub cache.

    A configured path that does not exist is an error rather than a silent fall-back to the cache.
    """
    cache = vgg16_cache_path()
    path = Path(os.path.expanduser(cfg.vgg_weights)) if cfg.vgg_weights else cache
    if path.is_file():
        return path
    problem = f"perceptual.vgg_weights={cfg.vgg_weights!r} does not exist" if cfg.vgg_weights else (
        f"no VGG16 weights in the torch cache ({cache})"
    )
    raise FileNotFoundError(
        f"LPIPS needs the torchvision VGG16 ImageNet weights ({VGG16_CACHE_NAME}) and never downloads "
        f"them: {problem}. Put the file at {cache} (the torch hub cache; TORCH_HOME moves it) with "
        f"perceptual.vgg_weights unset, or at a path of your choice named by perceptual.vgg_weights "
        f"(now {cfg.vgg_weights!r}). perceptual.pretrained=false uses a random backbone instead."
    )


def _load_backbone(model: nn.Module, path: Path) -> None:
    """Copy a torchvision vgg16 state dict's ``features.*`` into LPIPS's sliced backbone."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips keeps torchvision's feature indices as child names: net.slice2.5 is features.5.
    for slice_module in model.net.children():
        for index, layer in slice_module.named_children():
            for name, param in layer.named_parameters(recurse=False):
                key = f"features.{index}.{name}"
                if key not in state:
                    raise ValueError(f"{path}: not a torchvision vgg16 state dict (missing {key!r})")
                if state[key].shape != param.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(state[key])


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG distance between maps in [-1, 1]: (B, C, H, W) x 2 -> (B, 1, 1, 1)."""

    def __init__(self, cfg: PerceptualConfig) -> None:
        super().__init__()
        import lpips  # deferred: importing it pulls in torchvision model definitions

        weights = resolve_vgg_weights(cfg) if cfg.pretrained else None
        with warnings.catch_warnings():
            # lpips passes torchvision's deprecated ``pretrained=`` argument.
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: build the backbone without a download; pretrained=True here means
            # the package's shipped linear-layer weights.
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if weights is not None:
            _load_backbone(self.lpips, weights)
        self.lpips.eval()
        for param in self.lpips.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPSLoss":
        # Stays in eval mode: its linear layers sit behind dropout that must stay off.
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            # (B, 1, H, W) -> (B, 3, H, W): VGG wants three channels.
            x, x_hat = x.expand(-1, 3, -1, -1), x_hat.expand(-1, 3, -1, -1)
        return self.lpips(x, x_hat)  # (B, 1, 1, 1)


def build_perceptual(cfg: PerceptualConfig) -> LPIPSLoss:
    return LPIPSLoss(cfg)
