"""radiodiff-demo: the whole pipeline, small, on one machine, from nothing.

1. a synthetic RadioMapSeer (radiodiff-synth's code), 2. Ray sharding into WebDataset tars,
3. one pass of the resumable training reader, 4. the VAE-GAN and 5. the latent diffusion model on
DeepSpeed (the real radiodiff-train-* commands, tiny preset), 6. evaluation of both against the
mean-map baseline (radiodiff-eval), 7. training figures, 8. ``report.md`` tying it together.
The commands run as subprocesses, as a user would run them; their output streams through.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from radiodiff.cli import check_output_dir, run_app
from radiodiff.config import DemoConfig
from radiodiff.launch import console_command

STAGES = 9


def stage(number: int, title: str) -> float:
    print(f"\n== {number}/{STAGES} {title}", flush=True)
    return time.perf_counter()


def reader_pass(cfg: DemoConfig) -> dict[str, int]:
    """One pass over every split with the training reader; returns samples read per split."""
    from dataclasses import replace

    from radiodiff.data.shards import ShardLoader

    data = replace(cfg.shard.data, shards=cfg.shard.out)
    counts = {}
    for split in ("train", "val", "test"):
        start = time.perf_counter()
        batches = list(ShardLoader(data, split, batch_size=cfg.batch_size, epochs=1))
        counts[split] = sum(len(b["key"]) for b in batches)
        rate = counts[split] / (time.perf_counter() - start)
        print(f"  {split}: {counts[split]} samples in {len(batches)} batches, cond "
              f"{tuple(batches[0]['cond'].shape)}, target {tuple(batches[0]['target'].shape)} ({rate:.0f} samples/s)")
    return counts


def run_command(script: str, args: list[str], nproc: int = 1) -> None:
    """Run a console script of this environment (under torchrun when nproc > 1); fail loudly."""
    print(f"  $ {script} {' '.join(args)}", flush=True)
    done = subprocess.run([*console_command(script, nproc), *args])
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed with exit code {done.returncode}")


def train_args(cfg: DemoConfig, run_dir: Path, steps: int) -> list[str]:
    return [f"run_dir={run_dir}", f"data.shards={cfg.shard.out}", f"model={cfg.model}", f"train.max_steps={steps}",
            f"train.global_batch={cfg.batch_size}", f"train.micro_batch={max(1, cfg.batch_size // cfg.nproc)}",
            f"train.lr={cfg.lr}", f"train.min_lr={cfg.lr / 10}",
            f"train.log_every={max(1, steps // 10)}",
            f"train.ckpt_every={steps}", f"train.val_every={max(1, steps // 3)}", "data.num_workers=0",
            "wandb.mode=offline"]


def ldm_args(cfg: DemoConfig, run_dir: Path, vae_dir: Path) -> list[str]:
    """radiodiff-train-ldm's arguments: the common ones, the frozen VAE, the short-run recipe (EMA with
    warmup from halfway), and the derived inputs that the demo's regressor gets too."""
    from pipeline.quality import derived_overrides

    return [*train_args(cfg, run_dir, cfg.ldm_steps), f"vae.checkpoint={vae_dir}", f"sampler.steps={cfg.sampler_steps}",
            f"ema.start_step={cfg.ldm_steps // 2}", "ema.update_every=1", "ema.warmup_power=0.6667",
            *derived_overrides(cfg)]


def demo_regressor(cfg: DemoConfig, data):
    """The direct regressor: as many updates and the same batch, learning rate and derived inputs as the LDM."""
    from pipeline.quality import derived_flags, train_regressor

    return train_regressor(data, steps=cfg.ldm_steps, batch=cfg.batch_size, lr=cfg.lr, seed=0, **derived_flags(cfg))


def quality_references(cfg: DemoConfig, ldm_dir: Path, evals: Path) -> dict[str, dict]:
    """The LDM against a regressor trained as long on the same shards with the same derived inputs, both
    with and without the transmitter (scored as radiodiff-eval scores; the grids go to ``evals``)."""
    from dataclasses import replace

    from pipeline.quality import regressor_predictor, run_predictor, score_split, without_transmitter
    from radiodiff.runs.predict import default_device

    device = default_device()
    ldm, data = run_predictor(ldm_dir, device, cfg.sampler_steps)
    data = replace(data, num_workers=0)
    regressor = demo_regressor(cfg, data).to(device)
    predict = regressor_predictor(regressor, data)
    blank = without_transmitter
    return {"regressor": score_split(predict, data, device, cfg.batch_size, evals / "regressor_grid.png"),
            "regressor_no_tx": score_split(blank(predict, data.value_range), data, device, cfg.batch_size),
            "ldm_no_tx": score_split(blank(ldm, data.value_range), data, device, cfg.batch_size,
                                     evals / "ldm_no_tx_grid.png")}


def run_demo(cfg: DemoConfig) -> int:
    from pipeline.demo_report import write_report
    from pipeline.shard import run_shard, summarize
    from radiodiff.data.synth_main import run_synth
    from radiodiff.eval.figures import write_figures

    began, out = time.perf_counter(), check_output_dir("out_dir", cfg.out_dir)
    print(f"radiodiff demo in {out.resolve()}")
    stage(1, f"synthetic RadioMapSeer: {cfg.synth.num_maps} maps x {cfg.synth.num_tx} transmitters")
    run_synth(cfg.synth)
    start = stage(2, "sharding into WebDataset tars with Ray tasks")
    manifest = run_shard(cfg.shard)
    print(summarize(manifest, time.perf_counter() - start))
    stage(3, "one pass of the resumable training reader over the shards")
    counts = reader_pass(cfg)
    expected = {split: entry["num_samples"] for split, entry in manifest["splits"].items()}
    if counts != expected:
        raise RuntimeError(f"reader pass read {counts} samples, the manifest lists {expected}")
    runs = {"vae": out / "runs" / "vae", "ldm": out / "runs" / "ldm"}
    stage(4, f"VAE-GAN on DeepSpeed: {cfg.vae_steps} steps, discriminator from step {cfg.disc_start}")
    # No perceptual term: without pretrained VGG16 weights (never downloaded) LPIPS is a random
    # network, no perceptual signal, yet most of a tiny VAE-GAN step.
    run_command("radiodiff-train-vae", [*train_args(cfg, runs["vae"], cfg.vae_steps), "perceptual.pretrained=false",
                                        "loss.perceptual_weight=0", f"loss.disc_start={cfg.disc_start}"], cfg.nproc)
    stage(5, f"latent diffusion on the frozen VAE: {cfg.ldm_steps} steps")
    run_command("radiodiff-train-ldm", ldm_args(cfg, runs["ldm"], runs["vae"]), cfg.nproc)
    stage(6, "evaluation on the test split (PSNR, SSIM, NMSE, RMSE) against the mean-map baseline")
    results = {}
    for name, run_dir in runs.items():
        eval_dir = out / "eval" / name
        run_command("radiodiff-eval", [f"run_dir={run_dir}", "split=test", f"out_dir={eval_dir}",
                                       f"sampler.steps={cfg.sampler_steps}", f"batch_size={cfg.batch_size}",
                                       "time_batch1=false"])  # the demo's 10 minutes: no batch-1 timing
        results[name] = json.loads((eval_dir / "metrics.json").read_text())
    stage(7, f"references: a direct regressor ({cfg.ldm_steps} updates) and the transmitter removed")
    references = quality_references(cfg, runs["ldm"], out / "eval")
    for name, values in references.items():
        print(f"  {name}: PSNR {values['psnr']:.2f} dB")
    stage(8, "training figures")
    figures = {name: write_figures(run_dir) for name, run_dir in runs.items()}
    for paths in figures.values():
        print("  " + ", ".join(str(p) for p in paths))
    stage(9, "report")
    report = write_report(out, cfg, manifest, results, figures, references)
    print(f"  {report}")
    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s; open {report}")
    return 0


def main() -> int:
    return run_app("demo", run_demo)
