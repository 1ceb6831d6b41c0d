"""AutoencoderKL: architecture, CompVis names, determinism, and equivalence with diffusers."""

from __future__ import annotations

import pytest
import torch

from torch.utils.checkpoint import checkpoint

import radiodiff.models.autoencoder as autoencoder_module
from radiodiff.config import AutoencoderConfig, ConfigError, VaeGanLossConfig, autoencoder_preset
from radiodiff.models.autoencoder import AutoencoderKL, DiagonalGaussian, VaeGanGenerator, build_vae_gan_generator

REFERENCE_PARAMETERS = 55_307_453


def _compvis_keys(cfg: AutoencoderConfig) -> set[str]:
    """The latent-diffusion checkpoint layout, written out from its rules (no model involved)."""
    keys: set[str] = set()

    def res(prefix: str, cin: int, cout: int) -> None:
        for p in ("norm1", "conv1", "norm2", "conv2") + (("nin_shortcut",) if cin != cout else ()):
            keys.update({f"{prefix}.{p}.weight", f"{prefix}.{p}.bias"})

    def conv(prefix: str) -> None:
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    widths = [cfg.ch * m for m in cfg.ch_mult]
    last = len(widths) - 1
    conv("encoder.conv_in")
    cin = cfg.ch
    for i, w in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", cin, w)
            cin = w
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv")
    for side in ("encoder", "decoder"):
        res(f"{side}.mid.block_1", widths[-1], widths[-1])
        res(f"{side}.mid.block_2", widths[-1], widths[-1])
        for p in ("norm", "q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{p}")
        for p in ("conv_in", "norm_out", "conv_out"):
            conv(f"{side}.{p}")
    cin = widths[-1]
    for i in reversed(range(len(widths))):
        for j in range(cfg.num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv")
    conv("quant_conv")
    conv("post_quant_conv")
    return keys


def test_reference_parameter_count_and_layout() -> None:
    cfg = autoencoder_preset("reference")
    model = AutoencoderKL(cfg)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMETERS
    state = model.state_dict()
    assert set(state) == _compvis_keys(cfg)
    assert state["encoder.down.0.block.1.norm1.weight"].shape == (128,)
    assert state["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert state["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert state["decoder.up.2.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert state["quant_conv.weight"].shape == (6, 6, 1, 1)
    assert state["post_quant_conv.weight"].shape == (3, 3, 1, 1)
    assert state["decoder.conv_out.weight"].shape == (1, 128, 3, 3)


def test_compvis_state_dict_loads_strictly() -> None:
    cfg = autoencoder_preset("tiny")
    target = AutoencoderKL(cfg)
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    foreign = {k: torch.randn(shapes[k], generator=gen) for k in sorted(_compvis_keys(cfg))}
    target.load_state_dict(foreign, strict=True)
    torch.testing.assert_close(target.encoder.mid.attn_1.k.weight, foreign["encoder.mid.attn_1.k.weight"])
    torch.testing.assert_close(target.decoder.up[1].upsample.conv.bias, foreign["decoder.up.1.upsample.conv.bias"])


def test_generator_wrapper_keeps_bare_autoencoder_state_dict() -> None:
    cfg = autoencoder_preset("tiny")
    gen = build_vae_gan_generator(cfg, VaeGanLossConfig(logvar_init=0.5))
    assert gen.logvar.shape == (1,) and gen.logvar.requires_grad and gen.logvar.item() == 0.5
    assert "logvar" in dict(gen.named_parameters())
    bare = gen.autoencoder_state_dict()
    assert "logvar" not in bare and set(bare) == _compvis_keys(cfg)
    AutoencoderKL(cfg).load_state_dict(bare, strict=True)
    frozen = build_vae_gan_generator(cfg, VaeGanLossConfig(learn_logvar=False))
    assert not frozen.logvar.requires_grad


@pytest.mark.parametrize(("size", "latent"), [(256, 64), (64, 16)])
def test_tiny_shapes(size: int, latent: int) -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(autoencoder_preset("tiny")).eval()
    x = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        recon = model.decode(posterior.mode())
    assert posterior.mean.shape == posterior.logvar.shape == (2, 3, latent, latent)
    assert recon.shape == x.shape


def test_sampling_is_deterministic_with_a_generator() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(autoencoder_preset("tiny")).eval()
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        a, _ = model(x, generator=torch.Generator().manual_seed(7))
        b, _ = model(x, generator=torch.Generator().manual_seed(7))
        c, _ = model(x, generator=torch.Generator().manual_seed(8))
        mode, posterior = model(x, sample_posterior=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(mode, model.decode(posterior.mean))


def test_posterior_sample_and_clamp() -> None:
    moments = torch.tensor([1.0, -2.0, 25.0, -40.0]).view(1, 4, 1, 1)  # mean (1, -2), logvar (25, -40)
    posterior = DiagonalGaussian(moments)
    torch.testing.assert_close(posterior.logvar.flatten(), torch.tensor([20.0, -30.0]))
    torch.testing.assert_close(posterior.std.flatten(), torch.exp(torch.tensor([10.0, -15.0])))
    noise = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    sample = posterior.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, posterior.mean + posterior.std * noise)
    torch.testing.assert_close(posterior.mode(), posterior.mean)


def test_decode_features_feed_the_last_layer() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(autoencoder_preset("tiny"))
    z = torch.randn(1, 3, 8, 8)
    recon, feats = model.decode(z, return_features=True)
    assert model.last_layer is model.decoder.conv_out
    assert feats.shape == (1, 32, 32, 32)
    torch.testing.assert_close(model.last_layer(feats), recon)
    x = torch.rand(1, 1, 32, 32)
    wrapper = VaeGanGenerator(model)
    recon_x, posterior, feats_x = wrapper(x, sample_posterior=False, return_features=True)
    torch.testing.assert_close(recon_x, model.decode(posterior.mean))
    torch.testing.assert_close(model.last_layer(feats_x), recon_x)


def test_grad_checkpointing_gives_same_outputs_and_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(autoencoder_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    plain = AutoencoderKL(autoencoder_preset("tiny"))
    cfg = autoencoder_preset("tiny")
    cfg.grad_checkpointing = True
    ckpt = AutoencoderKL(cfg)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    outs = []
    for model in (plain, ckpt):
        recon, posterior = model(x, generator=torch.Generator().manual_seed(1))
        (recon.square().mean() + posterior.kl().mean()).backward()
        outs.append((recon, model.encoder.down[0].block[0].conv1.weight.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    # Every res and attention block, encoder (3 + 3 mid) and decoder (6 + 3 mid), once each.
    assert calls == [False] * 15


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="autoencoder.norm_groups"):
        AutoencoderConfig(ch=48)
    with pytest.raises(ConfigError, match="autoencoder.ch_mult"):
        AutoencoderConfig(ch_mult=[])
    with pytest.raises(ConfigError, match="autoencoder preset"):
        autoencoder_preset("huge")
    assert autoencoder_preset("tiny").downsample_factor == 4


def test_matches_diffusers_autoencoder_kl() -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) is needed for the equivalence check")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = autoencoder_preset("reference")
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).eval()
    down = ["DownEncoderBlock2D"] * len(cfg.ch_mult)
    up = ["UpDecoderBlock2D"] * len(cfg.ch_mult)
    theirs = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
    ).eval()
    # The prefix is how an LDM checkpoint stores its first stage.
    ldm = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ldm, {"down_block_types": down, "up_block_types": up})
    assert len(converted) == len(ldm)
    theirs.load_state_dict(converted, strict=True)

    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode(x)
        dist = theirs.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, dist.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(posterior.logvar, dist.logvar, rtol=1e-4, atol=1e-4)
        z = posterior.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-4, atol=1e-4)


def test_attn_resolutions_add_level_attention() -> None:
    cfg = AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=32, attn_resolutions=[16])
    model = AutoencoderKL(cfg)
    state = model.state_dict()
    # Level 1 works at 16x16 for a 32 input: one attention per res block there.
    assert "encoder.down.1.attn.0.q.weight" in state and "encoder.down.0.attn.0.q.weight" not in state
    assert {"decoder.up.1.attn.0.q.weight", "decoder.up.1.attn.1.proj_out.bias"} <= set(state)
    assert "decoder.up.2.attn.0.q.weight" not in state
    recon, _ = model(torch.rand(1, 1, 32, 32), sample_posterior=False)
    assert recon.shape == (1, 1, 32, 32)
