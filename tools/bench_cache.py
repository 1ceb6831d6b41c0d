"""The `cache` benchmark of tools/bench.py: the real stage-2 step with and without the latent cache.

    python tools/bench.py cache [--presets tiny,reference --image-size 256 --batch 4 --iters 5
                                 --warmup 2 --repeats 3 --precision bf16|fp32 --device auto|cpu|cuda
                                 --threads N]

Both sides call ``ldm_step`` on the same U-Net engine and frozen VAE, built as tools/bench_models.py
builds them, on the same maps and stream positions (so the same keyed noise). Without the cache the
batch holds the target maps and the step encodes them with the frozen VAE; with it the batch holds
their posterior moments (what radiodiff-encode stores) and the step only draws z0 from them. Timed
alternately, ``--repeats`` rounds of ``--iters`` steps per side, the median round per side: ms per
image, GFLOPs per image (FlopCounterMode, on the first untimed step) and the ratio of the two times
(> 1: the cache is faster). Reading the data is in neither: what is compared is the step.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import bench_models as bm  # a sibling: a script's own folder is on its import path
import torch


@dataclass(frozen=True)
class CacheBenchOptions:
    presets: tuple[str, ...] = ("tiny", "reference")
    image_size: int = 256
    batch: int = 4
    iters: int = 5
    warmup: int = 2  # untimed steps per side; the first counts FLOPs, so at least one runs
    repeats: int = 3  # alternating rounds of iters steps per side
    precision: str = "bf16"  # fp32 | bf16 (DeepSpeed precision autocast, as in the models benchmark)
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        bm.ModelBenchOptions(presets=self.presets, image_size=self.image_size, batch=self.batch, iters=self.iters,
                             device=self.device, precisions=(self.precision,))  # the models benchmark's checks
        if self.repeats < 1:
            raise ValueError(f"--repeats={self.repeats} must be >= 1")


@dataclass(frozen=True)
class CacheRow:
    preset: str
    ms_encoding: float  # per image, the step that encodes the target
    ms_cached: float  # per image, the step that draws from cached moments
    gflops_encoding: float  # per image
    gflops_cached: float

    @property
    def speedup(self) -> float:
        return self.ms_encoding / self.ms_cached


def _batches(vae: torch.nn.Module, opts: CacheBenchOptions, device: torch.device) -> tuple[dict, dict]:
    """The same maps as a training batch of images and as one of cached moments."""
    from radiodiff.runs.latent_cache import posterior_moments

    size, batch = opts.image_size, opts.batch
    target = torch.rand(batch, 1, size, size, device=device) * 2 - 1  # (B, 1, H, W) in [-1, 1]
    cond = torch.rand(batch, 3, size, size, device=device) * 2 - 1  # (B, 3, H, W)
    pos = torch.arange(batch)  # (B,): keys the posterior, time and noise draws of both sides alike
    return {"target": target, "cond": cond, "pos": pos}, {"moments": posterior_moments(vae, target), "cond": cond,
                                                          "pos": pos}


def bench_preset(preset: str, opts: CacheBenchOptions, device: torch.device) -> CacheRow:
    from radiodiff.train.steps import StepContext, ldm_step

    torch.manual_seed(0)
    built = bm.build_ldm_step(bm.MODEL_PRESETS[preset], opts.image_size, opts.batch, device, opts.precision, False)
    precision = bm.DEEPSPEED_PRECISION[opts.precision]
    images, cached = _batches(built.models.vae, opts, device)

    def step_on(batch: dict) -> Callable[[], None]:
        return lambda: ldm_step(built.models, batch, StepContext(step=0, device=device, precision=precision))

    sides = {"encoding": step_on(images), "cached": step_on(cached)}
    flops = {name: bm.count_flops(run).total for name, run in sides.items()}  # the first warm-up step
    for _ in range(opts.warmup - 1):
        for run in sides.values():
            run()
    rounds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(opts.repeats):  # alternate, so that machine noise hits both alike
        for name, run in sides.items():
            rounds[name].append(bm.time_step(run, opts.iters, device))
    for engine in built.engines:
        engine.destroy()
    ms = {name: statistics.median(values) / opts.batch * 1e3 for name, values in rounds.items()}
    return CacheRow(preset, ms["encoding"], ms["cached"], flops["encoding"] / opts.batch / 1e9,
                    flops["cached"] / opts.batch / 1e9)


def run_cache_bench(opts: CacheBenchOptions) -> tuple[torch.device, list[CacheRow]]:
    """Every preset in the one-process DeepSpeed world (created here once, kept for the process)."""
    from radiodiff import dist

    device = bm.resolve_device(opts.device)
    if dist.setup().world_size != 1:
        raise ValueError("run the benchmark as one process, not under torchrun")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    rows = []
    for preset in opts.presets:
        rows.append(bench_preset(preset, opts, device))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return device, rows


def format_report(opts: CacheBenchOptions, device: torch.device, rows: list[CacheRow]) -> str:
    head = (f"LDM step with and without the latent cache: image {opts.image_size} (latent "
            f"{opts.image_size // bm.LATENT_FACTOR}), batch {opts.batch}, {opts.precision}, {opts.repeats} rounds "
            f"of {opts.iters} steps per side after {max(opts.warmup, 1)} warm-up, torch {torch.__version__}")
    lines = [head, f"device: {bm.describe_device(device)}",
             "| preset | encoding ms/img | cached ms/img | encoding GFLOP/img | cached GFLOP/img | speed-up |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.preset} | {r.ms_encoding:.2f} | {r.ms_cached:.2f} | {r.gflops_encoding:.2f} | "
                     f"{r.gflops_cached:.2f} | {r.speedup:.2f}x |")
    lines.append("speed-up: the encoding step's time / the cached step's (> 1: the cache is faster)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny,reference", help="comma list of tiny, reference")
    parser.add_argument("--image-size", type=int, default=256, help="multiple of 32; 64/128 for quick CPU runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (the first counts FLOPs)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--precision", default="bf16", choices=bm.PRECISIONS)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads; default: torch's")


def bench_cache(args: argparse.Namespace) -> None:
    presets = tuple(v.strip() for v in args.presets.split(",") if v.strip())
    opts = CacheBenchOptions(presets=presets, image_size=args.image_size, batch=args.batch, iters=args.iters,
                             warmup=args.warmup, repeats=args.repeats, precision=args.precision,
                             device=args.device, threads=args.threads)
    device, rows = run_cache_bench(opts)
    print("\n" + format_report(opts, device, rows))
