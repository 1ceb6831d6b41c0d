"""radiodiff-tune: Ray Tune sweeps of stage-1 (VAE-GAN) training over loss.disc_start and loss.kl_weight.

The config is radiodiff-train-vae's (``train.max_steps`` is every trial's length) plus ``tune:``,
``ray:`` and ``out_dir``. Trials (pipeline/tune_trial.py) run the same training function as
radiodiff-train-vae, each in its own run directory ``out_dir/trials/ds<disc_start>_kl<kl_weight>``.
Search: a grid of every listed combination, or Optuna sampling the ranges the lists span;
optionally ASHA stops weak trials at validation steps. The sweep writes ``out_dir/results.csv`` and
``out_dir/best.yaml`` and prints a summary; failed trials are listed with their error, and the exit
code is 1 when every trial failed. A sweep holds ``out_dir/LOCK`` while it runs (as a training holds
its run directory): a second sweep on the same out_dir stops with a one-line error.

A resubmitted sweep (after preemption, a failure, or with a larger ``train.max_steps``) continues
where the last one stopped, without Ray Tune's restore (which unpickles its experiment state): run
directories are named by the parameters, so a trial of the same parameters resumes its run from the
newest checkpoint, and one that had finished reports what its run logged. A grid has the same trials
again; Optuna first re-runs the earlier trials in ``out_dir/trials`` that lie within the ranges (they
count in ``tune.num_samples``), and so learns their results, then samples new ones.

SIGTERM, a first Ctrl-C or ``touch out_dir/STOP`` stop a sweep so that it can continue: running
trials save a checkpoint first, pending ones never start, and the command exits 75
(pipeline/tune_stop.py).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from radiodiff.cli import check_output_dir
from radiodiff.config import ConfigError, TrainVaeConfig, TuneConfig, TuneSweepConfig
from radiodiff.data.manifest import check_manifest_options, read_manifest
from radiodiff.train.lock import RunLock
from radiodiff.train.preemption import EXIT_PREEMPTED
from pipeline.tune_results import (BEST_NAME, RESULTS_NAME, STATUS_OK, best_row, collect_rows, summary,
                                   write_best, write_results)
from pipeline.tune_trial import (STOP_NAME, TRIALS_DIR, run_dir_name, run_trial, run_trial_workers, stoppable,
                                 trial_config)

TUNE_DIR = "ray_tune"  # under out_dir: Ray Tune's experiment state and per-trial logs
EXIT_INTERRUPTED = 130  # as a shell reports a Ctrl-C


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute: Ray runs trials in other working directories."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def base_training_config(cfg: TuneConfig) -> TrainVaeConfig:
    """The training config every trial starts from; validation is on so that val/* gets reported."""
    base = TrainVaeConfig(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(TrainVaeConfig)})
    base.data.shards = _absolute(base.data.shards)
    base.data.root = _absolute(base.data.root)
    base.perceptual.vgg_weights = _absolute(base.perceptual.vgg_weights)
    if cfg.tune.metric.startswith("val/") and base.train.val_every == 0:
        base.train.val_every = base.train.max_steps  # validate once, at the end of every trial
    return base


def param_space(sweep: TuneSweepConfig) -> dict[str, Any]:
    from ray import tune

    if sweep.search == "grid":
        return {"disc_start": tune.grid_search(list(sweep.disc_start)),
                "kl_weight": tune.grid_search(list(sweep.kl_weight))}
    low, high = min(sweep.disc_start), max(sweep.disc_start)
    disc_start = tune.randint(low, high + 1) if low < high else low
    low, high = min(sweep.kl_weight), max(sweep.kl_weight)
    if low == high:
        kl_weight: Any = low
    else:
        kl_weight = tune.loguniform(low, high) if low > 0 else tune.uniform(low, high)
    return {"disc_start": disc_start, "kl_weight": kl_weight}


def check_search_available(sweep: TuneSweepConfig) -> None:
    if sweep.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.search=optuna needs the optuna package: pip install optuna")


def earlier_trials(trials_dir: Path) -> list[dict[str, Any]]:
    """The parameters of the trials in ``trials_dir`` (from their run directories' names), by name."""
    found = []
    for path in sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []:
        match = re.fullmatch(r"ds(\d+)_kl(.+)", path.name)
        if not path.is_dir() or match is None:
            continue
        try:
            params = {"disc_start": int(match[1]), "kl_weight": float(match[2])}
        except ValueError:
            continue
        if run_dir_name(params) == path.name:  # one of ours, not a folder someone named alike
            found.append(params)
    return found


def rerun_trials(sweep: TuneSweepConfig, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier trials this sweep runs again: a grid's own; for Optuna, those within the ranges
    (at most tune.num_samples)."""
    if sweep.search == "grid":
        return [params for params in earlier
                if params["disc_start"] in sweep.disc_start and params["kl_weight"] in sweep.kl_weight]
    ranges = {"disc_start": sweep.disc_start, "kl_weight": sweep.kl_weight}
    within = [params for params in earlier
              if all(min(ranges[key]) <= value <= max(ranges[key]) for key, value in params.items())]
    return within[:sweep.num_samples]


def optuna_points(sweep: TuneSweepConfig, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials as Optuna's first points: only the sampled parameters (a constant one is not in
    Optuna's space; with none sampled there is nothing to enqueue)."""
    sampled = [key for key in ("disc_start", "kl_weight") if min(getattr(sweep, key)) < max(getattr(sweep, key))]
    return [{key: params[key] for key in sampled} for params in trials] if sampled else []


def make_search(sweep: TuneSweepConfig, points: list[dict[str, Any]]) -> Any:
    if sweep.search == "grid":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(points_to_evaluate=points or None)


def make_scheduler(sweep: TuneSweepConfig, base: TrainVaeConfig) -> Any:
    if sweep.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = sweep.grace_steps or base.train.val_every or base.train.log_every
    return ASHAScheduler(time_attr="step", max_t=base.train.max_steps, grace_period=min(grace, base.train.max_steps),
                         reduction_factor=sweep.reduction_factor)


def trial_name(trial: Any) -> str:
    return f"{trial.trial_id}_ds{trial.config['disc_start']}_kl{trial.config['kl_weight']:.3g}"


def make_trainable(sweep: TuneSweepConfig, base: TrainVaeConfig, out_dir: Path) -> Any:
    from ray import tune

    trials_dir = str(out_dir / TRIALS_DIR)
    if sweep.workers_per_trial == 1:
        resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
        trainable = functools.partial(run_trial, base=base, trials_dir=trials_dir, metric=sweep.metric)
    else:
        # The trial's own process only drives the TorchTrainer, whose workers hold the CPUs and GPUs;
        # Ray needs a non-empty reservation for it: one byte of (logical) memory blocks no worker.
        resources = {"cpu": 0, "memory": 1}
        trainable = functools.partial(run_trial_workers, base=base, trials_dir=trials_dir, metric=sweep.metric,
                                      sweep=sweep, storage_dir=str(out_dir / "ray_train"))
    return tune.with_resources(trainable, resources)


def make_tuner(cfg: TuneConfig, base: TrainVaeConfig, out_dir: Path, points: list[dict[str, Any]],
               stopper: Any) -> Any:
    from ray import tune

    from pipeline.tune_progress import ProgressPrinter

    sweep = cfg.tune
    tune_config = tune.TuneConfig(
        metric=sweep.metric, mode=sweep.mode, search_alg=make_search(sweep, points),
        scheduler=make_scheduler(sweep, base),
        num_samples=1 if sweep.search == "grid" else sweep.num_samples,
        max_concurrent_trials=sweep.max_concurrent or None, reuse_actors=False,
        trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    run_config = tune.RunConfig(
        name=TUNE_DIR, storage_path=str(out_dir), verbose=0, log_to_file=True,
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures), stop=stopper,
        callbacks=[ProgressPrinter(sweep.metric, num_trials(sweep), stopper.stop_file), stopper])
    return tune.Tuner(make_trainable(sweep, base, out_dir), param_space=param_space(sweep), tune_config=tune_config,
                      run_config=run_config)


def num_trials(sweep: TuneSweepConfig) -> int:
    return len(sweep.disc_start) * len(sweep.kl_weight) if sweep.search == "grid" else sweep.num_samples


def tune_command(cfg: TuneConfig) -> int:
    check_search_available(cfg.tune)
    check_output_dir("out_dir", cfg.out_dir)
    base = base_training_config(cfg)
    # Before Ray starts: every trial would fail on shards that are missing or hold other data.
    check_manifest_options(read_manifest(base.data.shards), base.data)
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    # One sweep per out_dir at a time (its results.csv, best.yaml and Ray Tune state are the sweep's):
    # a second stops in one line naming the owner; a requeued Slurm job takes its own lock over.
    with RunLock(out_dir, name="out_dir", owner="radiodiff-tune"):
        return run_sweep(cfg, base, out_dir)


def run_sweep(cfg: TuneConfig, base: TrainVaeConfig, out_dir: Path) -> int:
    from pipeline.ray_setup import ray_session
    from pipeline.tune_stop import SweepStop, stop_on_signals

    sweep = cfg.tune
    print(f"sweep: {num_trials(sweep)} trials ({sweep.search}, scheduler {sweep.scheduler}) of "
          f"{base.train.max_steps} steps, {sweep.workers_per_trial} rank(s) each; {sweep.metric} ({sweep.mode}); "
          f"out {out_dir}", flush=True)
    again = rerun_trials(sweep, earlier_trials(out_dir / TRIALS_DIR))
    if again:
        print(f"sweep: {len(again)} trial(s) continue their run directories in {out_dir / TRIALS_DIR}", flush=True)
    points = optuna_points(sweep, again) if sweep.search == "optuna" else []
    stop_file = out_dir / STOP_NAME
    if stop_file.exists():  # this sweep holds out_dir's lock: the file is an earlier sweep's request
        stop_file.unlink()
        print(f"sweep: removed {stop_file}, the stop request of an earlier sweep", flush=True)
    stopper = SweepStop(stop_file)
    try:
        with ray_session(cfg.ray), stop_on_signals(stop_file):  # after Ray's start, which sets its own handlers
            results = make_tuner(cfg, stoppable(base, stop_file), out_dir, points, stopper).fit()
    except KeyboardInterrupt:  # a second Ctrl-C, or a stop file that could not be created
        print("sweep: stopped at once: running trials did not save; the same command continues the sweep from "
              "their newest checkpoints", flush=True)
        return EXIT_INTERRUPTED
    if stop_file.exists():
        print(f"sweep: stopped by {stop_file}: running trials saved a checkpoint; results.csv and best.yaml "
              f"are not written; the same command continues the sweep (exit {EXIT_PREEMPTED})", flush=True)
        return EXIT_PREEMPTED
    rows = collect_rows(results, out_dir / TRIALS_DIR)
    write_results(rows, out_dir / RESULTS_NAME, sweep.metric)
    best = best_row(rows, sweep.metric, sweep.mode)
    if best is not None:
        params = {"disc_start": best.disc_start, "kl_weight": best.kl_weight}
        write_best(trial_config(base, params, Path("???")), best, out_dir / BEST_NAME, sweep.metric)
    print(summary(rows, best, sweep.metric, out_dir), flush=True)
    return 0 if any(row.status == STATUS_OK for row in rows) else 1


def main() -> int:
    from radiodiff.cli import run_app

    return run_app("tune", tune_command)
