"""The `train` benchmark of tools/bench.py: steps/s and images/s of the real training commands.

    python tools/bench.py train [--stages vae,ldm --preset tiny --precisions autocast,fp32,auto
                                 --zero 1,2 --steps 6 --batch 2 --nproc 1]

Every configuration runs radiodiff-train-{vae,ldm} as it runs for users (DeepSpeed engines, shard
reader, checkpoint at the end), one after the other in this one invocation so that ratios compare
like with like. Rates come from the run's metrics.jsonl and exclude the first (warm-up) step. On a
GPU the run's peak memory is reported as the loop logs it. The LDM runs use a VAE trained for one
step first (its quality does not change the cost).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from radiodiff.launch import console_command



def run_case(stage: str, run_dir: Path, shards: Path, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    overrides = [f"run_dir={run_dir}", f"data.shards={shards}", f"model={args.preset}", "wandb.enabled=false",
                 "train.log_every=1", f"train.max_steps={args.steps}", f"train.ckpt_every={args.steps}",
                 f"train.global_batch={args.batch * args.nproc}", f"train.micro_batch={args.batch}",
                 "data.num_workers=0", *extra]
    if stage == "vae":
        overrides.append("perceptual.pretrained=false")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2)
                                                                                    // args.nproc)))}
    done = subprocess.run(console_command(f"radiodiff-train-{stage}", args.nproc) + overrides, capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} run failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rates(metrics: list[dict], images_per_step: int) -> tuple[float, float]:
    """Steps/s and images/s between the first and the last logged step."""
    first, last = metrics[0], metrics[-1]
    seconds = last["step"] / last["steps_per_s"] - first["step"] / first["steps_per_s"]
    steps_per_s = (last["step"] - first["step"]) / seconds
    return steps_per_s, steps_per_s * images_per_step


def bench_train(args: argparse.Namespace) -> None:
    from pipeline.synthetic_shards import synthetic_shards

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, shards = synthetic_shards(work, num_maps=args.maps, num_tx=args.tx)
        vae_dir = work / "vae-for-ldm"
        run_case("vae", vae_dir, shards, argparse.Namespace(**{**vars(args), "steps": 1, "nproc": 1}), [])
        rows = []
        for stage in args.stages.split(","):
            for precision in args.precisions.split(","):
                for zero in args.zero.split(","):
                    extra = [f"deepspeed.precision={precision}", f"deepspeed.zero_stage={zero}"]
                    if stage == "ldm":
                        extra.append(f"vae.checkpoint={vae_dir}")
                    metrics = run_case(stage, work / f"{stage}-{precision}-{zero}", shards, args, extra)
                    steps_per_s, images_per_s = rates(metrics, args.batch * args.nproc)
                    last = metrics[-1]
                    rows.append((stage, precision, zero, steps_per_s, images_per_s, last.get("perf/peak_memory_gb"),
                                 last.get("perf/tflops_rank"), last.get("perf/mfu")))
    print(f"\ntraining benchmark: preset {args.preset}, {args.nproc} rank(s), micro batch {args.batch}, "
          f"{args.steps} steps (first excluded), {os.cpu_count()} cores, {bf16_note()}")
    print(f"{'stage':6s} {'precision':9s} {'zero':>4s} {'steps/s':>8s} {'images/s':>9s} {'GPU GiB':>8s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s}")
    for stage, precision, zero, sps, ips, memory, tflops, mfu in rows:
        print(f"{stage:6s} {precision:9s} {zero:>4s} {sps:8.3f} {ips:9.2f} {_cell(memory, '.1f'):>8s} "
              f"{_cell(tflops, '.3g'):>8s} {_cell(mfu, '.1%'):>6s}")
    base = {(r[0], r[2]): r[3] for r in rows if r[1] == "fp32"}
    for stage, precision, zero, sps, *_ in rows:
        if precision != "fp32" and (stage, zero) in base:
            print(f"  {stage} ZeRO {zero}: {precision} over fp32 {sps / base[(stage, zero)]:.2f}x")


def bf16_note() -> str:
    """Whether this machine computes bf16 natively: what deepspeed.precision=auto resolves to here."""
    from radiodiff.precision import resolve_precision
    from radiodiff.runs.predict import default_device

    device = default_device()
    return f"precision auto on {device.type} -> {resolve_precision('auto', device)}"


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", default="vae,ldm")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precisions", default="autocast,fp32,auto")
    parser.add_argument("--zero", default="2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--maps", type=int, default=12)
    parser.add_argument("--tx", type=int, default=8)
