"""A finished sweep's results: ``results.csv`` (one row per trial), ``best.yaml``, a summary."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from radiodiff.config import TrainVaeConfig
from pipeline.tune_trial import TrialFailed, logged_metrics, run_dir_name

RESULTS_NAME = "results.csv"
BEST_NAME = "best.yaml"
STATUS_OK, STATUS_ERROR = "TERMINATED", "ERROR"
REPORTED = ("val/psnr", "val/ssim", "ae/loss")  # columns of results.csv besides the sweep's metric


@dataclass
class TrialRow:
    trial_id: str
    disc_start: int
    kl_weight: float
    status: str  # TERMINATED (finished, or stopped early by ASHA) | ERROR
    metrics: dict[str, float]  # the last reported value of each metric
    steps: int  # training steps done (the run directory's last logged step)
    run_dir: str
    error: str = ""


def error_message(error: BaseException) -> str:
    """One line for a failed trial: the trial's own exception, not Ray's wrapped traceback."""
    cause = getattr(error, "cause", None) or error  # a RayTaskError holds the trial's exception
    if isinstance(cause, TrialFailed):
        return str(cause)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if len(lines) <= 1:
        return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    # Several lines (e.g. Ray Train's worker error snippets): the last is the innermost exception.
    return lines[-1].removeprefix(f"{TrialFailed.__module__}.{TrialFailed.__name__}: ")


def collect_rows(results: Any, trials_dir: Path) -> list[TrialRow]:
    """One row per trial of a Ray Tune ResultGrid, in trial-id order."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        reported = {key: float(value) for key, value in metrics.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)}
        run_dir = trials_dir / run_dir_name(result.config)
        rows.append(TrialRow(
            # Ray Tune's trial folders are named "<trial id>_ds..." (pipeline.tune.trial_name)
            trial_id=str(metrics.get("trial_id") or Path(result.path).name.split("_ds")[0]),
            disc_start=int(result.config["disc_start"]), kl_weight=float(result.config["kl_weight"]),
            status=STATUS_ERROR if result.error else STATUS_OK, metrics=reported,
            steps=int(logged_metrics(run_dir).get("step", 0)), run_dir=str(run_dir),
            error=error_message(result.error) if result.error else ""))
    return sorted(rows, key=lambda row: row.trial_id)


def _columns(metric: str) -> list[str]:
    return list(REPORTED) + ([metric] if metric not in REPORTED else [])


def write_results(rows: list[TrialRow], path: Path, metric: str) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["trial_id", "disc_start", "kl_weight", "status", *_columns(metric), "steps", "run_dir",
                         "error"])
        for row in rows:
            values = [row.metrics.get(key, "") for key in _columns(metric)]
            writer.writerow([row.trial_id, row.disc_start, row.kl_weight, row.status, *values, row.steps,
                             row.run_dir, row.error])


def best_row(rows: list[TrialRow], metric: str, mode: str) -> TrialRow | None:
    """The finished trial with the best finite final ``metric`` (None when there is none)."""
    scored = [row for row in rows if row.status == STATUS_OK and math.isfinite(row.metrics.get(metric, math.nan))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda row: row.metrics[metric])


def write_best(cfg: TrainVaeConfig, row: TrialRow, path: Path, metric: str) -> None:
    """The best trial's full training config, composable as ``radiodiff-train-vae --config``.

    run_dir is left ``???`` so that training it again names a new directory (the trial's own run
    directory, named in the header, continues the trial itself)."""
    body = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    header = (f"# best trial {row.trial_id} of the sweep in {path.parent} ({metric}={row.metrics[metric]:.6g});\n"
              f"# its run directory: {row.run_dir}\n"
              f"# train it: radiodiff-train-vae --config {path} run_dir=<new run directory>\n"
              "defaults:\n  - train_vae_schema\n  - _self_\n\n")
    path.write_text(header + body)


def summary(rows: list[TrialRow], best: TrialRow | None, metric: str, out_dir: Path) -> str:
    failed = [row for row in rows if row.status == STATUS_ERROR]
    lines = [f"sweep: {len(rows)} trials, {len(rows) - len(failed)} finished, {len(failed)} failed "
             f"(results: {out_dir / RESULTS_NAME})"]
    for row in rows:
        shown = " ".join(f"{key}={row.metrics[key]:.4g}" for key in _columns(metric) if key in row.metrics)
        lines.append(f"  {row.trial_id}  disc_start={row.disc_start} kl_weight={row.kl_weight:g}  {row.status}  "
                     f"steps={row.steps}  {shown}")
        if row.error:
            lines.append(f"      error: {row.error}")
    if best is not None:
        lines.append(f"best: {best.trial_id} disc_start={best.disc_start} kl_weight={best.kl_weight:g} "
                     f"{metric}={best.metrics[metric]:.6g} -> {out_dir / BEST_NAME}")
    else:
        lines.append(f"best: none (no trial finished with a finite {metric})")
    return "\n".join(lines)
