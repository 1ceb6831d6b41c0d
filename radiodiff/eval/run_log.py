"""A run's training log as series: ``metrics.jsonl`` (and ``config.yaml``) read and checked.

The log interleaves training lines and validation lines (same step, ``val/*`` keys); every key is
read from the lines that have it. A skipped update logs NaN losses: they stay NaN. The stage (and
the keys each figure draws for it), the discriminator start and the EMA start come with the series.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from radiodiff.runs.layout import CONFIG_FILE, METRICS_FILE


class MetricsFileError(ValueError):
    """A run's metrics.jsonl or config.yaml is missing or cannot be read."""


@dataclass(frozen=True)
class Panel:
    """One axes: curves on the left y-axis, optionally others on a right y-axis."""

    title: str
    left: tuple[str, ...]
    right: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageKeys:
    """Which metrics keys each figure draws for one training stage."""

    total: str
    second: str  # the twin-axis curve of multi_axis.png
    panels: tuple[Panel, ...]
    normalized: tuple[str, ...]


STAGE_KEYS = {
    "vae": StageKeys(
        total="ae/loss", second="ae/kl",
        panels=(Panel("Reconstruction (NLL)", ("ae/nll",)), Panel("KL", ("ae/kl",)),
                Panel("Generator loss g / adaptive weight", ("ae/g",), ("ae/d_weight",)),
                Panel("Discriminator loss / logits", ("disc/loss",), ("disc/logits_real", "disc/logits_fake"))),
        normalized=("ae/loss", "ae/nll", "ae/kl", "ae/g", "disc/loss")),
    "ldm": StageKeys(
        total="loss", second="ldm/loss_eps",
        panels=(Panel("loss_c (weighted)", ("ldm/loss_c",)), Panel("loss_eps (weighted)", ("ldm/loss_eps",)),
                Panel("Weighted vs unweighted", ("ldm/loss_c", "ldm/loss_eps", "ldm/mse_l1_c", "ldm/mse_l1_eps")),
                Panel("Learning rate", ("lr",))),
        normalized=("loss", "ldm/loss_c", "ldm/loss_eps", "ldm/mse_l1_c", "ldm/mse_l1_eps")),
}

# The throughput figure, from the training telemetry (radiodiff/train/telemetry.py), for both stages.
PERF_PANELS = (
    Panel("Maps per second (global, per rank)", ("perf/maps_per_s", "perf/maps_per_s_rank")),
    Panel("Time waiting for data (fraction)", ("perf/data_wait_frac",)),
    Panel("Achieved TFLOP/s per rank / MFU", ("perf/tflops_rank",), ("perf/mfu",)),
    Panel("Peak memory (GB)", ("perf/peak_memory_gb",)),
)


@dataclass
class RunLog:
    """A run's logged metrics: key -> (steps, values), values NaN where non-finite."""

    run_dir: Path
    stage: str  # vae | ldm
    series: dict[str, tuple[np.ndarray, np.ndarray]]
    disc_start: int | None = None  # stage 1: the GAN terms are on after this many updates
    ema_start: int | None = None  # stage 2: ema.start_step
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> StageKeys:
        return STAGE_KEYS[self.stage]

    @property
    def last_step(self) -> int:
        return max(int(steps.max()) for steps, _ in self.series.values())

    def has(self, key: str) -> bool:
        return key in self.series and bool(np.isfinite(self.series[key][1]).any())

    def final(self, key: str) -> float:
        """The last finite value of ``key`` (NaN if none)."""
        values = self.series[key][1] if key in self.series else np.array([])
        finite = values[np.isfinite(values)]
        return float(finite[-1]) if finite.size else math.nan


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``metrics.jsonl``, one per non-empty line, each with an integer "step"."""
    if not path.is_file():
        raise MetricsFileError(f"{path}: no such file (expected a run directory's {METRICS_FILE})")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetricsFileError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsFileError(f"{path}: line {number} is not an object with an integer \"step\"")
        records.append(record)
    if not records:
        raise MetricsFileError(f"{path}: no logged steps")
    return records


def to_series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Key -> (steps, values) over the records that have the key; non-numbers skipped, inf -> NaN."""
    columns: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                number = float(value)
                columns.setdefault(key, []).append((record["step"], number if math.isfinite(number) else math.nan))
    series = {}
    for key, pairs in columns.items():
        pairs.sort(key=lambda pair: pair[0])
        series[key] = (np.array([s for s, _ in pairs], dtype=np.int64), np.array([v for _, v in pairs]))
    return series


def read_config(path: Path) -> dict[str, Any]:
    """The run's config.yaml as a dict ({} if the run has none)."""
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MetricsFileError(f"{path}: not valid YAML ({error})") from error
    if config is not None and not isinstance(config, dict):
        raise MetricsFileError(f"{path}: expected a mapping at the top level")
    return config or {}


def _config_int(config: dict[str, Any], section: str, key: str) -> int | None:
    value = (config.get(section) or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _disc_start_from_metrics(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> int | None:
    """Updates before the first logged step with disc_factor > 0 (when config.yaml is absent)."""
    if "ae/disc_factor" not in series:
        return None
    steps, values = series["ae/disc_factor"]
    on = steps[np.nan_to_num(values) > 0]
    return int(on[0]) - 1 if on.size else None


def _stage(series: dict[str, tuple[np.ndarray, np.ndarray]], config: dict[str, Any]) -> str:
    """vae (stage 1 logs ae/* and disc/*) or ldm (stage 2 logs loss and ldm/*); else the config decides."""
    if any(key.startswith(("ae/", "disc/")) for key in series):
        return "vae"
    if "loss" in series or any(key.startswith("ldm/") for key in series) or "diffusion" in config:
        return "ldm"
    return "vae"


def load_run(run_dir: Path) -> RunLog:
    """Read a run directory's metrics and the facts the figures mark (stage, disc_start, EMA start)."""
    series = to_series(read_metrics(run_dir / METRICS_FILE))
    config = read_config(run_dir / CONFIG_FILE)
    run = RunLog(run_dir=run_dir, stage=_stage(series, config), series=series, config=config)
    if run.stage == "vae":
        run.disc_start = _config_int(config, "loss", "disc_start")
        if run.disc_start is None:
            run.disc_start = _disc_start_from_metrics(series)
    else:
        run.ema_start = _config_int(config, "ema", "start_step")
    return run


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` logged points, NaNs left out (NaN where the window has none)."""
    finite = np.isfinite(values)
    sums = np.convolve(np.where(finite, values, 0.0), np.ones(window))[: values.size]
    counts = np.convolve(finite.astype(float), np.ones(window))[: values.size]
    return np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)


def normalize(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Divided by the first finite value when every value is positive, else min-max; and how."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0:
        return values / finite[0], "/ first"
    span = finite.max() - finite.min() if finite.size else 0.0
    if span == 0:
        return np.where(np.isfinite(values), 0.0, np.nan), "min-max"
    return (values - finite.min()) / span, "min-max"
