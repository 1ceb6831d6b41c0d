"""PatchGAN discriminator: output size, layer layout, initialisation, ActNorm data-dependent init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radiodiff.config import ConfigError, DiscriminatorConfig, discriminator_preset
from radiodiff.models.discriminator import ActNorm, NLayerDiscriminator


def test_reference_256_input_gives_30x30_logits() -> None:
    disc = NLayerDiscriminator(discriminator_preset("reference")).eval()
    with torch.no_grad():
        out = disc(torch.randn(2, 1, 256, 256))
    assert out.shape == (2, 1, 30, 30)


def test_layer_layout() -> None:
    disc = NLayerDiscriminator(DiscriminatorConfig())
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    layout = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias is not None) for c in convs]
    assert layout == [
        (1, 64, (4, 4), (2, 2), (1, 1), True),
        (64, 128, (4, 4), (2, 2), (1, 1), False),
        (128, 256, (4, 4), (2, 2), (1, 1), False),
        (256, 512, (4, 4), (1, 1), (1, 1), False),
        (512, 1, (4, 4), (1, 1), (1, 1), True),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    slopes = {m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}


def test_initialisation_statistics() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(DiscriminatorConfig())
    big = disc.main[8].weight  # 512 x 256 x 4 x 4 = 2.1M draws
    assert big.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    scales = torch.cat([m.weight for m in disc.modules() if isinstance(m, nn.BatchNorm2d)])  # 896 draws
    assert scales.mean().item() == pytest.approx(1.0, abs=0.004)
    assert scales.std().item() == pytest.approx(0.02, rel=0.1)
    biases = [m.bias for m in disc.modules() if getattr(m, "bias", None) is not None]
    assert len(biases) == 5 and all(torch.count_nonzero(b) == 0 for b in biases)


def test_actnorm_data_dependent_init() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=8, use_actnorm=True)).train()
    norms = [m for m in disc.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 3 and not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    outputs: list[torch.Tensor] = []
    hooks = [n.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone())) for n in norms]
    first = torch.randn(4, 1, 64, 64) * 3 + 1
    disc(first)
    for out in outputs:  # (B, C, H, W)
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), rtol=0, atol=1e-4)
        std = out.permute(1, 0, 2, 3).flatten(1).std(dim=1, unbiased=False)
        torch.testing.assert_close(std, torch.ones(out.shape[1]), rtol=0, atol=1e-3)
    assert all(n.initialized.item() == 1 for n in norms)
    # Later batches do not re-initialise.
    loc = norms[0].loc.detach().clone()
    disc(torch.randn(4, 1, 64, 64))
    torch.testing.assert_close(norms[0].loc, loc, rtol=0, atol=0)
    for hook in hooks:
        hook.remove()
    assert "main.3.initialized" in disc.state_dict()


def test_actnorm_waits_for_a_training_batch() -> None:
    norm = ActNorm(3).eval()
    x = torch.randn(2, 3, 4, 4) + 5
    torch.testing.assert_close(norm(x), x)
    assert norm.initialized.item() == 0


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="discriminator.ndf"):
        DiscriminatorConfig(ndf=0)
    with pytest.raises(ConfigError, match="discriminator preset"):
        discriminator_preset("huge")
