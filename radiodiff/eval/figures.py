"""Training figures from a run directory's ``metrics.jsonl`` (and ``config.yaml``), as PNG files.

The five figures the reference RadioDiff project's users rely on: the training phases (the
discriminator start of stage 1, the EMA start of stage 2), the loss components, loss/KL/lr on twin
axes, the components normalized to compare trends, and a 2x3 dashboard with the final values. A
sixth, the throughput (the ``perf/*`` telemetry: maps/s, data wait, TFLOP/s and MFU, peak memory),
is written when the log has any of it.

The log interleaves training lines and validation lines (same step, ``val/*`` keys); every key is
read from the lines that have it. A skipped update logs NaN losses: they stay NaN (a gap in the
curve) and are marked. Keys that were never logged are left out of the figures, not drawn empty.
Figures are drawn on the Agg canvas directly, so no global matplotlib backend is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from radiodiff.eval.run_log import (
    PERF_PANELS,
    Panel,
    RunLog,
    load_run,
    moving_average,
    normalize,
)

FIGURE_NAMES = ("training_phases.png", "loss_components.png", "multi_axis.png", "normalized_comparison.png",
                "summary_dashboard.png")
THROUGHPUT_FIGURE = "throughput.png"  # only when the log has perf/* metrics
DPI = 110
MARKER_MAX_POINTS = 60


def _new_figure(width: float, height: float):
    """A Figure on its own Agg canvas: no pyplot state, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def _line(ax, steps: np.ndarray, values: np.ndarray, **style: Any) -> list:
    """A curve over steps; sparse curves get point markers, so that a single logged step shows."""
    style.setdefault("marker", "o" if steps.size <= MARKER_MAX_POINTS else None)
    return ax.plot(steps, values, markersize=3, **style)


def _curve(ax, run: RunLog, key: str, **style: Any) -> list:
    """Draw ``key`` if it was logged with a finite value; returns the line handles."""
    if not run.has(key):
        return []
    style.setdefault("label", key)
    return _line(ax, *run.series[key], **style)


def _not_logged(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _bad_steps(run: RunLog) -> np.ndarray:
    """Logged steps whose update was skipped (bad > 0) or whose total loss is not finite."""
    bad: set[int] = set()
    if "bad" in run.series:
        steps, values = run.series["bad"]
        bad.update(int(s) for s in steps[np.nan_to_num(values) > 0])
    if run.keys.total in run.series:
        steps, values = run.series[run.keys.total]
        bad.update(int(s) for s in steps[~np.isfinite(values)])
    return np.array(sorted(bad), dtype=np.int64)


def _mark_bad(ax, run: RunLog) -> None:
    for index, step in enumerate(_bad_steps(run)):
        ax.axvline(step, color="red", alpha=0.35, linewidth=1, linestyle=":",
                   label="skipped update (NaN)" if index == 0 else None)


def _mark_phases(ax, run: RunLog, shade: bool = True) -> None:
    """Stage 1: the discriminator start and the two phases; stage 2: the EMA start."""
    first = min(int(steps.min()) for steps, _ in run.series.values())
    last = run.last_step
    start, names = ((run.disc_start, ("VAE only", "VAE + GAN")) if run.stage == "vae"
                    else (run.ema_start, ("EMA copies weights", "EMA averaging")))
    if start is None:
        return
    what = "disc_start" if run.stage == "vae" else "ema.start_step"
    if not first <= start <= last:  # a line out there would squash the curves to one side
        ax.plot([], [], " ", label=f"{what} = {start} (not in the log)")
    else:
        ax.axvline(start, color="black", linestyle="--", linewidth=1.2, label=f"{what} = {start}")
    if not shade:
        return
    if start > first:
        ax.axvspan(min(first, start), min(start, last), color="tab:blue", alpha=0.08, label=names[0])
    if start < last:
        ax.axvspan(max(start, first), last, color="tab:orange", alpha=0.10, label=names[1])


def _finish(ax, title: str, fontsize: int = 10) -> None:
    """Title, a step x-axis with integer ticks, a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("step", fontsize=fontsize - 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_training_phases(run: RunLog, path: Path) -> Path:
    figure = _new_figure(10, 5)
    ax = figure.add_subplot()
    if not _curve(ax, run, run.keys.total, color="tab:blue", label=f"total loss ({run.keys.total})"):
        _not_logged(ax, run.keys.total)
    _mark_phases(ax, run)
    _mark_bad(ax, run)
    stage = "stage 1: VAE-GAN" if run.stage == "vae" else "stage 2: LDM"
    ax.set_ylabel("loss")
    _finish(ax, f"Training phases ({stage}) - {run.run_dir.name}", fontsize=12)
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _draw_panel(ax, run: RunLog, panel: Panel) -> None:
    handles = [h for key in panel.left for h in _curve(ax, run, key)]
    if panel.right and any(run.has(key) for key in panel.right):
        twin = ax.twinx()
        colors = iter(("tab:red", "tab:green", "tab:purple"))
        handles += [h for key in panel.right for h in _curve(twin, run, key, color=next(colors), linestyle="--")]
        twin.set_ylabel(", ".join(panel.right), fontsize=8)
    if not handles:
        _not_logged(ax, ", ".join(panel.left + panel.right))
    else:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=7, loc="best")
    _mark_phases(ax, run, shade=False)
    _finish(ax, panel.title)


def plot_loss_components(run: RunLog, path: Path) -> Path:
    figure = _new_figure(12, 8)
    for index, panel in enumerate(run.keys.panels):
        _draw_panel(figure.add_subplot(2, 2, index + 1), run, panel)
    figure.suptitle(f"Loss components - {run.run_dir.name}")
    figure.tight_layout()
    return _save(figure, path)


def plot_multi_axis(run: RunLog, path: Path) -> Path:
    """Total loss (left), the second curve (right) and lr (offset right axis) over steps."""
    figure = _new_figure(11, 5)
    ax = figure.add_subplot()
    figure.subplots_adjust(left=0.08, right=0.80, bottom=0.22)
    handles = _curve(ax, run, run.keys.total, color="tab:blue", label=f"total loss ({run.keys.total})")
    ax.set_ylabel("total loss", color="tab:blue")
    for offset, key, color in ((0.0, run.keys.second, "tab:red"), (0.12, "lr", "tab:green")):
        if run.has(key):
            twin = ax.twinx()
            twin.spines["right"].set_position(("axes", 1.0 + offset))
            handles += _curve(twin, run, key, color=color, linestyle="--" if key == "lr" else "-")
            twin.set_ylabel(key, color=color)
            twin.tick_params(axis="y", colors=color)
    if not handles:
        _not_logged(ax, f"{run.keys.total}, {run.keys.second}, lr")
    else:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, ncol=4,
                  loc="upper center", bbox_to_anchor=(0.5, -0.14))
    _mark_phases(ax, run, shade=False)
    _finish(ax, f"Loss, {run.keys.second} and learning rate - {run.run_dir.name}", fontsize=12)
    return _save(figure, path)


def plot_normalized(run: RunLog, path: Path) -> Path:
    """Each component divided by its first value (min-max where it crosses or touches zero)."""
    figure = _new_figure(10, 5)
    ax = figure.add_subplot()
    drawn = False
    for key in run.keys.normalized:
        if run.has(key):
            steps, values = run.series[key]
            scaled, how = normalize(values)
            _line(ax, steps, scaled, label=f"{key} ({how})")
            drawn = True
    if not drawn:
        _not_logged(ax, ", ".join(run.keys.normalized))
    else:
        ax.axhline(1.0, color="gray", linewidth=0.8, alpha=0.6)
        ax.legend(fontsize=8, loc="best")
    _mark_phases(ax, run, shade=False)
    _mark_bad(ax, run)
    ax.set_ylabel("relative value")
    _finish(ax, f"Normalized loss components - {run.run_dir.name}", fontsize=12)
    figure.tight_layout()
    return _save(figure, path)


def _format(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}"


def summary_text(run: RunLog) -> str:
    """Run facts and the final (last finite) value of every metric the dashboard shows."""
    facts = [f"run: {run.run_dir.name}", f"stage: {'1 (VAE-GAN)' if run.stage == 'vae' else '2 (LDM)'}",
             f"last step: {run.last_step}"]
    if run.stage == "vae":
        facts.append(f"disc_start: {run.disc_start if run.disc_start is not None else 'unknown'}")
    elif run.ema_start is not None:
        facts.append(f"ema.start_step: {run.ema_start}")
    skipped = int(run.final("skipped_steps")) if run.has("skipped_steps") else _bad_steps(run).size
    facts.append(f"skipped updates: {skipped}")
    keys = dict.fromkeys([run.keys.total, *(k for p in run.keys.panels for k in p.left + p.right), "lr",
                          "steps_per_s", *sorted(k for k in run.series if k.startswith("val/"))])
    finals = [f"{key}: {_format(run.final(key))}" for key in keys if run.has(key)]
    return "\n".join(facts + ["", "final values:"] + finals)


def _dashboard_loss(ax, run: RunLog) -> None:
    key = run.keys.total
    if not _curve(ax, run, key, color="tab:blue", alpha=0.5):
        return _not_logged(ax, key)
    steps, values = run.series[key]
    window = max(2, min(100, steps.size // 20))
    ax.plot(steps, moving_average(values, window), color="tab:blue", linewidth=2, label=f"moving avg ({window})")
    _mark_phases(ax, run, shade=False)
    _mark_bad(ax, run)
    ax.legend(fontsize=7)


def _dashboard_components(ax, run: RunLog) -> None:
    keys = dict.fromkeys(k for panel in run.keys.panels for k in panel.left if k != "lr")
    handles = [h for key in keys for h in _curve(ax, run, key)]
    if not handles:
        return _not_logged(ax, "loss components")
    ax.set_yscale("symlog", linthresh=1e-2)  # components span orders of magnitude and may be 0 or < 0
    ax.legend(fontsize=7)


def _dashboard_validation(ax, run: RunLog) -> None:
    handles = _curve(ax, run, "val/psnr", color="tab:purple", label="PSNR (dB)")
    if run.has("val/ssim"):
        twin = ax.twinx()
        handles += _curve(twin, run, "val/ssim", color="tab:green", linestyle="--", label="SSIM")
        twin.set_ylabel("SSIM", fontsize=8)
    if not handles:
        return _not_logged(ax, "validation PSNR / SSIM")
    ax.set_ylabel("PSNR (dB)", fontsize=8)
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=7)


def _dashboard_single(ax, run: RunLog, key: str, drawstyle: str = "default") -> None:
    if not _curve(ax, run, key, drawstyle=drawstyle):
        _not_logged(ax, key)


def plot_dashboard(run: RunLog, path: Path) -> Path:
    figure = _new_figure(17, 9)
    grid = figure.add_gridspec(2, 3, left=0.05, right=0.78, wspace=0.35, hspace=0.35)
    panels = (("Total loss", lambda ax: _dashboard_loss(ax, run)),
              ("Loss components", lambda ax: _dashboard_components(ax, run)),
              ("Learning rate", lambda ax: _dashboard_single(ax, run, "lr")),
              ("Validation", lambda ax: _dashboard_validation(ax, run)),
              ("Skipped updates (cumulative)", lambda ax: _dashboard_single(ax, run, "skipped_steps", "steps-post")),
              ("Throughput (steps/s)", lambda ax: _dashboard_single(ax, run, "steps_per_s")))
    for index, (title, draw) in enumerate(panels):
        ax = figure.add_subplot(grid[index // 3, index % 3])
        draw(ax)
        _finish(ax, title)
    figure.text(0.80, 0.93, summary_text(run), va="top", ha="left", family="monospace", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "gray"})
    figure.suptitle(f"Training summary - {run.run_dir.name}")
    return _save(figure, path)


def throughput_panels(run: RunLog) -> list[Panel]:
    """The throughput panels with at least one logged perf/* key, each keeping only its logged keys."""
    panels = []
    for panel in PERF_PANELS:
        left, right = tuple(k for k in panel.left if run.has(k)), tuple(k for k in panel.right if run.has(k))
        if left or right:
            panels.append(Panel(panel.title, left or right, right if left else ()))
    return panels


def throughput_figure(run: RunLog):
    """maps/s, data wait, TFLOP/s and MFU, peak memory over steps, one panel per logged kind;
    None when the log has no perf/* metrics."""
    panels = throughput_panels(run)
    if not panels:
        return None
    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(6 * columns, 4 * rows)
    for index, panel in enumerate(panels):
        _draw_panel(figure.add_subplot(rows, columns, index + 1), run, panel)
    figure.suptitle(f"Throughput - {run.run_dir.name}")
    figure.tight_layout()
    return figure


def plot_throughput(run: RunLog, path: Path) -> Path | None:
    figure = throughput_figure(run)
    return None if figure is None else _save(figure, path)


def write_figures(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the five training figures of ``run_dir`` into ``out_dir`` (default run_dir/figures), and
    the throughput figure when the log has perf/* metrics."""
    run = load_run(Path(run_dir))
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plots = (plot_training_phases, plot_loss_components, plot_multi_axis, plot_normalized, plot_dashboard)
    paths = [plot(run, out / name) for plot, name in zip(plots, FIGURE_NAMES)]
    throughput = plot_throughput(run, out / THROUGHPUT_FIGURE)
    return paths + ([throughput] if throughput is not None else [])
