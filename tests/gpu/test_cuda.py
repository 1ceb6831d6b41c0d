"""Checks that only mean something on a GPU (`pytest -m gpu`, run by tools/gpu_check.sh); skipped
without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tiny_unet_trains_a_step_under_bf16_autocast_on_cuda() -> None:
    from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS
    from radiodiff.models.unet import build_unet
    from radiodiff.precision import autocast

    device = torch.device("cuda")
    unet = build_unet(UNET_PRESETS["tiny"], CONDITION_PRESETS["tiny"]).to(device)
    z, t = torch.randn(2, 3, 16, 16, device=device), torch.rand(2, device=device) * 0.9 + 0.05
    cond = torch.rand(2, 3, 64, 64, device=device) * 2 - 1
    with autocast(device, "autocast"):
        c_hat, eps_hat = unet(z, t, cond)
    loss = (c_hat.float() ** 2).mean() + (eps_hat.float() ** 2).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


def test_peak_tflops_is_known_for_this_gpu() -> None:
    from radiodiff.train.telemetry import peak_tflops

    name = torch.cuda.get_device_name(0)
    if not any(key in name for key in ("H100", "H200", "A100", "L40S", "A10")):
        pytest.skip(f"no peak figure recorded for {name}; set train.peak_tflops")
    assert peak_tflops(torch.device("cuda", 0), None) > 100


def test_vae_gan_micro_batches_synchronise_only_where_the_ranks_agree(train_shards, tmp_path, world_of_one) -> None:
    """Under CUDA's sync debug mode "error", a whole update (two micro-batches, the second at the
    accumulation boundary) runs: the only host synchronisation is the agreement's one read, which
    ``steps.intended_sync`` marks. bf16 parameters: under autocast DeepSpeed reads the gradient norm
    on the host (see the README's performance section)."""
    from radiodiff.cli import compose
    from radiodiff.data.shards import ShardLoader
    from radiodiff.train.stages import build_vae_stage
    from radiodiff.train.steps import StepContext

    cfg = compose("train_vae", [f"run_dir={tmp_path}", f"data.shards={train_shards}", "model=tiny",
                                "data.num_workers=0", "train.global_batch=4", "train.micro_batch=2",
                                "deepspeed.precision=bf16", "perceptual.pretrained=false",
                                "loss.disc_start=0", "wandb.enabled=false"])
    stage = build_vae_stage(cfg, world_of_one)
    batches = iter(ShardLoader(cfg.data, "train", batch_size=2, rank=0, world_size=1, seed=0))

    def update(step: int) -> None:
        ctx = StepContext(step=step, device=world_of_one.device, precision="bf16")
        for _ in range(2):
            stage.step_fn(stage.models, next(batches), ctx)

    update(0)  # lazy initialisation (optimizer state, caches) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_profiler_records_cuda_kernels_of_the_window(tmp_path) -> None:
    import json

    from radiodiff.dist import DistInfo
    from radiodiff.train.profiling import StepProfiler

    device = torch.device("cuda", 0)
    profiler = StepProfiler([1, 1], tmp_path, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    profiler.update_started(1)
    x = torch.randn(512, 512, device=device)
    (x @ x).sum()
    path = profiler.update_done(1)
    events = json.loads(path.read_text())["traceEvents"]
    assert path == tmp_path / "profile" / "rank0_steps1-1.json"
    assert any(e.get("cat") == "kernel" for e in events) and any(e.get("name") == "update 1" for e in events)


@pytest.mark.parametrize("stage", ["vae-gan", "ldm"])
def test_compiled_channels_last_updates_match_eager_on_cuda(world_of_one, stage: str) -> None:
    """train.compile + train.channels_last on CUDA (inductor's Triton kernels, cuDNN's NHWC
    convolutions): two bf16-autocast updates of the tiny models agree with eager contiguous ones
    within bf16 rounding (2e-2 relative on every loss term)."""
    from radiodiff.train.acceleration import compile_regions, restride_frozen
    from radiodiff.train.steps import StepContext, VaeGanModels, ldm_step, vae_gan_step

    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "unit" / "test_acceleration.py"
    spec = importlib.util.spec_from_file_location("acceleration_cases", path)
    cases = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cases
    spec.loader.exec_module(cases)

    device = world_of_one.device
    runs = []
    for fast in (False, True):
        models = cases._vae_gan(False) if stage == "vae-gan" else cases._ldm(False)
        engines = cases._engines(models)
        if fast:
            for engine in engines:
                compile_regions(engine.module)
            if stage == "ldm":
                compile_regions(restride_frozen(models.vae, True))
        if stage == "ldm":
            models.vae.to(device)
        step_fn = vae_gan_step if isinstance(models, VaeGanModels) else ldm_step
        out = []
        for step in range(2):
            ctx = StepContext(step=step, device=device, precision="autocast", channels_last=fast)
            out.append({k: float(v) for k, v in step_fn(models, cases._batch(step), ctx).items()})
        runs.append(out)
        for engine in engines:
            engine.destroy()
    for eager, fast in zip(*runs):
        for key in eager:
            assert fast[key] == pytest.approx(eager[key], rel=2e-2, abs=1e-4), key


@pytest.mark.parametrize("block", ["vae mid-block (one head of 512, 64x64 latent)", "unet bottleneck"])
def test_reference_attention_runs_on_a_fused_cuda_kernel(block: str) -> None:
    """Only the fused kernels allowed (flash, memory-efficient, cuDNN): the reference models' attention at
    their training shapes, bf16 autocast, forward and backward. The VAE's single 512-wide head decides
    whether a fused kernel covers it on this GPU and torch; without one its 4096^2 weights per map are
    materialised (README, Attention kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from radiodiff.config import UNET_PRESETS
    from radiodiff.models.blocks import AttnBlock
    from radiodiff.models.unet_blocks import SelfAttention
    from radiodiff.precision import autocast

    device = torch.device("cuda")
    if block.startswith("vae"):
        module, x = AttnBlock(512), torch.randn(2, 512, 64, 64)
    else:
        cfg = UNET_PRESETS["reference"]
        width = cfg.dim * cfg.dim_mults[-1]
        module, x = SelfAttention(width, cfg.attn_heads, cfg.attn_dim_head, 32), torch.randn(2, width, 8, 8)
    module, x = module.to(device), x.to(device).requires_grad_()
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused), autocast(device, "autocast"):
        module(x).float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
