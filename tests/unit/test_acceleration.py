"""train.compile and train.channels_last: the real step functions on DeepSpeed engines, compiled or
restrided, against the same steps eager and contiguous, for both stages.

Tolerances: fp32 on a CPU. Inductor fuses and reorders reductions (GroupNorm, softmax, the losses'
means), so results agree to rounding, not bitwise: the first update's losses within 1e-5 relative
and every gradient it computes (each backward, and the adaptive weight's), as one vector per
engine, within 1e-4 relative; the second update's losses (after an AdamW step) within 1e-3.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch

from radiodiff.config import (
    CONDITION_PRESETS,
    UNET_PRESETS,
    DeepSpeedConfig,
    DiffusionConfig,
    TrainConfig,
    VaeGanLossConfig,
    autoencoder_preset,
    discriminator_preset,
)
from radiodiff.diffusion.latent_scale import LatentScale
from radiodiff.models.autoencoder import AutoencoderKL, build_vae_gan_generator
from radiodiff.models.discriminator import build_discriminator
from radiodiff.models.unet import build_unet
from radiodiff.train.acceleration import REGIONS, compile_regions, restride_frozen
from radiodiff.train.engines import build_engine
from radiodiff.train.steps import LdmModels, StepContext, VaeGanModels, ldm_step, vae_gan_step

SIZE = 32  # image size: the smallest the condition encoder takes (latent 8)
BATCH = 2
LR = 1e-3
LOSS_RTOL = 1e-5
# Whole steps compile with aot_eager: dynamo's capture, guards and graph breaks and AOTAutograd's
# forward/backward split, exactly as under inductor, without its C++ code generation (which for
# every block shape of both stages costs over ten minutes on 2 cores). Inductor's kernels are
# compared block by block below, and for whole steps on CUDA in tests/gpu.
STEP_BACKEND = "aot_eager"
GRAD_RTOL = 1e-4


def _engine(module: torch.nn.Module):
    train = TrainConfig(micro_batch=BATCH, global_batch=BATCH, lr=LR, min_lr=LR)
    return build_engine(module, train, DeepSpeedConfig(precision="fp32"), world_size=1)


def _batch(seed: int, channels_last: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"target": torch.rand(BATCH, 1, SIZE, SIZE, generator=g) * 2 - 1,
            "cond": torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1,
            "pos": torch.arange(BATCH)}


def _vae_gan(compiled: bool) -> VaeGanModels:
    torch.manual_seed(0)
    loss = VaeGanLossConfig(disc_start=0, perceptual_weight=0.0)  # the GAN terms and adaptive weight on
    ae = dataclasses.replace(autoencoder_preset("tiny"), resolution=SIZE)
    generator, discriminator = build_vae_gan_generator(ae, loss), build_discriminator(discriminator_preset("tiny"))
    if compiled:
        assert compile_regions(generator, STEP_BACKEND) > 0 and compile_regions(discriminator, STEP_BACKEND) == 1
    return VaeGanModels(_engine(generator), _engine(discriminator), None, loss)


def _ldm(compiled: bool) -> LdmModels:
    torch.manual_seed(0)
    ae = dataclasses.replace(autoencoder_preset("tiny"), resolution=SIZE)
    vae = AutoencoderKL(ae).requires_grad_(False).eval()
    # The tiny U-Net with one width and one Swin block per stage: every block class, fewer shapes
    # to compile (each shape is compiled anew: minutes on a CPU for the full tiny preset).
    unet_cfg = dataclasses.replace(copy.deepcopy(UNET_PRESETS["tiny"]), latent_size=SIZE // ae.downsample_factor,
                                   dim_mults=[1, 1, 1, 1])
    cond_cfg = dataclasses.replace(copy.deepcopy(CONDITION_PRESETS["tiny"]), depths=[1, 1, 1, 1])
    unet = build_unet(unet_cfg, cond_cfg)
    if compiled:
        assert compile_regions(unet, STEP_BACKEND) > 0 and compile_regions(vae, STEP_BACKEND) > 0
    return LdmModels(_engine(unet), vae, LatentScale(0.3), DiffusionConfig())


def _two_updates(step_fn, models, engines, channels_last: bool = False):
    """The metrics of two updates, and every gradient computed for a parameter in the first."""
    grads: dict[str, list[torch.Tensor]] = {}
    hooks = [p.register_hook(lambda g, name=f"{i}.{n}": grads.setdefault(name, []).append(g.detach().clone()))
             for i, e in enumerate(engines) for n, p in e.module.named_parameters() if p.requires_grad]
    out = []
    for step in range(2):
        ctx = StepContext(step=step, device=torch.device("cpu"), precision="fp32", channels_last=channels_last)
        out.append({k: float(v) for k, v in step_fn(models, _batch(step), ctx).items()})
        for hook in hooks if step == 0 else ():
            hook.remove()
    return out, grads


def _assert_close(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    # The first update's losses come from the same weights; the second's from weights after one
    # AdamW update, whose first step moves a parameter by about lr whatever its gradient's size, so
    # a gradient near zero that differs in its last digits moves it differently: a looser bound.
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=LOSS_RTOL if step == 0 else 1e-3, abs=1e-7), \
                f"update {step + 1}: {key}"


def _assert_grads_close(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> None:
    """Each engine's gradients as one vector: relative L2 error within GRAD_RTOL, and no element off by
    more than GRAD_RTOL of the largest. (Per tensor would not do: gradients that are near zero by
    construction, a conv bias before a normalisation, are rounding noise of 1e-6 in both.)"""
    assert a.keys() == b.keys() and len(a) > 10
    assert all(len(a[name]) == len(b[name]) for name in a)
    for engine in {name.split(".")[0] for name in a}:
        names = [name for name in a if name.split(".")[0] == engine]
        x = torch.cat([g.flatten() for name in names for g in a[name]])
        y = torch.cat([g.flatten() for name in names for g in b[name]])
        assert float((x - y).norm()) <= GRAD_RTOL * float(x.norm()), f"engine {engine}"
        assert float((x - y).abs().max()) <= GRAD_RTOL * float(x.abs().max()), f"engine {engine}"


def _engines(models) -> list:
    return [models.generator, models.discriminator] if isinstance(models, VaeGanModels) else [models.engine]


def _compare_variants(stage: str, variant, *, compile_when_on: bool = False) -> None:
    """The stage's two updates with ``variant(models, on)`` applied off, then on (and the models
    compiled when on, if ``compile_when_on``): the same losses and gradients."""
    build, step_fn = (_vae_gan, vae_gan_step) if stage == "vae-gan" else (_ldm, ldm_step)
    runs = []
    for on in (False, True):
        models = build(compile_when_on and on)
        channels_last = variant(models, on)
        runs.append(_two_updates(step_fn, models, _engines(models), channels_last))
        for engine in _engines(models):
            engine.destroy()
    (off_metrics, off_grads), (on_metrics, on_grads) = runs
    _assert_close(off_metrics, on_metrics)
    _assert_grads_close(off_grads, on_grads)


def compiled(models, on: bool) -> bool:
    names = [n for e in _engines(models) for n in e.module.state_dict()]
    assert not any("_orig_mod" in n for n in names)  # in place: checkpoints keep their names
    return False


def channels_last(models, on: bool) -> bool:
    if isinstance(models, LdmModels):
        restride_frozen(models.vae, on)
        assert models.vae.encoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last) == on
    return on


@pytest.mark.parametrize("stage", ["vae-gan", "ldm"])
def test_compiled_steps_match_eager(world_of_one, stage: str) -> None:
    _compare_variants(stage, compiled, compile_when_on=True)


@pytest.mark.parametrize("stage", ["vae-gan", "ldm"])
def test_channels_last_steps_match_contiguous(world_of_one, stage: str) -> None:
    _compare_variants(stage, channels_last)


def test_step_inputs_are_channels_last_on_request() -> None:
    x = torch.rand(2, 3, 8, 8)
    on = StepContext(step=0, device=torch.device("cpu"), precision="fp32", channels_last=True)
    off = StepContext(step=0, device=torch.device("cpu"), precision="fp32")
    assert on.to_device(x).is_contiguous(memory_format=torch.channels_last)
    assert not off.to_device(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on.to_device(x), x) and on.to_device(torch.arange(3)).shape == (3,)


def test_compile_regions_outermost_only_and_names_kept() -> None:
    unet = build_unet(UNET_PRESETS["tiny"], CONDITION_PRESETS["tiny"])
    names = list(unet.state_dict())
    count = compile_regions(unet)
    compiled = [n for n, m in unet.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert count == len(compiled) > 20 and list(unet.state_dict()) == names
    assert all(isinstance(unet.get_submodule(n), REGIONS) for n in compiled)
    assert not any(a != b and b.startswith(a + ".") for a in compiled for b in compiled)  # none nested
    discriminator = build_discriminator(discriminator_preset("tiny"))
    assert compile_regions(discriminator) == 1 and torch._dynamo.config.recompile_limit >= 64


def test_vae_stage_compiles_its_blocks_and_restrides_lpips(train_shards, tmp_path, world_of_one) -> None:
    """The switches as training reads them: radiodiff-train-vae's stage under train.compile and
    train.channels_last (built, not run: the steps are compared above)."""
    from radiodiff.cli import compose
    from radiodiff.train.stages import build_vae_stage

    cfg = compose("train_vae", [f"run_dir={tmp_path}", f"data.shards={train_shards}", "model=tiny",
                                "perceptual.pretrained=false", "train.compile=true", "train.channels_last=true",
                                "wandb.enabled=false", "deepspeed.precision=fp32"])
    stage = build_vae_stage(cfg, world_of_one)
    generator, discriminator = (stage.engines[name].module for name in ("autoencoder", "discriminator"))
    blocks = [m for m in generator.modules() if isinstance(m, REGIONS)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert discriminator._compiled_call_impl is not None
    convs = [m for m in stage.models.perceptual.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    for engine in stage.engines.values():
        engine.destroy()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU kernels are C++: needs a compiler")
def test_inductor_blocks_match_eager_forward_and_backward() -> None:
    """Blocks the stages compile, under inductor (C++ kernels on a CPU): a res block (convs, group norms,
    the time modulation), a shifted Swin block (window attention, roll, mask) and the PatchGAN (batch
    norm's running statistics): outputs and input and weight gradients within 1e-5 of the largest.
    (Each compiled graph costs seconds of C++ compilation here: three kinds, not all seven.)"""
    from radiodiff.models.condition import SwinBlock
    from radiodiff.models.unet_blocks import ResBlock

    torch.manual_seed(0)
    cases = [
        (ResBlock(8, 8, time_dim=16, groups=4), (torch.randn(2, 8, 8, 8), torch.randn(2, 16))),
        (build_discriminator(discriminator_preset("tiny")), (torch.randn(2, 1, 32, 32),)),
        (SwinBlock(16, num_heads=2, window_size=4, mlp_ratio=2.0, shifted=True), (torch.randn(2, 8, 8, 16),)),
    ]
    for eager, inputs in cases:
        compiled = copy.deepcopy(eager)
        assert compile_regions(compiled) == 1
        results = []
        for module in (eager, compiled):
            xs = [x.clone().requires_grad_() for x in inputs]
            out = module(*xs)
            out.square().mean().backward()
            results.append([out.detach()] + [x.grad for x in xs] + [p.grad for p in module.parameters()])
        for a, b in zip(*results):
            assert float((a - b).abs().max()) <= 1e-5 * max(float(a.abs().max()), 1e-3), type(eager).__name__
