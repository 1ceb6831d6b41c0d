"""The `models` benchmark of tools/bench.py: forward+backward time per image of the two training steps.

    python tools/bench.py models [--presets tiny,reference --image-size 256 --batch 4 --iters 5
                                  --warmup 2 --device auto|cpu|cuda --threads N]

stage 1 (vae-gan): one VAE-GAN step with the GAN terms on. Generator pass: autoencoder forward
    (sampled posterior), LPIPS (random VGG16 backbone: the pretrained one costs the same),
    reconstruction + NLL + KL loss, discriminator on the reconstruction (generator loss), the
    adaptive discriminator weight (two autograd.grad calls to the decoder's last layer), backward.
    Discriminator pass: real and detached reconstruction, hinge loss, backward.
stage 2 (ldm): one latent-diffusion step on a given noisy latent (3 x size/4 x size/4; condition
    3 x size x size): U-Net with its condition encoder forward, constant-SDE loss, backward. The
    frozen autoencoder's encode of the target is not included.
Neither includes the optimizer step. Every configuration (stage, preset, precision, memory format)
gets freshly built models from seed 0 and runs in this one process, so ratios compare like with like.
GFLOPs are those torch.utils.flop_counter.FlopCounterMode counts (convolutions, matmuls, attention;
not norms or element-wise ops) on the first, untimed, iteration of each configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

STAGES = ("vae-gan", "ldm")
PRECISIONS = ("fp32", "bf16")
LATENT_FACTOR = 4  # the autoencoder's downsampling factor (both presets); the U-Net's latent size
SIZE_MULTIPLE = 32  # the condition encoder's coarsest stride; the U-Net needs latent % 8 == 0 too

# Dense (no 2:4 sparsity) peak TFLOP/s as (bf16 tensor core, fp32 CUDA core), from NVIDIA's data
# sheets: H100 SXM5 989 / 67, H100 PCIe 756 / 51, H200 SXM 989 / 67, A100 (SXM and PCIe) 312 / 19.5.
# Matched by substring of torch.cuda.get_device_name(); the first match wins. cuDNN runs fp32
# convolutions as TF32 by default (torch.backends.cudnn.allow_tf32), so fp32 MFU can exceed 1.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


@dataclass(frozen=True)
class ModelPreset:
    autoencoder: str
    discriminator: str
    unet: str
    condition: str


MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(autoencoder="tiny", discriminator="tiny", unet="tiny", condition="tiny"),
    "reference": ModelPreset(autoencoder="reference", discriminator="reference", unet="reference", condition="swin_b"),
}


@dataclass(frozen=True)
class ModelBenchOptions:
    presets: tuple[str, ...] = ("tiny", "reference")
    image_size: int = 256
    batch: int = 4
    iters: int = 5
    warmup: int = 2  # untimed iterations; the first is the FLOP count, so at least one runs
    device: str = "auto"  # auto | cpu | cuda
    stages: tuple[str, ...] = STAGES
    precisions: tuple[str, ...] = PRECISIONS
    channels_last: tuple[bool, ...] = (False, True)
    threads: Optional[int] = None  # CPU threads (torch.set_num_threads); None keeps torch's

    def __post_init__(self) -> None:
        _check_subset("--presets", self.presets, tuple(MODEL_PRESETS))
        _check_subset("--stages", self.stages, STAGES)
        _check_subset("--precisions", self.precisions, PRECISIONS)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device={self.device!r}: expected auto, cpu or cuda")
        if self.image_size <= 0 or self.image_size % SIZE_MULTIPLE:
            raise ValueError(f"--image-size={self.image_size}: must be a positive multiple of {SIZE_MULTIPLE}")
        for name in ("batch", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class TrainStep:
    """One training step's computation, and the modules it runs (for inspection by tests)."""

    run: Callable[[], None]
    modules: tuple[nn.Module, ...]


@dataclass(frozen=True)
class FlopCount:
    total: int
    by_module: dict[str, int]  # FlopCounterMode's module names, e.g. "VaeGanGenerator.autoencoder.encoder.conv_in"


@dataclass(frozen=True)
class BenchRow:
    stage: str
    preset: str
    precision: str
    channels_last: bool
    ms_per_image: float
    images_per_s: float
    gflops_per_image: float
    tflops_per_s: float  # achieved
    mfu: Optional[float]  # CUDA with a known peak only
    peak_mem_gib: Optional[float]  # CUDA only
    flops: FlopCount  # per batch, not per image


def _check_subset(flag: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{flag}={','.join(values)}: expected a non-empty subset of {','.join(allowed)}")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def _autocast(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _place(modules: tuple[nn.Module, ...], device: torch.device, channels_last: bool) -> None:
    """Move to ``device`` in training mode; with ``channels_last``, convolution weights only.

    ``module.to(memory_format=...)`` would also restride every other 4-d parameter, among them the
    U-Net frequency filter's (C, H, W, 2) weight, which view_as_complex then rejects.
    """
    for module in modules:
        module.to(device=device).train()
        for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
            conv.to(memory_format=_memory_format(channels_last))


def _image(batch: int, channels: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.rand(batch, channels, size, size, device=device) * 2 - 1  # (B, C, H, W) in [-1, 1]
    return x.contiguous(memory_format=_memory_format(channels_last))


def build_vae_gan_step(
    preset: ModelPreset, image_size: int, batch: int, device: torch.device, precision: str, channels_last: bool
) -> TrainStep:
    """Stage 1: generator pass (with the adaptive weight) and discriminator pass, GAN terms on."""
    from radiodiff.config import PerceptualConfig, VaeGanLossConfig, autoencoder_preset, discriminator_preset
    from radiodiff.losses import vae_gan as L
    from radiodiff.losses.perceptual import build_perceptual
    from radiodiff.models.autoencoder import build_vae_gan_generator
    from radiodiff.models.discriminator import build_discriminator

    loss_cfg = VaeGanLossConfig()
    generator = build_vae_gan_generator(autoencoder_preset(preset.autoencoder), loss_cfg)
    disc = build_discriminator(discriminator_preset(preset.discriminator))
    perceptual = build_perceptual(PerceptualConfig(pretrained=False))
    modules = (generator, disc, perceptual)
    _place(modules, device, channels_last)
    x = _image(batch, generator.autoencoder.cfg.in_channels, image_size, device, channels_last)
    autocast = _autocast(device, precision)

    def run() -> None:
        generator.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        # Frozen for the generator pass: gradients it got there would be thrown away.
        disc.requires_grad_(False)
        with autocast():
            recon, posterior = generator(x)  # (B, 1, H, W)
            rec = L.reconstruction_loss(x, recon, perceptual(x, recon), loss_cfg.perceptual_weight)
            nll = L.nll_loss(rec, generator.logvar)
            g_loss = L.generator_loss(disc(recon))
        d_weight = L.adaptive_disc_weight(nll, g_loss, generator.autoencoder.last_layer.weight, loss_cfg.disc_weight)
        total, _ = L.autoencoder_loss(
            nll, L.kl_loss(posterior), g_loss, kl_weight=loss_cfg.kl_weight, d_weight=d_weight, disc_factor=1.0
        )
        total.backward()
        disc.requires_grad_(True)
        with autocast():
            logits_real, logits_fake = disc(x), disc(recon.detach())
        L.discriminator_loss(logits_real, logits_fake, loss_cfg.disc_loss, 1.0).backward()

    return TrainStep(run, modules)


def build_ldm_step(
    preset: ModelPreset, image_size: int, batch: int, device: torch.device, precision: str, channels_last: bool
) -> TrainStep:
    """Stage 2: U-Net + condition encoder on a fixed noisy latent; the VAE encode is left out."""
    from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS, DiffusionConfig, autoencoder_preset
    from radiodiff.diffusion.loss import constant_sde_loss
    from radiodiff.diffusion.process import forward_sample, sample_time, targets
    from radiodiff.models.unet import build_unet

    latent_size = image_size // LATENT_FACTOR
    unet_cfg = dataclasses.replace(copy.deepcopy(UNET_PRESETS[preset.unet]), latent_size=latent_size)
    diffusion = DiffusionConfig()
    unet = build_unet(unet_cfg, copy.deepcopy(CONDITION_PRESETS[preset.condition]))
    _place((unet,), device, channels_last)
    # Values do not change the cost; scaled as the autoencoder's latents would be.
    scale = autoencoder_preset(preset.autoencoder).scaling_factor
    z0 = scale * _image(batch, unet_cfg.latent_channels, latent_size, device, channels_last)  # (B, 3, h, w)
    noise = torch.randn_like(z0)
    t = sample_time(batch, diffusion.eps, device=device)  # (B,)
    z_t = forward_sample(z0, t, noise)  # (B, 3, h, w)
    c, eps = targets(z0, noise)
    cond = _image(batch, 3, image_size, device, channels_last)  # (B, 3, H, W)
    autocast = _autocast(device, precision)

    def run() -> None:
        unet.zero_grad(set_to_none=True)
        with autocast():
            c_hat, eps_hat = unet(z_t, t, cond)
        loss, _ = constant_sde_loss(c_hat, eps_hat, c, eps, t, diffusion.weighting)
        loss.backward()

    return TrainStep(run, (unet,))


STEP_BUILDERS = {"vae-gan": build_vae_gan_step, "ldm": build_ldm_step}


def count_flops(step: Callable[[], None]) -> FlopCount:
    """FLOPs of one call of ``step`` (forward and backward), in total and per module."""
    with FlopCounterMode(display=False) as counter:
        step()
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return FlopCount(counter.get_total_flops(), by_module)


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the clock would stop before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per call, averaged over ``iters`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_case(
    stage: str, preset: str, precision: str, channels_last: bool, opts: ModelBenchOptions, device: torch.device
) -> BenchRow:
    torch.manual_seed(0)
    step = STEP_BUILDERS[stage](MODEL_PRESETS[preset], opts.image_size, opts.batch, device, precision, channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_flops(step.run)  # doubles as the first warm-up iteration
    for _ in range(opts.warmup - 1):
        step.run()
    seconds = time_step(step.run, opts.iters, device)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    achieved = flops.total / seconds / 1e12
    peak = peak_tflops(device, precision)
    return BenchRow(
        stage=stage, preset=preset, precision=precision, channels_last=channels_last,
        ms_per_image=seconds / opts.batch * 1e3, images_per_s=opts.batch / seconds,
        gflops_per_image=flops.total / opts.batch / 1e9, tflops_per_s=achieved,
        mfu=achieved / peak if peak else None, peak_mem_gib=peak_mem, flops=flops,
    )


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_model_bench(opts: ModelBenchOptions) -> tuple[torch.device, list[BenchRow]]:
    device = resolve_device(opts.device)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    rows = []
    for preset in opts.presets:
        for stage in opts.stages:
            for precision in opts.precisions:
                for channels_last in opts.channels_last:
                    rows.append(bench_case(stage, preset, precision, channels_last, opts, device))
                    _release(device)
    return device, rows


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    return f"cpu, torch threads {torch.get_num_threads()} of {os.cpu_count()} cores"


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'stage':8s} {'preset':9s} {'prec':4s} {'ch_last':7s} {'ms/img':>9s} {'img/s':>8s} "
            f"{'GFLOP/img':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s}")
    lines = [head]
    for r in rows:
        mfu = f"{r.mfu:6.1%}" if r.mfu is not None else f"{'-':>6s}"
        mem = f"{r.peak_mem_gib:8.2f}" if r.peak_mem_gib is not None else f"{'-':>8s}"
        lines.append(f"{r.stage:8s} {r.preset:9s} {r.precision:4s} {'on' if r.channels_last else 'off':7s} "
                     f"{r.ms_per_image:9.2f} {r.images_per_s:8.2f} {r.gflops_per_image:9.2f} "
                     f"{r.tflops_per_s:8.4f} {mfu} {mem}")
    return "\n".join(lines)


def speedups(rows: list[BenchRow]) -> list[tuple[str, float]]:
    """Speed-ups (baseline time / time) between configurations that differ in one factor."""
    times = {(r.stage, r.preset, r.precision, r.channels_last): r.ms_per_image for r in rows}
    groups = dict.fromkeys((r.stage, r.preset) for r in rows)
    layouts = sorted({r.channels_last for r in rows})
    out = []
    for stage, preset in groups:
        for layout in layouts:
            fp32, bf16 = times.get((stage, preset, "fp32", layout)), times.get((stage, preset, "bf16", layout))
            if fp32 and bf16:
                out.append((f"{stage} {preset}: bf16 over fp32, channels_last {'on' if layout else 'off'}", fp32 / bf16))
        for precision in PRECISIONS:
            off, on = times.get((stage, preset, precision, False)), times.get((stage, preset, precision, True))
            if off and on:
                out.append((f"{stage} {preset}: channels_last on over off, {precision}", off / on))
    return out


def format_report(opts: ModelBenchOptions, device: torch.device, rows: list[BenchRow]) -> str:
    header = (f"model fwd+bwd benchmark: image {opts.image_size} (latent {opts.image_size // LATENT_FACTOR}), "
              f"batch {opts.batch}, {opts.iters} timed iters after {max(opts.warmup, 1)} warm-up, "
              f"torch {torch.__version__}\ndevice: {describe_device(device)}\n"
              "vae-gan: AE + LPIPS + NLL/KL + disc generator loss + adaptive weight + backward, then the "
              "disc hinge step; ldm: U-Net + condition encoder + constant-SDE loss + backward (VAE encode "
              "excluded). No optimizer step.")
    ratios = "\n".join(f"  {label:55s} {value:5.2f}x" for label, value in speedups(rows))
    return f"{header}\n{format_table(rows)}\nspeed-ups (time of the baseline / time; > 1 is faster):\n{ratios}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny,reference", help="comma list of tiny, reference")
    parser.add_argument("--image-size", type=int, default=256, help="multiple of 32; 64/128 for quick CPU runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations (the first counts FLOPs)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--channels-last", default="off,on", help="comma list of off, on")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads; default: torch's")


def options_from_args(args: argparse.Namespace) -> ModelBenchOptions:
    def split(text: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in text.split(",") if v.strip())

    layouts = split(args.channels_last)
    _check_subset("--channels-last", layouts, ("off", "on"))
    return ModelBenchOptions(
        presets=split(args.presets), image_size=args.image_size, batch=args.batch, iters=args.iters,
        warmup=args.warmup, device=args.device, stages=split(args.stages), precisions=split(args.precisions),
        channels_last=tuple(v == "on" for v in layouts), threads=args.threads,
    )


def bench_models(args: argparse.Namespace) -> None:
    opts = options_from_args(args)
    device, rows = run_model_bench(opts)
    print("\n" + format_report(opts, device, rows))
