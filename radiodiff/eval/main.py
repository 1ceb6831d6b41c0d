"""Entry points radiodiff-eval and radiodiff-sample (Hydra apps; see conf/eval.yaml, conf/sample.yaml).

radiodiff-eval runs single-process or under torchrun (the split is divided across ranks);
radiodiff-sample runs in one process.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace

from radiodiff.cli import check_output_dir, run_app
from radiodiff.config import EvalConfig
from radiodiff.dist import print0, setup, teardown
from radiodiff.eval.evaluate import evaluate
from radiodiff.eval.sample import run_sample
from radiodiff.runs import merge_data, open_run
from radiodiff.runs.predict import speed_text

DATA_OVERRIDE = re.compile(r"^\+{0,2}data\.(\w+)=")


def data_keys(args: list[str]) -> set[str]:
    """The data.* keys set on the command line: these replace the run's data config."""
    return {m.group(1) for arg in args if (m := DATA_OVERRIDE.match(arg))}


def evaluate_command(cfg: EvalConfig, given_data_keys: set[str]) -> int:
    check_output_dir("out_dir", cfg.out_dir)  # before the evaluation, not after it
    run = open_run(cfg.run_dir)
    cfg = replace(cfg, data=merge_data(run.config.data, cfg.data, given_data_keys))
    dist = setup()
    try:
        metrics = evaluate(cfg, run, dist)
        if metrics is not None:
            print0(f"radiodiff-eval: {run.stage} run {run.run_dir} step {run.step}, {cfg.split} split, "
                   f"{metrics['num_samples']} samples: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                   f"NMSE {metrics['nmse']:.5f}, RMSE {metrics['rmse']:.5f} (baseline PSNR "
                   f"{metrics['baseline']['psnr']:.2f} dB) -> {cfg.out_dir}")
            speed = speed_text(metrics["seconds_per_map"], cfg.batch_size, metrics["seconds_per_map_batch1"])
            print0(f"radiodiff-eval: model time {speed}")
    finally:
        teardown()
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run_app("eval", lambda cfg: evaluate_command(cfg, data_keys(args)), args)


def sample_main(argv: list[str] | None = None) -> int:
    return run_app("sample", run_sample, argv)
