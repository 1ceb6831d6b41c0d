"""What runs inside one radiodiff-tune trial: radiodiff-train-vae's own training function.

A trial applies its ``disc_start`` / ``kl_weight`` to a copy of the typed training config and calls
``run_training(cfg, build_vae_stage, "vae", on_log=...)`` in the trial's process, or, with
``tune.workers_per_trial > 1``, on every worker of a Ray Train ``TorchTrainer`` (each worker joins
the process group Ray Train set up). Metrics reach Ray Tune from ``on_log``; a non-zero exit code
fails the trial with the training's own error message.

A trial's run directory is named by its parameters (``trials/ds<disc_start>_kl<kl_weight>``), not by
Ray's trial id, so that the same trial in a resubmitted sweep (or a retry) resumes it from its
newest checkpoint. A trial whose run had already finished trains nothing and reports what its run
logged (``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import sys
from pathlib import Path
from typing import Any, Callable

from radiodiff.config import TrainVaeConfig, TuneSweepConfig
from radiodiff.eval.run_log import MetricsFileError, read_metrics, to_series
from radiodiff.runs.layout import METRICS_FILE
from radiodiff.train.preemption import EXIT_PREEMPTED

TRIALS_DIR = "trials"  # under out_dir: one training run directory per trial
STOP_NAME = "STOP"  # under out_dir: the sweep's stop file (pipeline/tune_stop.py)

Report = Callable[[dict[str, Any]], None]


def run_dir_name(params: dict[str, Any]) -> str:
    """A trial's run directory name: its parameters, exactly (``repr`` of the float round-trips)."""
    return f"ds{int(params['disc_start'])}_kl{float(params['kl_weight'])!r}"


class TrialFailed(RuntimeError):
    """Training in a trial ended with a non-zero exit code."""


class TrialStopped(TrialFailed):
    """Training in a trial stopped on the sweep's stop file (after saving, if it had trained)."""


def stoppable(base: TrainVaeConfig, stop_file: Path) -> TrainVaeConfig:
    """``base`` for the trials of a sweep: they stop on the sweep's stop file, and never requeue a
    Slurm job themselves (the sweep's batch script does)."""
    cfg = copy.deepcopy(base)
    cfg.train = dataclasses.replace(cfg.train, stop_file=str(stop_file), requeue_on_preempt=False)
    return cfg


def trial_config(base: TrainVaeConfig, params: dict[str, Any], run_dir: Path) -> TrainVaeConfig:
    """``base`` with the trial's parameters applied (validated like any config) and its run dir."""
    cfg = copy.deepcopy(base)
    cfg.run_dir = str(run_dir)
    cfg.loss = dataclasses.replace(cfg.loss, disc_start=int(params["disc_start"]),
                                   kl_weight=float(params["kl_weight"]))
    return cfg


class MetricReporter:
    """``on_log`` for a trial: keeps the latest value of every metric and reports all of them (with
    ``step``) whenever a report holds the sweep's metric: at each validation for ``val/*``."""

    def __init__(self, metric: str, report: Report) -> None:
        self.metric = metric
        self.report = report
        self.latest: dict[str, float] = {}

    def __call__(self, step: int, values: dict[str, float]) -> None:
        self.latest.update(values)
        if self.metric in values:
            self.report({**self.latest, "step": step})

    @property
    def reported(self) -> bool:
        return self.metric in self.latest


def logged_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric of a run (its ``metrics.jsonl``), with ``step`` the last
    logged step; {} when the run logged nothing."""
    try:
        records = read_metrics(run_dir / METRICS_FILE)
    except MetricsFileError:
        return {}
    latest = {key: float(values[-1]) for key, (_, values) in to_series(records).items()}
    return {**latest, "step": max(record["step"] for record in records)}


class _ErrorLines(io.TextIOBase):
    """stderr that also remembers the last ``error: ...`` line (run_training prints its errors)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        for line in text.splitlines():
            if line.startswith("error: "):
                self.last = line[len("error: "):]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def train_and_report(cfg: TrainVaeConfig, metric: str, report: Report) -> None:
    """One rank of a trial: radiodiff-train-vae's training function, reporting through ``report``."""
    from radiodiff.train.main import run_training
    from radiodiff.train.stages import build_vae_stage

    errors = _ErrorLines(sys.stderr)
    reporter = MetricReporter(metric, report)
    with contextlib.redirect_stderr(errors):
        code = run_training(cfg, build_vae_stage, "vae", on_log=reporter)
    if code == EXIT_PREEMPTED:
        raise TrialStopped(f"stopped by the sweep's stop file {cfg.train.stop_file}, after saving a checkpoint "
                           "if it had trained: the resubmitted sweep continues it")
    if code != 0:
        raise TrialFailed(f"training exited with code {code}" + (f": {errors.last}" if errors.last else ""))
    if not reporter.reported:  # a run that had already finished (a resubmitted sweep): what it logged
        logged = logged_metrics(Path(cfg.run_dir))
        if metric in logged:
            report(logged)


def run_trial(params: dict[str, Any], *, base: TrainVaeConfig, trials_dir: str, metric: str) -> None:
    """A trial of one process (tune.workers_per_trial=1)."""
    from ray import tune

    run_dir = Path(trials_dir) / run_dir_name(params)
    train_and_report(trial_config(base, params, run_dir), metric, tune.report)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a multi-worker trial."""
    import ray.train

    train_and_report(loop_config["cfg"], loop_config["metric"], ray.train.report)


def run_trial_workers(params: dict[str, Any], *, base: TrainVaeConfig, trials_dir: str, metric: str,
                      sweep: TuneSweepConfig, storage_dir: str) -> None:
    """A trial of ``tune.workers_per_trial`` ranks: a TorchTrainer whose workers each call the
    training function; rank 0's reports reach Tune through TuneReportCallback."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    run_dir = Path(trials_dir) / run_dir_name(params)
    resources = {"CPU": sweep.cpus_per_trial, **({"GPU": sweep.gpus_per_trial} if sweep.gpus_per_trial else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": trial_config(base, params, run_dir), "metric": metric},
        scaling_config=ScalingConfig(num_workers=sweep.workers_per_trial, use_gpu=sweep.gpus_per_trial > 0,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if sweep.gpus_per_trial > 0 else "gloo"),
        # Ray Train's own folder is this trial's alone (a resubmitted trial gets a new one): the
        # training state is in the run directory, never restored from Ray's.
        run_config=RunConfig(name=f"{run_dir.name}_{tune.get_context().get_trial_id()}", storage_path=storage_dir,
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
