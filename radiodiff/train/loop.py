"""The training loop, one for both stages: steps, logging, validation, checkpoints, guards.

Each iteration is one optimizer update of ``train.global_batch`` maps: ``loop.grad_accum`` micro-batches
on every rank. In every micro-batch the ranks agree, in one all-reduce, on whether any loss was
non-finite and whether any rank received a preemption signal (``steps.agree``): that is the only
host synchronisation outside logging steps; the metrics stay on the device until a logging step
reads them. After an update in which a signal arrived: save, exit 75. The non-finite guard counts
bad updates (skipped exactly, see ``steps.apply_update``) and aborts after ``train.max_bad_steps``
in a row. Steps are counted from 1 in logs and checkpoint names.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from radiodiff.config import DeepSpeedConfig, TrainConfig
from radiodiff.dist import DistInfo, all_reduce_mean, print0
from radiodiff.runs.layout import load_extra
from radiodiff.train import checkpoint
from radiodiff.train.engines import lr_at, set_lr
from radiodiff.train.preemption import EXIT_PREEMPTED, PreemptionFlag, requeue_slurm_job
from radiodiff.train.profiling import StepProfiler
from radiodiff.train.steps import StepContext
from radiodiff.train.telemetry import Telemetry, count_flops, peak_tflops

OnLog = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite for ``train.max_bad_steps`` updates in a row."""


@dataclass
class Stage:
    """What differs between the two stages; the loop is the same."""

    name: str  # vae | ldm
    headline: str  # the metric printed on the console at each logged step
    models: Any  # VaeGanModels | LdmModels
    engines: dict[str, Any]  # name -> DeepSpeed engine (each saved in its own folder)
    step_fn: Callable[[Any, dict, StepContext], dict[str, torch.Tensor]]
    validate: Callable[[int], dict[str, float]] | None = None  # step -> metrics (all ranks call it)
    after_update: Callable[[int], None] = lambda step: None  # e.g. the EMA update
    # Objects with state_dict()/load_state_dict() saved as rank-0 files ({name}.pt) with each
    # checkpoint and restored from it on resume (the EMA).
    state: dict[str, Any] = field(default_factory=dict)
    exports: Callable[[], dict[str, Any]] = dict  # rank-0 files written with each checkpoint, never read back

    def checkpoint_files(self) -> dict[str, Any]:
        return {**{name: obj.state_dict() for name, obj in self.state.items()}, **self.exports()}

    def restore(self, folder: Path) -> None:
        for name, obj in self.state.items():
            obj.load_state_dict(load_extra(folder, name))


@dataclass
class RunState:
    """Counters that survive a resume (saved in meta.json, next to the checkpoint's own facts)."""

    step: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    wandb_run_id: str = ""
    resumed_from: list[int] = field(default_factory=list)
    # FLOPs of one update on this rank, counted once at a run's first update (counting perturbs the
    # last bits of that update, so a resumed run reuses the count instead of counting again).
    flops_per_update: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:  # a field added later keeps its default for older checkpoints
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


@dataclass
class LoopConfig:
    run_dir: Path
    train: TrainConfig
    deepspeed: DeepSpeedConfig
    stage_name: str
    grad_accum: int  # micro-batches per update: train.global_batch / (micro_batch x world_size)
    seed: int = 0  # keys the per-sample draws (diffusion time and noise, posterior samples)


def checkpoint_meta(state: RunState, loop: LoopConfig, dist: DistInfo, loader: Any) -> dict:
    """meta.json: the run state, the data position (global: the same on every rank) and what the
    checkpoint was saved with."""
    return {**state.state_dict(), "loader": loader.state_dict(), "world_size": dist.world_size,
            "zero_stage": loop.deepspeed.zero_stage, "precision": loop.deepspeed.precision,
            "stage": loop.stage_name, "time": time.time()}


def save_checkpoint(stage: Stage, state: RunState, loop: LoopConfig, dist: DistInfo, loader: Any) -> Path:
    rank_state = {"rng": checkpoint.rng_state()}
    return checkpoint.save(loop.run_dir, state.step, stage.engines, rank_state=rank_state,
                           meta=checkpoint_meta(state, loop, dist, loader), extras=stage.checkpoint_files(), dist=dist,
                           keep_last=loop.train.keep_last, fail=state.step in loop.train.fail_save_steps,
                           fail_commit=state.step in loop.train.fail_commit_steps)


def _run_update(stage: Stage, batches: Iterator[dict], state: RunState, loop: LoopConfig, dist: DistInfo,
                telemetry: Telemetry, flag: PreemptionFlag) -> tuple[dict[str, torch.Tensor], StepContext]:
    """One optimizer update over grad_accum micro-batches; returns the averaged metrics (on the
    device) and the step context (which engines had a bad micro-batch, whether to stop)."""
    train = loop.train
    for engine in stage.engines.values():
        set_lr(engine, lr_at(state.step, train))
    inject = (state.step + 1) in train.nan_steps and train.nan_rank in (-1, dist.rank)
    ctx = StepContext(step=state.step, device=dist.device, precision=loop.deepspeed.precision, seed=loop.seed,
                      inject_nan=inject, stop_requested=flag.requested,
                      channels_last=train.channels_last)
    totals: dict[str, torch.Tensor] = {}
    for _ in range(loop.grad_accum):
        buffers = [b for engine in stage.engines.values() for b in engine.module.buffers()]
        saved = [b.clone() for b in buffers]
        waiting = time.perf_counter()
        batch = next(batches)
        telemetry.waited_for_data(time.perf_counter() - waiting)
        ctx.micro_bad = False
        metrics = stage.step_fn(stage.models, batch, ctx)
        if ctx.micro_bad:
            # A bad batch's forward passes also moved buffers (BatchNorm running statistics), possibly
            # to NaN: put them back, so that a skipped update leaves no trace.
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / loop.grad_accum
    return totals, ctx


def _log_update(stage: Stage, metrics: dict[str, torch.Tensor], bad: bool, state: RunState, loop: LoopConfig,
                dist: DistInfo, log: OnLog, rate: float, telemetry: Telemetry) -> None:
    """Average the update's metrics (and this window's telemetry) over ranks, log them and print
    one console line."""
    perf = {k: torch.tensor(v) for k, v in telemetry.window().items()}
    values = all_reduce_mean({**metrics, **perf}, dist.device)
    values.update(lr=lr_at(state.step - 1, loop.train), skipped_steps=state.skipped_steps, steps_per_s=rate,
                  bad=float(bad))
    log(state.step, values)
    print0(f"{loop.stage_name} step {state.step}/{loop.train.max_steps}: {stage.headline} "
           f"{values.get(stage.headline, float('nan')):.4g}, {rate:.2f} steps/s")


def train(stage: Stage, loader: Any, state: RunState, loop: LoopConfig, dist: DistInfo, logger: Any,
          flag: PreemptionFlag, on_log: OnLog | None = None) -> int:
    """Run updates until ``train.max_steps``; returns the process exit code (0 or 75).

    ``flag`` is the installed preemption flag. ``on_log(step, metrics)`` is called on every rank
    with the rank-averaged metrics of each logged step and each validation (a sweep reports them
    to Ray Tune from there).
    """
    def log(step: int, values: dict[str, float]) -> None:
        logger.log(step, values)
        if on_log is not None:
            on_log(step, values)

    cfg = loop.train
    batches = iter(loader)
    started, first_step = time.perf_counter(), state.step
    telemetry = Telemetry(global_batch=cfg.global_batch, rank_maps_per_update=cfg.micro_batch * loop.grad_accum,
                          device=dist.device, peak=peak_tflops(dist.device, cfg.peak_tflops))
    telemetry.flops_per_update = state.flops_per_update or None
    profiler = StepProfiler(cfg.profile_steps, loop.run_dir, dist)
    while state.step < cfg.max_steps:
        profiler.update_started(state.step + 1)
        first = telemetry.flops_per_update is None
        with count_flops() if first else contextlib.nullcontext() as counter:
            metrics, ctx = _run_update(stage, batches, state, loop, dist, telemetry, flag)
        bad = any(ctx.window_bad.values())
        if first:  # counted once; the counting update is slower, so it stays out of the rates
            state.flops_per_update = telemetry.flops_per_update = float(counter.get_total_flops())
            telemetry.skip_window()
        else:
            telemetry.update_done()
        state.step += 1
        state.bad_in_a_row = state.bad_in_a_row + 1 if bad else 0
        state.skipped_steps += int(bad)
        if state.bad_in_a_row >= cfg.max_bad_steps:
            raise NonFiniteLossError(f"non-finite loss in {state.bad_in_a_row} updates in a row (up to step "
                                     f"{state.step}); train.max_bad_steps={cfg.max_bad_steps}")
        if not bad:
            stage.after_update(state.step)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            rate = (state.step - first_step) / max(time.perf_counter() - started, 1e-9)
            _log_update(stage, metrics, bad, state, loop, dist, log, rate, telemetry)
        profiler.update_done(state.step)
        if ctx.stop and state.step < cfg.max_steps:  # agreed in this update's micro-batches: all stop together
            return _preempt(stage, state, loop, dist, loader, flag)
        if stage.validate and cfg.val_every and state.step % cfg.val_every == 0:
            log(state.step, stage.validate(state.step))
        if state.step % cfg.ckpt_every == 0 or state.step == cfg.max_steps:
            save_checkpoint(stage, state, loop, dist, loader)
    print0(f"{loop.stage_name}: finished at step {state.step} ({state.skipped_steps} skipped updates)")
    if state.bad_in_a_row:  # fewer than train.max_bad_steps, so no abort; but the user should know
        print0(f"warning: {loop.stage_name}: the last {state.bad_in_a_row} update(s), to step {state.step}, had "
               f"non-finite losses and were skipped: the saved weights are those after step "
               f"{state.step - state.bad_in_a_row}")
    return 0


def _preempt(stage: Stage, state: RunState, loop: LoopConfig, dist: DistInfo, loader: Any,
             flag: PreemptionFlag) -> int:
    folder = save_checkpoint(stage, state, loop, dist, loader)
    # Rank 0 may not have seen the file itself yet (another rank's look came first): look again.
    stop_file = flag.stop_file is not None and flag.received is None and flag.stop_file.exists()
    why = f"the stop file {flag.stop_file} appeared" if stop_file else "preempted"
    print0(f"{loop.stage_name}: {why}; saved {folder}, exiting with {EXIT_PREEMPTED}")
    if dist.is_main and loop.train.requeue_on_preempt and not stop_file:  # a stop asked for is not requeued
        outcome = requeue_slurm_job()
        if outcome:
            print0(outcome)
    return EXIT_PREEMPTED
