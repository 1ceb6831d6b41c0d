"""The `models` benchmark of tools/bench.py: time per image of the two real training steps.

    python tools/bench.py models [--presets tiny,reference --image-size 256 --batch 4 --iters 5
                                  --warmup 2 --device auto|cpu|cuda --threads N --compile off,on
                                  --stages vae-gan,ldm,vae-gan-ref]

Each configuration times the loop's own step function on its real models, built as
radiodiff/train/stages.py builds them, in the one-process DeepSpeed world of radiodiff.dist.setup().
vae-gan: vae_gan_step at loss.disc_start (GAN terms on): the autoencoder engine (sampled posterior),
    LPIPS (random VGG16 backbone; the pretrained one costs the same), the frozen discriminator's
    generator loss, the adaptive weight's small graph; then the discriminator engine on real and
    reconstructed maps. ldm: ldm_step: the frozen VAE's encode of the target (included), the U-Net
    engine with its condition encoder, the constant-SDE loss.
A step includes each engine's backward and optimizer step (DeepSpeed engine.step at accumulation 1;
ZeRO stage and AdamW as configs' defaults). bf16 is DeepSpeed precision "autocast" (fp32 master
weights, bf16 compute). channels_last: the inputs and the frozen modules' conv weights, as
train.channels_last (radiodiff/train/acceleration.py); compile: train.compile's regional compilation
(two more untimed iterations compile it). vae-gan-ref: the reference's formulation of the same
update (tools/bench_reference.py: fp32, eager, two autoencoder forwards, the adaptive weight through
the full graph), reported as the speed-up of each vae-gan configuration over it. Every
configuration gets fresh models and engines from seed 0 in this one process, so ratios compare like
with like. GFLOPs are those FlopCounterMode counts (convolutions, matmuls, attention; not norms,
element-wise ops or the optimizer) on each configuration's first, untimed, step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from radiodiff.train.acceleration import compile_regions, memory_format, restride_frozen

STAGES = ("vae-gan", "ldm")
REFERENCE_STAGE = "vae-gan-ref"  # the reference's VAE-GAN update (tools/bench_reference.py): fp32 eager only
DERIVED_STAGE = "ldm-derived"  # the ldm step with the opt-in model.unet.tx_los and tx_detour channels on
ALL_STAGES = STAGES + (REFERENCE_STAGE, DERIVED_STAGE)
PRECISIONS = ("fp32", "bf16")
# The table's precisions as DeepSpeedConfig.precision names: bf16 is autocast (fp32 master weights).
DEEPSPEED_PRECISION = {"fp32": "fp32", "bf16": "autocast"}
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
    compiled: tuple[bool, ...] = (False,)  # train.compile off / on (regional torch.compile)
    threads: Optional[int] = None  # CPU threads (torch.set_num_threads); None keeps torch's

    def __post_init__(self) -> None:
        _check_subset("--presets", self.presets, tuple(MODEL_PRESETS))
        _check_subset("--stages", self.stages, ALL_STAGES)
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
    """One real training step, ready to call, and what it runs (for inspection by tests)."""

    run: Callable[[], None]
    models: Any  # VaeGanModels | LdmModels
    engines: tuple[Any, ...]  # the DeepSpeed engines (destroyed after the configuration)


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
    compiled: bool
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
    """The device the DeepSpeed engines will train on: the GPU whenever torch sees one."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ValueError("--device=cuda but torch sees no CUDA device")
    if name == "cpu" and cuda:
        raise ValueError("--device=cpu but torch sees a CUDA device, which DeepSpeed's engines would train on; "
                         "hide it (CUDA_VISIBLE_DEVICES=) to bench the CPU")
    return torch.device("cuda" if cuda else "cpu")


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def _image(batch: int, channels: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.rand(batch, channels, size, size, device=device) * 2 - 1  # (B, C, H, W) in [-1, 1]
    return x.contiguous(memory_format=memory_format(channels_last))


def _batch(batch: int, size: int, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    """A training batch as the shard loader yields it; ``pos`` keys the per-sample noise draws."""
    return {"target": _image(batch, 1, size, device, channels_last),  # (B, 1, H, W)
            "cond": _image(batch, 3, size, device, channels_last),  # (B, 3, H, W)
            "pos": torch.arange(batch)}  # (B,)


def _engine(module: nn.Module, batch: int, precision: str) -> Any:
    """A DeepSpeed engine as training builds it, updating after every micro-batch (accumulation 1)."""
    from radiodiff.config import DeepSpeedConfig, TrainConfig
    from radiodiff.train.engines import build_engine

    return build_engine(module, TrainConfig(micro_batch=batch, global_batch=batch),
                        DeepSpeedConfig(precision=DEEPSPEED_PRECISION[precision]), world_size=1)


def _train_step(step_fn: Callable, models: Any, engines: tuple[Any, ...], batch: dict[str, torch.Tensor],
                step: int, device: torch.device, precision: str, channels_last: bool) -> TrainStep:
    from radiodiff.train.steps import StepContext

    def run() -> None:
        # A fresh context per update, as the loop makes one.
        step_fn(models, batch, StepContext(step=step, device=device, precision=DEEPSPEED_PRECISION[precision],
                                           channels_last=channels_last))

    return TrainStep(run, models, engines)


def build_vae_gan_step(
    preset: ModelPreset, image_size: int, batch: int, device: torch.device, precision: str, channels_last: bool,
    compiled: bool = False,
) -> TrainStep:
    """Stage 1: ``vae_gan_step`` with the GAN terms on (autoencoder and discriminator updates)."""
    from radiodiff.config import PerceptualConfig, VaeGanLossConfig, autoencoder_preset, discriminator_preset
    from radiodiff.losses.perceptual import LPIPSLoss
    from radiodiff.models.autoencoder import build_vae_gan_generator
    from radiodiff.models.discriminator import build_discriminator
    from radiodiff.train.steps import VaeGanModels, vae_gan_step

    loss = VaeGanLossConfig()
    generator = build_vae_gan_generator(autoencoder_preset(preset.autoencoder), loss)
    discriminator = build_discriminator(discriminator_preset(preset.discriminator))
    perceptual = restride_frozen(LPIPSLoss(PerceptualConfig(pretrained=False)), channels_last)
    if compiled:  # as radiodiff/train/stages.py does under train.compile
        compile_regions(generator), compile_regions(discriminator)
    models = VaeGanModels(_engine(generator, batch, precision), _engine(discriminator, batch, precision),
                          perceptual.to(device), loss)
    engines = (models.generator, models.discriminator)
    # disc_start is the first step with the GAN terms on (vae_gan.disc_factor).
    return _train_step(vae_gan_step, models, engines, _batch(batch, image_size, device, channels_last),
                       loss.disc_start, device, precision, channels_last)


def build_ldm_step(
    preset: ModelPreset, image_size: int, batch: int, device: torch.device, precision: str, channels_last: bool,
    compiled: bool = False, derived: bool = False,
) -> TrainStep:
    """Stage 2: ``ldm_step`` (the frozen VAE's encode, then the U-Net engine's update); ``derived``: with
    the line-of-sight and detour channels, computed from the condition in every forward."""
    from radiodiff.config import CONDITION_PRESETS, UNET_PRESETS, DiffusionConfig, autoencoder_preset
    from radiodiff.diffusion.latent_scale import LatentScale
    from radiodiff.models.autoencoder import AutoencoderKL
    from radiodiff.models.unet import build_unet
    from radiodiff.train.steps import LdmModels, ldm_step

    vae_cfg = autoencoder_preset(preset.autoencoder)
    latent_size = image_size // vae_cfg.downsample_factor
    unet_cfg = dataclasses.replace(copy.deepcopy(UNET_PRESETS[preset.unet]), latent_size=latent_size,
                                   tx_los=derived, tx_detour=derived)
    unet = build_unet(unet_cfg, copy.deepcopy(CONDITION_PRESETS[preset.condition]))
    vae = restride_frozen(AutoencoderKL(vae_cfg).requires_grad_(False).eval(), channels_last)  # as stage 2 has it
    if compiled:
        compile_regions(unet), compile_regions(vae)
    engine = _engine(unet, batch, precision)
    models = LdmModels(engine, vae.to(device), LatentScale(vae_cfg.scaling_factor), DiffusionConfig())
    return _train_step(ldm_step, models, (engine,), _batch(batch, image_size, device, channels_last),
                       0, device, precision, channels_last)


def build_reference_vae_gan_step(
    preset: ModelPreset, image_size: int, batch: int, device: torch.device, precision: str, channels_last: bool,
    compiled: bool = False,
) -> TrainStep:
    """The reference's VAE-GAN update (tools/bench_reference.py) on the same models: fp32, eager."""
    from bench_reference import reference_update  # a sibling: a script's own folder is on its import path

    from radiodiff.config import (PerceptualConfig, TrainConfig, VaeGanLossConfig, autoencoder_preset,
                                  discriminator_preset)
    from radiodiff.losses.perceptual import LPIPSLoss
    from radiodiff.models.autoencoder import build_vae_gan_generator
    from radiodiff.models.discriminator import build_discriminator

    assert precision == "fp32" and not channels_last and not compiled, "the reference step is fp32 eager contiguous"
    loss = VaeGanLossConfig()
    generator = build_vae_gan_generator(autoencoder_preset(preset.autoencoder), loss).to(device)
    discriminator = build_discriminator(discriminator_preset(preset.discriminator)).to(device)
    perceptual = LPIPSLoss(PerceptualConfig(pretrained=False)).to(device)
    train = TrainConfig()
    optimizers = tuple(torch.optim.AdamW(m.parameters(), lr=train.lr, betas=tuple(train.betas))
                       for m in (generator, discriminator))
    update = reference_update(generator, discriminator, perceptual, loss, optimizers)
    x = _batch(batch, image_size, device, False)["target"]
    return TrainStep(lambda: update(x), (generator, discriminator), ())


STEP_BUILDERS = {"vae-gan": build_vae_gan_step, "ldm": build_ldm_step, REFERENCE_STAGE: build_reference_vae_gan_step,
                 DERIVED_STAGE: functools.partial(build_ldm_step, derived=True)}


def count_flops(step: Callable[[], None]) -> FlopCount:
    """FLOPs of one call of ``step`` (forwards and backwards), in total and per module."""
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
    stage: str, preset: str, precision: str, channels_last: bool, opts: ModelBenchOptions, device: torch.device,
    compiled: bool = False,
) -> BenchRow:
    torch.manual_seed(0)
    step = STEP_BUILDERS[stage](MODEL_PRESETS[preset], opts.image_size, opts.batch, device, precision, channels_last,
                                compiled)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The count doubles as the first warm-up iteration; compiled blocks are counted run eagerly (the
    # counter cannot see into compiled code) and compiled by the next, untimed, iterations.
    with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
        flops = count_flops(step.run)
    for _ in range(opts.warmup - 1 + (2 if compiled else 0)):
        step.run()
    seconds = time_step(step.run, opts.iters, device)
    for engine in step.engines:
        engine.destroy()  # its optimizer's buffers, before the next configuration builds its own
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    achieved = flops.total / seconds / 1e12
    peak = peak_tflops(device, precision)
    return BenchRow(
        stage=stage, preset=preset, precision=precision, channels_last=channels_last, compiled=compiled,
        ms_per_image=seconds / opts.batch * 1e3, images_per_s=opts.batch / seconds,
        gflops_per_image=flops.total / opts.batch / 1e9, tflops_per_s=achieved,
        mfu=achieved / peak if peak else None, peak_mem_gib=peak_mem, flops=flops,
    )


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_model_bench(opts: ModelBenchOptions) -> tuple[torch.device, list[BenchRow]]:
    """Every configuration in the one-process DeepSpeed world (created here once, kept for the process)."""
    from radiodiff import dist

    device = resolve_device(opts.device)
    world = dist.setup()
    if world.world_size != 1:
        raise ValueError(f"a world of {world.world_size} processes: run the benchmark as one process, "
                         "not under torchrun")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    rows = []
    for preset in opts.presets:
        for stage in opts.stages:
            if stage == REFERENCE_STAGE:  # one configuration: fp32, eager, contiguous
                cases = [("fp32", False, False)]
            else:
                cases = [(p, cl, c) for p in opts.precisions for cl in opts.channels_last for c in opts.compiled]
            for precision, channels_last, compiled in cases:
                rows.append(bench_case(stage, preset, precision, channels_last, opts, device, compiled))
                _release(device)
    return device, rows


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    return f"cpu, torch threads {torch.get_num_threads()} of {os.cpu_count()} cores"


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'stage':11s} {'preset':9s} {'prec':4s} {'ch_last':7s} {'compile':7s} {'ms/img':>9s} {'img/s':>8s} "
            f"{'GFLOP/img':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s}")
    lines = [head]
    for r in rows:
        mfu = f"{r.mfu:6.1%}" if r.mfu is not None else f"{'-':>6s}"
        mem = f"{r.peak_mem_gib:8.2f}" if r.peak_mem_gib is not None else f"{'-':>8s}"
        lines.append(f"{r.stage:11s} {r.preset:9s} {r.precision:4s} {'on' if r.channels_last else 'off':7s} "
                     f"{'on' if r.compiled else 'off':7s} "
                     f"{r.ms_per_image:9.2f} {r.images_per_s:8.2f} {r.gflops_per_image:9.2f} "
                     f"{r.tflops_per_s:8.4f} {mfu} {mem}")
    return "\n".join(lines)


def speedups(rows: list[BenchRow]) -> list[tuple[str, float]]:
    """Speed-ups (baseline time / time) between configurations that differ in one factor, and of
    each VAE-GAN configuration over the reference's update on the same preset."""
    times = {(r.stage, r.preset, r.precision, r.channels_last, r.compiled): r.ms_per_image for r in rows}
    groups = dict.fromkeys((r.stage, r.preset) for r in rows if r.stage != REFERENCE_STAGE)
    layouts = sorted({r.channels_last for r in rows})
    out = []

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    for stage, preset in groups:
        for layout in layouts:
            fp32 = times.get((stage, preset, "fp32", layout, False))
            bf16 = times.get((stage, preset, "bf16", layout, False))
            if fp32 and bf16:
                out.append((f"{stage} {preset}: bf16 over fp32, channels_last {on(layout)}", fp32 / bf16))
        for precision in PRECISIONS:
            off = times.get((stage, preset, precision, False, False))
            with_cl = times.get((stage, preset, precision, True, False))
            if off and with_cl:
                out.append((f"{stage} {preset}: channels_last on over off, {precision}", off / with_cl))
            for layout in layouts:
                eager, compiled = (times.get((stage, preset, precision, layout, c)) for c in (False, True))
                if eager and compiled:
                    out.append((f"{stage} {preset}: compiled over eager, {precision}, channels_last {on(layout)}",
                                eager / compiled))
        if stage == "ldm":
            for (s, p, precision, layout, compiled), ms in times.items():
                plain = times.get((stage, preset, precision, layout, compiled))
                if (s, p) == (DERIVED_STAGE, preset) and plain:
                    out.append((f"ldm {preset}: derived channels on over off, {precision}, channels_last "
                                f"{on(layout)}{', compiled' if compiled else ''}", plain / ms))
        reference = times.get((REFERENCE_STAGE, preset, "fp32", False, False))
        if stage == "vae-gan" and reference:
            for (s, p, precision, layout, compiled), ms in times.items():
                if (s, p) == (stage, preset):
                    out.append((f"vae-gan {preset}: {precision}, channels_last {on(layout)}, compile {on(compiled)} "
                                "over the reference's update (fp32 eager)", reference / ms))
    return out


def format_report(opts: ModelBenchOptions, device: torch.device, rows: list[BenchRow]) -> str:
    header = (f"training step benchmark: image {opts.image_size} (latent {opts.image_size // LATENT_FACTOR}), "
              f"batch {opts.batch}, {opts.iters} timed iters after {max(opts.warmup, 1)} warm-up, "
              f"torch {torch.__version__}\ndevice: {describe_device(device)}\n"
              "the real vae_gan_step / ldm_step on DeepSpeed engines (one process), each with its engines' "
              "backward and optimizer step (accumulation 1); vae-gan: autoencoder update with the GAN terms on, "
              "then the discriminator update; ldm: frozen VAE encode (included) + U-Net update. "
              "bf16 = DeepSpeed precision autocast (fp32 master weights).")
    ratios = "\n".join(f"  {label:75s} {value:5.2f}x" for label, value in speedups(rows))
    return f"{header}\n{format_table(rows)}\nspeed-ups (time of the baseline / time; > 1 is faster):\n{ratios}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny,reference", help="comma list of tiny, reference")
    parser.add_argument("--image-size", type=int, default=256, help="multiple of 32; 64/128 for quick CPU runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations (the first counts FLOPs)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma list of {', '.join(ALL_STAGES)} ({REFERENCE_STAGE}: the reference's update; "
                             f"{DERIVED_STAGE}: ldm with the tx_los and tx_detour channels)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--channels-last", default="off,on", help="comma list of off, on")
    parser.add_argument("--compile", default="off", help="comma list of off, on (train.compile)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads; default: torch's")


def options_from_args(args: argparse.Namespace) -> ModelBenchOptions:
    def split(text: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in text.split(",") if v.strip())

    layouts, compiled = split(args.channels_last), split(args.compile)
    _check_subset("--channels-last", layouts, ("off", "on"))
    _check_subset("--compile", compiled, ("off", "on"))
    return ModelBenchOptions(
        presets=split(args.presets), image_size=args.image_size, batch=args.batch, iters=args.iters,
        warmup=args.warmup, device=args.device, stages=split(args.stages), precisions=split(args.precisions),
        channels_last=tuple(v == "on" for v in layouts), compiled=tuple(v == "on" for v in compiled),
        threads=args.threads,
    )


def bench_models(args: argparse.Namespace) -> None:
    opts = options_from_args(args)
    device, rows = run_model_bench(opts)
    print("\n" + format_report(opts, device, rows))
