"""Training figures of a run directory, from its metrics.jsonl and config.yaml.

    python tools/plot_training.py <run_dir> [--out DIR]     (default DIR: <run_dir>/figures)

Writes training_phases.png, loss_components.png, multi_axis.png, normalized_comparison.png,
summary_dashboard.png and, when metrics.jsonl has perf/* telemetry, throughput.png (maps/s, data
wait, TFLOP/s and MFU, peak memory), and prints their paths. Exits 2, naming the file, when
metrics.jsonl is missing or corrupt. The figures themselves are drawn by radiodiff.eval.figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radiodiff.eval.figures import write_figures
from radiodiff.eval.run_log import MetricsFileError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/figures)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = write_figures(args.run_dir, args.out)
    except MetricsFileError as error:
        print(f"plot_training: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
